"""Every use of a DeepSpeed internal, in one place: the version range we test, the MoE layer as DeepSpeed's engine
sees it, its expert-parallel groups, and the on-disk layout of its checkpoints and optimizer states.

The rest of camex_ds uses DeepSpeed's public API (`deepspeed.initialize`, `init_distributed`, the engine) directly
and asks this module for anything else, so a new DeepSpeed version is checked against one file.

Why `CAMExMoE` subclasses `MoE` and skips `MoE.__init__` (composition is not possible with DeepSpeed 0.19):

* The engine finds MoE layers only by `isinstance(module, deepspeed.moe.layer.MoE)`:
  `DeepSpeedEngine._configure_distributed_model` sets `has_moe_layers` from it (without it
  `buffered_allreduce_fallback` never calls `_reduce_expert_gradients`, and the ZeRO optimizer gets no
  expert-parallel groups); `_save_moe_checkpoint` writes the `layer_<l>_expert_<e>_...` files, numbered by that
  isinstance walk; `load_moe_state_dict` reads them back; `_get_non_moe_state_dict` drops expert keys from
  `mp_rank_00_model_states.pt`; and `deepspeed.moe.utils.has_moe_layers` asks the same. A layer that merely holds a
  `MoE`, or one that quacks like it, is trained and checkpointed as a dense module: every expert in the model
  states file, reduced over all ranks. The only other class the engine accepts, `AutoEPMoELayer`, holds fused
  `w1/w2/w3` token-routed experts, not merged ones.
* `MoE.__init__` builds DeepSpeed's token gate (`TopKGate`, a `[num_experts, hidden]` linear drawn from the global
  RNG) and `MOELayer`. A merge layer routes segments with its own router: the gate would be an unused parameter
  in every checkpoint and optimizer group, and drawing it would shift every later random draw, so the same seed
  would no longer give the same model.

So `set_engine_attributes` sets what `MoE.__init__` would have set and the engine reads (`ep_size`,
`expert_group_name`, `num_experts`, `num_local_experts`, `use_residual`, `enable_expert_tensor_parallelism`), and
`ExpertParallelExperts` stands in for `MOELayer` where DeepSpeed reads it: `deepspeed_moe.experts` (the path of
the expert parameters in the checkpoint files) and `_set_ep_group` (called by `MoE.set_deepspeed_parallelism`).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

# `Experts` and `MoE` are also what the layers build on: they import them from here
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

# ================================================================================================================
# the DeepSpeed versions we test

TESTED_DEEPSPEED = (">=0.19.8", "<0.20")  # CI installs 0.19.8 (pyproject.toml); the checkpoint layout is 0.19's


def untested_version(version: Optional[str] = None) -> Optional[str]:
    """One line naming the installed DeepSpeed (or `version`) and the tested range when it lies outside, else None."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import deepspeed

        version = deepspeed.__version__
    tested = ",".join(TESTED_DEEPSPEED)
    try:
        inside = Version(version) in SpecifierSet(tested)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return (f"warning: DeepSpeed {version} is installed, but camex_ds is tested with DeepSpeed {tested}: its MoE "
            f"engine attributes and checkpoint layout may differ (pip install 'deepspeed{tested}')")


def warn_if_untested() -> None:
    """Print `untested_version`'s line on stderr, from the first process of a job only. Called where runs and tools
    start, not at import: importing camex_ds says nothing."""
    line = untested_version()
    if line is not None and os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


# ================================================================================================================
# a MoE layer as the engine sees it (see the module docstring)


def expert_group_name(ep_size: int) -> str:
    """The name under which DeepSpeed keeps the expert-parallel groups of degree `ep_size`, and tags expert
    parameters (`param.group_name`) for its optimizer groups."""
    return f"ep_size_{ep_size}"


def set_engine_attributes(layer: MoE, num_experts: int, ep_size: int) -> None:
    """Set on `layer` the attributes `MoE.__init__` sets and DeepSpeed's engine and checkpointing read."""
    layer.ep_size = ep_size
    layer.expert_group_name = expert_group_name(ep_size)
    layer.num_experts = num_experts
    layer.num_local_experts = num_experts // ep_size
    layer.use_residual = False
    layer.enable_expert_tensor_parallelism = False


