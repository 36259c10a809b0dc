"""DeepSpeed's on-disk layout of a MoE checkpoint: tag folders, file names, model states, expert weights, and the
optimizer's parameter groups for any expert-parallel degree.

How DeepSpeed lays out a MoE checkpoint (tag folder, DeepSpeed 0.19; `deepspeed_adapter` holds the names and keys):

* `mp_rank_00_model_states.pt`: non-expert weights under 'module' (bf16 when training in bf16), the
  scheduler, our client state ('step', 'data', 'model_config'), and for ZeRO the per-group
  'param_shapes' of rank 0; without ZeRO also rank 0's optimizer state.
* `layer_<l>_expert_<e>_mp_rank_00_model_states.pt`: the weights of expert `e` (GLOBAL id) of the
  l-th MoE module (in `named_modules` order), keys with the global id. Layout independent.
* ZeRO 0: `expp_rank_<r>_mp_rank_00_optim_states.pt`, the torch optimizer state of EP rank r; its
  'state' is indexed by the position of the parameter in the param groups built by
  `camex_ds.model.param_groups` (non-expert groups first, then one group per expert group name,
  split by DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`). bf16 without ZeRO
  wraps it in DeepSpeed's FP16_Optimizer state (fp32 master copies per parameter in 'fp32_groups').
* ZeRO 1/2: `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per data-parallel rank: per param group
  one flat fp32 partition of the group's parameters (`single_partition_of_fp32_groups`), the
  optimizer state of that partition, and `param_slice_mappings` (name -> start, numel of the
  parameter's fragment in the partition). Expert groups are partitioned over the expert-data-parallel
  group (ranks r with the same r % ep), non-expert groups over all ranks.

`optimizer.py` reads and writes the optimizer files; `convert.py` puts the pieces together.
Errors are `ConvertError`s with one line naming the file, tensor or value at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .. import deepspeed_adapter as ds
from ..config import ConfigError, ModelConfig, read_json_object
from ..deepspeed_adapter import DP_WORLD_KEY, LATEST, MODEL_STATES, MODULE_KEY, MP_WORLD_KEY, PARAM_SHAPES_KEY
from .format import (
    EXPERT_RE,
    ConvertError,
    PathLike,
    PretrainedError,
    check_state_dict,
    expert_key,
    global_expert_name,
    meta_model,
    single_rank_config,
)

def expert_file(tag_dir: Path, layer: int, expert: int) -> Path:
    """The file of expert `expert` (global id) of the `layer`-th MoE layer (in `named_modules` order)."""
    return tag_dir / ds.expert_file_name(layer, expert)


def zero_file(tag_dir: Path, rank: int, bf16: bool) -> Path:
    """ZeRO 1/2: the optimizer file of data-parallel rank `rank`."""
    return tag_dir / ds.zero_file_name(rank, bf16)


def expp_file(tag_dir: Path, ep_rank: int) -> Path:
    """ZeRO 0: the optimizer file of expert-parallel rank `ep_rank`."""
    return tag_dir / ds.expp_file_name(ep_rank)


def rng_file(tag_dir: Path, rank: int) -> Path:
    """The random-number-generator states `camex_ds.train.checkpoint` saves for rank `rank`."""
    return tag_dir / f"rng_state_rank{rank}.pt"


def torch_load(path: Path, what: str = "checkpoint file"):
    """A DeepSpeed checkpoint file, or a `ConvertError` naming it when it is missing or unreadable."""
    if not path.is_file():
        raise ConvertError(f"{what} '{path}' is missing")
    try:
        # DeepSpeed's files pickle config objects and enums; they are read as DeepSpeed itself reads them.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same thing to the user
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{what} '{path}' is unreadable or truncated ({detail[:160]})")


# ================================================================================================================
# locating a checkpoint


@dataclass
class CheckpointRef:
    """Where one checkpoint is: its tag folder, and the run that wrote it when that is known."""

    root: Path  # the folder holding `latest` and the tag folders (a run's checkpoints/)
    tag: str
    run_dir: Optional[Path]  # the run's output dir (train_args.json, model_config.json), when known

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def _tags(root: Path) -> list:
    """The tag folders of `root` in step order (global_step9 before global_step10)."""
    return sorted((p.name for p in root.iterdir() if p.is_dir() and (p / MODEL_STATES).is_file()),
                  key=lambda t: (len(t), t)) if root.is_dir() else []


def resolve_checkpoint(path: PathLike, tag: Optional[str] = None) -> CheckpointRef:
    """Accept a run's output dir, its checkpoints/ dir, or a tag folder; pick `tag` or the one `latest` names."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"checkpoint path '{path}' does not exist")
    if not path.is_dir():
        raise ConvertError(f"checkpoint path '{path}' is not a folder")
    if (path / MODEL_STATES).is_file():  # a tag folder itself
        if tag is not None and tag != path.name:
            raise ConvertError(f"--tag {tag} contradicts the checkpoint folder '{path}' (tag {path.name})")
        root, tag = path.parent, path.name
        run_dir = root.parent if root.name == "checkpoints" else None
        return CheckpointRef(root, tag, run_dir)
    if (path / "checkpoints").is_dir():
        root, run_dir = path / "checkpoints", path
    else:
        root, run_dir = path, (path.parent if (path.parent / "train_args.json").is_file() else None)
    available = _tags(root)
    if tag is None:
        latest = root / LATEST
        if not latest.is_file():
            if not available:
                raise ConvertError(f"no DeepSpeed checkpoint in '{path}' (no '{LATEST}' file and no tag folder "
                                   f"with {MODEL_STATES})")
            raise ConvertError(f"'{root}' has no '{LATEST}' file: pass --tag (available: {', '.join(available)})")
        tag = latest.read_text().strip()
        if not tag:
            raise ConvertError(f"'{latest}' is empty")
    if not (root / tag).is_dir():
        hint = f"available: {', '.join(available)}" if available else "there are no tags"
        raise ConvertError(f"checkpoint tag '{tag}' does not exist in '{root}' ({hint})")
    return CheckpointRef(root, tag, run_dir)