class ExpertParallelExperts(nn.Module):
    """Stands in for DeepSpeed's `MOELayer` under `layer.deepspeed_moe`: holds `experts` (so the parameters are at
    `deepspeed_moe.experts.deepspeed_experts.<local id>`, the path DeepSpeed's checkpointing expects) and the
    expert-parallel group `MoE.set_deepspeed_parallelism` hands it."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group


def local_experts(layer: MoE) -> nn.ModuleList:
    """The experts this rank holds of a MoE layer (ours or DeepSpeed's), in local-id order."""
    return layer.deepspeed_moe.experts.deepspeed_experts


def expert_group(layer: MoE):
    """The expert-parallel process group of a MoE layer, None before `deepspeed.initialize` gave it one."""
    return layer.deepspeed_moe.ep_group


def token_gate_weight(layer: MoE) -> nn.Parameter:
    """The `[num_experts, hidden]` weight of DeepSpeed's token gate (`TopKGate.wg`) of a DeepSpeed MoE layer."""
    return layer.deepspeed_moe.gate.wg.weight


def expert_counts(layer: MoE):
    """The tokens routed to each expert in a DeepSpeed MoE layer's last forward (None before one)."""
    return layer.deepspeed_moe.exp_counts


def moe_layer_names(model: nn.Module) -> list:
    """The names of `model`'s MoE layers in the order DeepSpeed numbers them (`layer_<l>_expert_...` files)."""
    return [name for name, module in model.named_modules() if isinstance(module, MoE)]


def keep_local_experts(layer: MoE, ep_size: int) -> None:
    """Keep the first `1/ep_size` of `layer`'s experts and tag their parameters for the expert group of degree
    `ep_size`, as `Experts` does: one EP rank's layer, for simulating its optimizer groups."""
    experts = layer.deepspeed_moe.experts
    count = len(experts.deepspeed_experts) // ep_size
    experts.deepspeed_experts = nn.ModuleList(list(experts.deepspeed_experts)[:count])
    for p in experts.parameters():
        p.group_name = expert_group_name(ep_size)


# ================================================================================================================
# expert-parallel groups


def expert_parallel_rank(group_name: str) -> int:
    """This process's rank in DeepSpeed's expert-parallel group `group_name` (made by `set_deepspeed_parallelism`)."""
    return groups._get_expert_parallel_rank(group_name)


_retired: list = []  # DeepSpeed's groups of destroyed process groups, kept referenced (see below)


def forget_groups() -> None:
    """Start DeepSpeed's group registries empty.

    DeepSpeed keeps the groups it made (expert, expert-data, world) in module globals. Once a process group
    is destroyed they name dead groups, which a second job in the same process (a notebook, the in-process
    fuzz test) would be handed. The old groups stay referenced here: freeing them can abort the process in
    gloo's destructors (3 of 10 two-rank runs, when done right after `destroy_process_group`).
    """
    registries = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                  "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")
    singletons = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP")
    _retired.append([getattr(groups, name) for name in registries + singletons])
    for name in registries:
        setattr(groups, name, {})
    for name in singletons:
        setattr(groups, name, None)


# ================================================================================================================
# the optimizer and config


def split_moe_param_groups(param_groups: list) -> list:
    """DeepSpeed's split of optimizer groups into non-expert groups and one group per expert group name."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def torch_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, FP16_Optimizer) of an engine's optimizer."""
    from deepspeed.runtime.lr_schedules import get_torch_optimizer

    return get_torch_optimizer(optimizer)


def batch_sizes(ds_config: dict) -> tuple:
    """`(micro batch, accumulation steps)` of a DeepSpeed config dict for this job's world size, as DeepSpeed's own
    config object reads (and validates) it; raises whatever DeepSpeed raises for a bad config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(ds_config)
    return ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps


# ================================================================================================================
# the checkpoint layout (DeepSpeed 0.19; `ckpt.deepspeed` describes it)

LATEST = "latest"  # the file naming the newest tag folder
MODEL_STATES = "mp_rank_00_model_states.pt"  # a tag folder's non-expert weights and client state
EXPERT_FILES = "layer_*_expert_*_mp_rank_00_model_states.pt"  # glob of every expert file of a tag folder
EXPERT_FILES_ANY_MP = "layer_*_expert_*_mp_rank_*_model_states.pt"  # the same, of any model-parallel rank
EXPERT_FILE_RE = re.compile(r"layer_(?P<layer>\d+)_expert_(?P<expert>\d+)_mp_rank_00_model_states\.pt")
EXPERT_PARAMS = ".deepspeed_moe.experts.deepspeed_experts."  # between a MoE layer's name and an expert's id
TOKEN_GATE = ".deepspeed_moe.gate."  # between a DeepSpeed MoE layer's name and its token gate's parameters

# keys of the model states file
MODULE_KEY, OPTIMIZER_KEY, PARAM_SHAPES_KEY = "module", "optimizer", "param_shapes"
DP_WORLD_KEY, MP_WORLD_KEY, DS_CONFIG_KEY = "dp_world_size", "mp_world_size", "ds_config"


def expert_file_name(layer: int, expert: int) -> str:
    """The file of expert `expert` (global id) of the `layer`-th MoE layer (in `moe_layer_names` order)."""
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def zero_file_name(rank: int, bf16: bool) -> str:
    """ZeRO 1/2: the optimizer file of data-parallel rank `rank`."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def expp_file_name(ep_rank: int) -> str:
    """ZeRO 0: the optimizer file of expert-parallel rank `ep_rank`."""
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


# ================================================================================================================
# optimizer states on disk

OPTIMIZER_STATE = "optimizer_state_dict"  # the wrapped torch optimizer state (FP16_Optimizer), or ZeRO's state
FP32_GROUPS = "fp32_groups"  # FP16_Optimizer: per group the fp32 master copy of each parameter
ZERO_SCALARS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage", "ds_version")


def fp16_optimizer_parts(opt: dict) -> Optional[tuple]:
    """`(torch optimizer state dict, fp32 master groups, the wrapper's other entries)` of DeepSpeed's FP16_Optimizer
    state (bf16 without ZeRO), or None when `opt` is not one."""
    if OPTIMIZER_STATE not in opt or FP32_GROUPS not in opt:
        return None
    return opt[OPTIMIZER_STATE], opt[FP32_GROUPS], {k: v for k, v in opt.items() if k not in (OPTIMIZER_STATE,
                                                                                             FP32_GROUPS)}


def fp16_optimizer_state(torch_state: dict, fp32_groups: list, extra: dict) -> dict:
    """FP16_Optimizer's state from its parts (`fp16_optimizer_parts` backwards)."""
    return {**extra, OPTIMIZER_STATE: torch_state, FP32_GROUPS: fp32_groups}


@dataclass
class ZeroPartitions:
    """One rank's ZeRO stage 1/2 optimizer state (a `zero_pp_rank_*` file), in our names."""

    partitions: list  # per param group, the rank's flat fp32 partition (single_partition_of_fp32_groups)
    mappings: Optional[list]  # per group, name -> fragment address; None when saved by a DeepSpeed too old to reshard
    base: object  # the torch optimizer state over the partitions, a dict ("rigid" format; a list if elastic)
    scalars: dict  # the wrapper's `ZERO_SCALARS` present in the file
    file_extra: dict  # the file's entries besides the optimizer state


def read_zero_partitions(content) -> Optional[ZeroPartitions]:
    """The ZeRO 1/2 optimizer state in a `zero_pp_rank_*` file's content, or None when it holds none."""
    osd = content.get(OPTIMIZER_STATE) if isinstance(content, dict) else None
    if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
        return None
    return ZeroPartitions(osd["single_partition_of_fp32_groups"], osd.get("param_slice_mappings"),
                          osd["base_optimizer_state"], {k: osd[k] for k in ZERO_SCALARS if k in osd},
                          {k: v for k, v in content.items() if k != OPTIMIZER_STATE})


def zero_file_content(zero: ZeroPartitions, paddings: list, param_paddings: list, counts: list) -> dict:
    """What DeepSpeed's stage 1/2 optimizer saves on one rank (rigid format), with the paddings and data-parallel
    sizes of its groups: the file `read_zero_partitions` reads back."""
    scalars = zero.scalars
    osd = {
        "loss_scaler": scalars.get("loss_scaler"),
        "dynamic_loss_scale": scalars.get("dynamic_loss_scale", False),
        "overflow": scalars.get("overflow", False),
        "clip_grad": scalars.get("clip_grad", 0.0),
        "base_optimizer_state": zero.base,
        "single_partition_of_fp32_groups": zero.partitions,
        "zero_stage": scalars.get("zero_stage"),
        "group_paddings": paddings,
        "param_alignment_paddings": param_paddings,
        "partition_count": counts,
        "ds_version": scalars.get("ds_version"),
        "param_slice_mappings": zero.mappings,
    }
    return {OPTIMIZER_STATE: osd, **zero.file_extra}


def fragment_address(numel: int, start: int):
    """A parameter's fragment in a ZeRO partition, as `param_slice_mappings` holds it (`.numel`, `.start`)."""
    from deepspeed.utils.tensor_fragment import fragment_address as address

    return address(numel=numel, start=start)


def deepspeed_zero_to_fp32(reader):
    """DeepSpeed's `zero_to_fp32` module with `reader` as its checkpoint reader: its writers (what its command line
    and zero_to_torch.py run) look `get_fp32_state_dict_from_zero_checkpoint` up in their own module."""
    from deepspeed.utils import zero_to_fp32

    zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint = reader
    return zero_to_fp32


def cpu_adam_ready() -> bool:
    """Whether DeepSpeed's CPU Adam (op `cpu_adam`, what ZeRO-Offload steps Adam with) is prebuilt, or can be built by
    JIT here (a C++ compiler and ninja)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available

    if installed_ops.get("cpu_adam"):
        return True
    return is_ninja_available() and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