# ================================================================================================================
# the optimizer's parameter groups, as the training loop builds them, for any EP degree


@dataclass
class GroupSpec:
    """One optimizer parameter group as `camex_ds.model.param_groups` builds it."""

    name: str
    moe: bool
    local_names: list  # names of the local model (local expert ids) in group order


@dataclass
class Layout:
    """Parameter names and optimizer groups of one EP rank of a model with expert-parallel degree `ep`."""

    cfg: ModelConfig  # ep_size = 1 version
    ep: int
    groups: list  # GroupSpec, in optimizer order
    local_counts: dict  # MoE layer prefix -> experts per EP rank
    shapes: dict  # global name -> shape (the ep_size=1 state dict)
    moe_prefixes: list  # MoE layer prefixes in DeepSpeed's moe_layer_id order
    experts_per_layer: dict  # prefix -> global expert count

    def to_global(self, local_name: str, ep_rank: int) -> str:
        m = EXPERT_RE.match(local_name)
        return local_name if m is None else global_expert_name(local_name, ep_rank, self.local_counts[m["layer"]])

    def group_names(self, g: GroupSpec, ep_rank: int) -> list:
        return [self.to_global(n, ep_rank) for n in g.local_names]


def build_layout(cfg: ModelConfig, ep: int) -> Layout:
    """Simulate `camex_ds.model.param_groups` on a meta-device model holding one EP rank's experts."""
    from ..model import param_groups

    cfg1 = single_rank_config(cfg)
    model = meta_model(cfg1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    moe_prefixes = ds.moe_layer_names(model)
    experts_per_layer, local_counts = {}, {}
    for prefix in moe_prefixes:
        layer = model.get_submodule(prefix)
        total = len(ds.local_experts(layer))
        if total % ep:
            raise ConvertError(f"ep_size={ep} does not divide the {total} experts of MoE layer '{prefix}'")
        experts_per_layer[prefix], local_counts[prefix] = total, total // ep
        ds.keep_local_experts(layer, ep)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in param_groups(model):
        groups.append(GroupSpec(g["name"], bool(g.get("moe", False)), [names[id(p)] for p in g["params"]]))
    return Layout(cfg1, ep, groups, local_counts, shapes, moe_prefixes, experts_per_layer)


# ================================================================================================================
# reading a DeepSpeed checkpoint into a layout-free form


@dataclass
class Universal:
    """A checkpoint without its layout: every tensor under its ep_size=1 (global) name."""

    cfg: ModelConfig  # as trained (its ep_size is the source layout's)
    states: dict  # mp_rank_00_model_states.pt
    weights: dict  # name -> tensor, as the model holds it (fp32 or bf16)
    kind: str  # 'torch' (ZeRO 0 fp32), 'fp16opt' (ZeRO 0 bf16), 'zero' (ZeRO 1/2)
    world: int
    bf16: bool
    masters: Optional[dict] = None  # name -> fp32 tensor (param shape) when the optimizer keeps copies
    opt_state: dict = field(default_factory=dict)  # name -> {key: tensor (param shape) or scalar}
    hparams: dict = field(default_factory=dict)  # name -> the hyperparameters of its optimizer group
    extra: dict = field(default_factory=dict)  # the optimizer wrapper's scalars, file-level keys


def _checkpoint_config(ref: CheckpointRef, states: dict) -> ModelConfig:
    raw = states.get("model_config")
    what = f"'{ref.tag_dir / MODEL_STATES}' (client state 'model_config')"
    if raw is None and ref.run_dir is not None and (ref.run_dir / "model_config.json").is_file():
        what = f"'{ref.run_dir / 'model_config.json'}'"
        raw = read_json_object(ref.run_dir / "model_config.json", "model config", ConvertError)
    if raw is None:
        raise ConvertError(f"'{ref.tag_dir / MODEL_STATES}' has no 'model_config' in its client state and no "
                           "model_config.json is next to it: this is not a checkpoint of launcher/pretrain.py")
    try:
        cfg = ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConvertError(f"{what}: {e}") from None
    if cfg.vocab_size is None:
        raise ConvertError(f"{what} has no vocab_size")
    return cfg


def read_model_states(ref: CheckpointRef) -> tuple:
    """`(mp_rank_00_model_states.pt's content, the model config it was trained with)`."""
    states = torch_load(ref.tag_dir / MODEL_STATES, "model states file")
    if not isinstance(states, dict) or not isinstance(states.get(MODULE_KEY), dict):
        raise ConvertError(f"'{ref.tag_dir / MODEL_STATES}' has no 'module' state dict: not a DeepSpeed model states "
                           "file")
    return states, _checkpoint_config(ref, states)


def read_weights_from_checkpoint(ref: CheckpointRef, states: dict, layout: Layout) -> dict:
    """The model's weights (ep_size=1 names) from 'module' and the per-expert files, checked."""
    weights = {}
    module = states[MODULE_KEY]
    for name, t in module.items():
        if EXPERT_RE.match(name):
            raise ConvertError(f"'{ref.tag_dir / MODEL_STATES}' holds expert tensor '{name}' among the non-expert "
                               "weights")
        weights[name] = t
    for layer_id, prefix in enumerate(layout.moe_prefixes):
        for e in range(layout.experts_per_layer[prefix]):
            file = expert_file(ref.tag_dir, layer_id, e)
            sd = torch_load(file, f"expert file (MoE layer '{prefix}', expert {e})")
            if not isinstance(sd, dict) or not sd:
                raise ConvertError(f"expert file '{file}' holds no tensors")
            want = expert_key(prefix, e)
            for name, t in sd.items():
                if not name.startswith(want):
                    raise ConvertError(f"expert file '{file}' holds '{name}', expected names starting with '{want}' "
                                       "(does the checkpoint match its model config?)")
                weights[name] = t
    extra = [f for f in sorted(ref.tag_dir.glob(ds.EXPERT_FILES_ANY_MP))
             if not _expert_file_expected(f.name, layout)]
    if extra:
        raise ConvertError(f"'{extra[0]}' is not an expert of the model the config describes (the config does not "
                           "match the checkpoint)")
    try:
        check_state_dict(weights, layout.cfg, f"checkpoint '{ref.tag_dir}'")
    except PretrainedError as e:
        raise ConvertError(str(e))
    return weights


def _expert_file_expected(filename: str, layout: Layout) -> bool:
    m = ds.EXPERT_FILE_RE.fullmatch(filename)
    if m is None:
        return False
    layer, expert = int(m["layer"]), int(m["expert"])
    return layer < len(layout.moe_prefixes) and expert < layout.experts_per_layer[layout.moe_prefixes[layer]]


def detect(ref: CheckpointRef, states: dict, cfg: ModelConfig) -> tuple:
    """`(kind, world, bf16)` of the checkpoint from its files and metadata."""
    floats = [t for t in states[MODULE_KEY].values() if torch.is_tensor(t) and t.is_floating_point()]
    bf16 = bool(floats) and floats[0].dtype == torch.bfloat16
    world = states.get(DP_WORLD_KEY)
    if not isinstance(world, int) or world < 1:
        raise ConvertError(f"'{ref.tag_dir / MODEL_STATES}' has no valid 'dp_world_size'")
    if states.get(MP_WORLD_KEY, 1) != 1:
        raise ConvertError(f"'{ref.tag_dir}' was saved with model parallelism ({states.get(MP_WORLD_KEY)}); "
                           "not supported")
    zero = states.get(PARAM_SHAPES_KEY) is not None
    if zero:
        kind = "zero"
    else:
        kind = "fp16opt" if bf16 else "torch"
    ep = cfg.moe.ep_size if cfg.moe is not None else 1
    if world % ep:
        raise ConvertError(f"'{ref.tag_dir}': world size {world} is not a multiple of the config's ep_size {ep}")
    return kind, world, bf16

