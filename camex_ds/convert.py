"""Checkpoint conversion: DeepSpeed checkpoints <-> the consolidated format, EP resharding, upcycling, folding.

* `consolidate`: a DeepSpeed checkpoint (ZeRO 0, 1 or 2; fp32 or bf16; any ep_size and world size)
  -> a consolidated folder (`camex_ds.pretrained`): experts renumbered by their global id, the
  ep_size=1 model's state dict, the config and the run's tokenizer.
* `reshard`: a DeepSpeed checkpoint -> the same checkpoint for another expert-parallel degree (and,
  for ZeRO 1/2, another data-parallel world size), optimizer state included, that
  `launcher/pretrain.py --resume --ep_size K` continues from. Files are rewritten directly: no process
  group is needed, so a checkpoint of any size of job can be resharded on one machine.
* `upcycle`: a consolidated dense model -> a consolidated MoE model computing exactly the same function.
* `fold`: a consolidated `camex*` model -> its Euclidean twin with the (constant) curvature folded into
  the experts: same outputs, no curvature factors.

How DeepSpeed lays out a MoE checkpoint (tag folder, DeepSpeed 0.19):

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

Errors are `ConvertError`s with one line naming the file, tensor or value at fault.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .config import ConfigError, ModelConfig
from .pretrained import (
    EXPERT_RE,
    PretrainedError,
    atomic_output_dir,
    check_state_dict,
    find_tokenizer,
    meta_model,
    read_config,
    read_weights,
    reference_shapes,
    save_pretrained,
    single_rank_config,
)

PathLike = Union[str, os.PathLike]
MODEL_STATES = "mp_rank_00_model_states.pt"
LATEST = "latest"
EUCLIDEAN_TWIN = {"camex": "euclid", "camex-ties": "euclid", "camex-dare": "dare"}


class ConvertError(ValueError):
    """An input of a conversion is missing or unusable; the message is one line naming it."""


def _fail(message: str) -> None:
    raise ConvertError(message)


def _torch_load(path: Path, what: str = "checkpoint file"):
    if not path.is_file():
        _fail(f"{what} '{path}' is missing")
    try:
        # DeepSpeed's files pickle config objects and enums; they are read as DeepSpeed itself reads them.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...: all mean the same thing to the user
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(f"{what} '{path}' is unreadable or truncated ({detail[:160]})")


def _config_from(raw, what: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        _fail(f"{what}: {e}")


# ================================================================================================================
# locating a checkpoint


@dataclass
class CheckpointRef:
    root: Path  # the folder holding `latest` and the tag folders (a run's checkpoints/)
    tag: str
    run_dir: Optional[Path]  # the run's output dir (train_args.json, model_config.json), when known

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def _tags(root: Path) -> list:
    return sorted((p.name for p in root.iterdir() if p.is_dir() and (p / MODEL_STATES).is_file()),
                  key=lambda t: (len(t), t)) if root.is_dir() else []


def resolve_checkpoint(path: PathLike, tag: Optional[str] = None) -> CheckpointRef:
    """Accept a run's output dir, its checkpoints/ dir, or a tag folder; pick `tag` or the one `latest` names."""
    path = Path(path)
    if not path.exists():
        _fail(f"checkpoint path '{path}' does not exist")
    if not path.is_dir():
        _fail(f"checkpoint path '{path}' is not a folder")
    if (path / MODEL_STATES).is_file():  # a tag folder itself
        if tag is not None and tag != path.name:
            _fail(f"--tag {tag} contradicts the checkpoint folder '{path}' (tag {path.name})")
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
                _fail(f"no DeepSpeed checkpoint in '{path}' (no '{LATEST}' file and no tag folder with {MODEL_STATES})")
            _fail(f"'{root}' has no '{LATEST}' file: pass --tag (available: {', '.join(available)})")
        tag = latest.read_text().strip()
        if not tag:
            _fail(f"'{latest}' is empty")
    if not (root / tag).is_dir():
        hint = f"available: {', '.join(available)}" if available else "there are no tags"
        _fail(f"checkpoint tag '{tag}' does not exist in '{root}' ({hint})")
    return CheckpointRef(root, tag, run_dir)


# ================================================================================================================
# the optimizer's parameter groups, as the training loop builds them, for any EP degree


@dataclass
class GroupSpec:
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
        if m is None:
            return local_name
        layer = m["prefix"][: -len(".deepspeed_moe.experts.deepspeed_experts.")]
        return f"{m['prefix']}{ep_rank * self.local_counts[layer] + int(m['id'])}{m['rest']}"

    def group_names(self, g: GroupSpec, ep_rank: int) -> list:
        return [self.to_global(n, ep_rank) for n in g.local_names]


def build_layout(cfg: ModelConfig, ep: int) -> Layout:
    """Simulate `camex_ds.model.param_groups` on a meta-device model holding one EP rank's experts."""
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.layer import MoE
    from torch import nn

    from .model import param_groups

    cfg1 = single_rank_config(cfg)
    model = meta_model(cfg1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    moe_prefixes = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    experts_per_layer, local_counts = {}, {}
    for prefix in moe_prefixes:
        experts = next(m for n, m in model.named_modules() if n == prefix + ".deepspeed_moe.experts")
        assert isinstance(experts, Experts)
        total = len(experts.deepspeed_experts)
        if total % ep:
            _fail(f"ep_size={ep} does not divide the {total} experts of MoE layer '{prefix}'")
        experts_per_layer[prefix], local_counts[prefix] = total, total // ep
        experts.deepspeed_experts = nn.ModuleList(list(experts.deepspeed_experts)[: total // ep])
        for p in experts.parameters():
            p.group_name = f"ep_size_{ep}"
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
        try:
            raw = json.loads((ref.run_dir / "model_config.json").read_text())
        except json.JSONDecodeError as e:
            _fail(f"{what} is not valid JSON ({e})")
    if raw is None:
        _fail(f"'{ref.tag_dir / MODEL_STATES}' has no 'model_config' in its client state and no model_config.json "
              "is next to it: this is not a checkpoint of launcher/pretrain.py")
    cfg = _config_from(raw, what)
    if cfg.vocab_size is None:
        _fail(f"{what} has no vocab_size")
    return cfg


def read_model_states(ref: CheckpointRef) -> tuple:
    states = _torch_load(ref.tag_dir / MODEL_STATES, "model states file")
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        _fail(f"'{ref.tag_dir / MODEL_STATES}' has no 'module' state dict: not a DeepSpeed model states file")
    return states, _checkpoint_config(ref, states)


def read_weights_from_checkpoint(ref: CheckpointRef, states: dict, layout: Layout) -> dict:
    """The model's weights (ep_size=1 names) from 'module' and the per-expert files, checked."""
    weights = {}
    module = states["module"]
    for name, t in module.items():
        if EXPERT_RE.match(name):
            _fail(f"'{ref.tag_dir / MODEL_STATES}' holds expert tensor '{name}' among the non-expert weights")
        weights[name] = t
    for layer_id, prefix in enumerate(layout.moe_prefixes):
        for e in range(layout.experts_per_layer[prefix]):
            file = ref.tag_dir / f"layer_{layer_id}_expert_{e}_mp_rank_00_model_states.pt"
            sd = _torch_load(file, f"expert file (MoE layer '{prefix}', expert {e})")
            if not isinstance(sd, dict) or not sd:
                _fail(f"expert file '{file}' holds no tensors")
            want = f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}."
            for name, t in sd.items():
                if not name.startswith(want):
                    _fail(f"expert file '{file}' holds '{name}', expected names starting with '{want}' "
                          "(does the checkpoint match its model config?)")
                weights[name] = t
    extra = [f for f in sorted(ref.tag_dir.glob("layer_*_expert_*_mp_rank_*_model_states.pt"))
             if not _expert_file_expected(f.name, layout)]
    if extra:
        _fail(f"'{extra[0]}' is not an expert of the model the config describes (the config does not match "
              "the checkpoint)")
    try:
        check_state_dict(weights, layout.cfg, f"checkpoint '{ref.tag_dir}'")
    except PretrainedError as e:
        _fail(str(e))
    return weights


def _expert_file_expected(filename: str, layout: Layout) -> bool:
    m = re.fullmatch(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt", filename)
    if m is None:
        return False
    layer, expert = int(m[1]), int(m[2])
    return layer < len(layout.moe_prefixes) and expert < layout.experts_per_layer[layout.moe_prefixes[layer]]


def _detect(ref: CheckpointRef, states: dict, cfg: ModelConfig) -> tuple:
    """`(kind, world, bf16)` of the checkpoint from its files and metadata."""
    floats = [t for t in states["module"].values() if torch.is_tensor(t) and t.is_floating_point()]
    bf16 = bool(floats) and floats[0].dtype == torch.bfloat16
    world = states.get("dp_world_size")
    if not isinstance(world, int) or world < 1:
        _fail(f"'{ref.tag_dir / MODEL_STATES}' has no valid 'dp_world_size'")
    if states.get("mp_world_size", 1) != 1:
        _fail(f"'{ref.tag_dir}' was saved with model parallelism ({states.get('mp_world_size')}); not supported")
    zero = states.get("param_shapes") is not None
    if zero:
        kind = "zero"
    else:
        kind = "fp16opt" if bf16 else "torch"
    ep = cfg.moe.ep_size if cfg.moe is not None else 1
    if world % ep:
        _fail(f"'{ref.tag_dir}': world size {world} is not a multiple of the config's ep_size {ep}")
    return kind, world, bf16


def _zero_file(tag_dir: Path, rank: int, bf16: bool) -> Path:
    return tag_dir / f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _expp_file(tag_dir: Path, ep_rank: int) -> Path:
    return tag_dir / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def read_universal(ref: CheckpointRef, with_optimizer: bool = True, loaded: Optional[tuple] = None) -> Universal:
    """Read a checkpoint completely: weights, and (if asked) fp32 masters and optimizer state by name.

    `loaded` is `read_model_states(ref)` when the caller has it already.
    """
    states, cfg = loaded if loaded is not None else read_model_states(ref)
    ep = cfg.moe.ep_size if cfg.moe is not None else 1
    layout = build_layout(cfg, ep)
    weights = read_weights_from_checkpoint(ref, states, layout)
    kind, world, bf16 = _detect(ref, states, cfg)
    uni = Universal(cfg=cfg, states=states, weights=weights, kind=kind, world=world, bf16=bf16)
    if with_optimizer:
        if kind == "zero":
            _read_zero_optimizer(ref, uni, layout)
        else:
            _read_torch_optimizer(ref, uni, layout)
    return uni


def _optimizer_files_torch(ref: CheckpointRef, uni: Universal, layout: Layout) -> list:
    if uni.cfg.moe is None:
        return [(0, ref.tag_dir / MODEL_STATES, uni.states)]
    out = []
    for e in range(layout.ep):
        file = _expp_file(ref.tag_dir, e)
        out.append((e, file, _torch_load(file, "optimizer states file")))
    return out


def _read_torch_optimizer(ref: CheckpointRef, uni: Universal, layout: Layout) -> None:
    """ZeRO 0: per EP rank a torch optimizer state dict (fp32), or DeepSpeed's FP16_Optimizer state (bf16)."""
    masters = {} if uni.kind == "fp16opt" else None
    for e, file, content in _optimizer_files_torch(ref, uni, layout):
        opt = content.get("optimizer") if isinstance(content, dict) else None
        if not isinstance(opt, dict):
            _fail(f"'{file}' has no optimizer state (was the checkpoint saved without its optimizer?)")
        if uni.kind == "fp16opt":
            if "optimizer_state_dict" not in opt or "fp32_groups" not in opt:
                _fail(f"'{file}' is not a bf16 FP16_Optimizer state (keys: {', '.join(map(str, opt))})")
            torch_sd, fp32_groups = opt["optimizer_state_dict"], opt["fp32_groups"]
            if e == 0:
                uni.extra["fp16opt"] = {k: v for k, v in opt.items() if k not in ("optimizer_state_dict", "fp32_groups")}
        else:
            torch_sd, fp32_groups = opt, None
            if "state" not in torch_sd or "param_groups" not in torch_sd:
                _fail(f"'{file}' holds no torch optimizer state dict")
        pgroups = torch_sd["param_groups"]
        sizes = [len(g["params"]) for g in pgroups]
        want = [len(g.local_names) for g in layout.groups]
        if sizes != want:
            _fail(f"'{file}': optimizer param groups have {sizes} parameters but the model config with ep_size "
                  f"{layout.ep} implies {want} (config and checkpoint do not match)")
        for gi, (spec, pg) in enumerate(zip(layout.groups, pgroups)):
            if e > 0 and not spec.moe:
                continue  # replicated: taken from EP rank 0
            hp = {k: v for k, v in pg.items() if k != "params"}
            for j, (local, idx) in enumerate(zip(spec.local_names, pg["params"])):
                name = layout.to_global(local, e)
                shape = layout.shapes[name]
                uni.hparams[name] = hp
                st = torch_sd["state"].get(idx)
                if st is not None:
                    uni.opt_state[name] = {k: _shaped(v, shape, f"'{file}' state of '{name}' ({k})")
                                           for k, v in st.items()}
                if fp32_groups is not None:
                    master = fp32_groups[gi][j]
                    masters[name] = _shaped(master, shape, f"'{file}' fp32 copy of '{name}'")
    uni.masters = masters
    _check_complete(uni, layout, ref)


def _shaped(value, shape: tuple, what: str):
    """Per-parameter optimizer tensors to the parameter's shape; scalars (step) as they are."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    if value.numel() != math.prod(shape):
        _fail(f"{what} has {value.numel()} elements, the parameter has {math.prod(shape)} (shape {list(shape)})")
    return value.reshape(shape)


def _check_complete(uni: Universal, layout: Layout, ref: CheckpointRef) -> None:
    missing = [n for n in layout.shapes if n not in uni.hparams]
    if missing:
        _fail(f"the optimizer state in '{ref.tag_dir}' does not cover parameter '{missing[0]}'")


def _read_zero_optimizer(ref: CheckpointRef, uni: Universal, layout: Layout) -> None:
    """ZeRO 1/2: reassemble every parameter's fp32 master and optimizer state from the ranks' flat partitions."""
    ep = layout.ep
    fragments = {}  # name -> list of (rank, fp32 fragment, {key: fragment})
    scalars, key_order = {}, {}
    for r in range(uni.world):
        file = _zero_file(ref.tag_dir, r, uni.bf16)
        content = _torch_load(file, "ZeRO optimizer states file")
        osd = content.get("optimizer_state_dict") if isinstance(content, dict) else None
        if not isinstance(osd, dict) or "single_partition_of_fp32_groups" not in osd:
            _fail(f"'{file}' is not a ZeRO stage 1/2 optimizer state")
        if r == 0:
            uni.extra["zero"] = {k: osd[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad",
                                                     "zero_stage", "ds_version") if k in osd}
            uni.extra["file"] = {k: v for k, v in content.items() if k != "optimizer_state_dict"}
        partitions = osd["single_partition_of_fp32_groups"]
        mappings = osd.get("param_slice_mappings")
        if mappings is None:
            _fail(f"'{file}' has no param_slice_mappings (saved by a DeepSpeed too old to reshard)")
        if len(partitions) != len(layout.groups) or len(mappings) != len(layout.groups):
            _fail(f"'{file}' has {len(partitions)} param groups but the config with ep_size {ep} implies "
                  f"{len(layout.groups)} (config and checkpoint do not match)")
        base = osd["base_optimizer_state"]
        if not isinstance(base, dict):
            _fail(f"'{file}' uses the elastic ZeRO checkpoint format, which does not record the optimizer "
                  "hyperparameters per group: not supported (save with elastic_checkpoint false, the default)")
        for gi, spec in enumerate(layout.groups):
            pg = base["param_groups"][gi]  # rigid format: a torch state dict with one flat parameter per group
            gstate = base["state"].get(pg["params"][0], {})
            hp = {k: v for k, v in pg.items() if k != "params"}
            partition = partitions[gi]
            local = set(spec.local_names)
            for local_name, addr in mappings[gi].items():
                if local_name not in local:
                    _fail(f"'{file}' holds parameter '{local_name}' in group {gi}, which the config does not put "
                          "there (config and checkpoint do not match)")
                name = layout.to_global(local_name, r % ep) if spec.moe else local_name
                start, numel = int(addr.start), int(addr.numel)
                if start + numel > partition.numel():
                    _fail(f"'{file}': fragment of '{local_name}' [{start}, {start + numel}) lies outside its "
                          f"partition of {partition.numel()} elements")
                states = {}
                for k, v in gstate.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        states[k] = v.narrow(0, start, numel)
                    else:
                        scalars.setdefault(name, {})[k] = v
                fragments.setdefault(name, []).append((r, partition.narrow(0, start, numel), states))
                key_order.setdefault(name, list(gstate.keys()))
                uni.hparams.setdefault(name, hp)
    masters = {}
    for name, shape in layout.shapes.items():
        parts = fragments.get(name)
        if not parts:
            _fail(f"no ZeRO partition in '{ref.tag_dir}' holds parameter '{name}'")
        flat = torch.cat([p[1] for p in parts])
        if flat.numel() != math.prod(shape):
            _fail(f"the ZeRO partitions in '{ref.tag_dir}' hold {flat.numel()} elements of '{name}', its shape "
                  f"{list(shape)} has {math.prod(shape)}")
        masters[name] = flat.reshape(shape).clone()
        st = {}
        for k in key_order.get(name, ()):  # the optimizer's own key order
            if k in parts[0][2]:
                st[k] = torch.cat([p[2][k] for p in parts]).reshape(shape).clone()
            else:
                st[k] = scalars[name][k]
        uni.opt_state[name] = st
    uni.masters = masters


# ================================================================================================================
# the tokenizer of a run


def find_run_data(ref: CheckpointRef, states: dict) -> tuple:
    """`(tokenizer path, prepared dataset path or None)` of the run that wrote the checkpoint.

    Looked up in this order: a prepared dataset recorded in the client state or train_args.json
    (keys 'prepared_data', 'dataset_path', 'dataset'), a --data that was a prepared dataset, a recorded
    --tokenizer, and finally the run's dataset cache through `prepare_data` with the run's settings
    (a cache hit costs nothing; a deleted cache entry is rebuilt, identically, from the run's data).
    """
    from .data import DataError, PreparedDataset, is_prepared_dataset, prepare_data

    args = {}
    if ref.run_dir is not None and (ref.run_dir / "train_args.json").is_file():
        try:
            args = json.loads((ref.run_dir / "train_args.json").read_text())
        except json.JSONDecodeError as e:
            _fail(f"'{ref.run_dir / 'train_args.json'}' is not valid JSON ({e})")
    for key in ("prepared_data", "dataset_path", "dataset"):
        for source in (states, args):
            value = source.get(key)
            if isinstance(value, str) and is_prepared_dataset(value):
                return PreparedDataset.open(value).tokenizer_path, Path(value)
    data = args.get("data")
    if data is not None and is_prepared_dataset(data):
        return PreparedDataset.open(data).tokenizer_path, Path(data)
    for key in ("tokenizer_path", "tokenizer"):
        for source in (states, args):
            value = source.get(key)
            if isinstance(value, str) and value:
                if not Path(value).exists():
                    _fail(f"the run's tokenizer '{value}' (recorded as '{key}') does not exist; pass --tokenizer")
                return Path(value), None
    if not args:
        _fail(f"cannot find the run's tokenizer: no train_args.json next to '{ref.root}'; pass --tokenizer")
    cache = args.get("cache_dir") or os.environ.get("CAMEX_DS_CACHE", str(Path.home() / ".cache" / "camex_ds"))
    try:
        prepared = prepare_data(data, None, cache, vocab_size=args.get("vocab_size", 4096))
    except DataError as e:
        _fail(f"cannot find the run's tokenizer through its data ({e}); pass --tokenizer")
    return prepared.tokenizer_path, prepared.path


def _check_tokenizer(path: Path, cfg: ModelConfig) -> Path:
    from .data import DataError, Tokenizer

    try:
        tok = Tokenizer.load(path)
    except DataError as e:
        _fail(str(e))
    if tok.vocab_size > cfg.vocab_size:
        _fail(f"tokenizer '{path}' has {tok.vocab_size} pieces, more than the model's vocab_size {cfg.vocab_size}: "
              "it is not the run's tokenizer")
    return Path(path)


# ================================================================================================================
# consolidate


def consolidate(checkpoint: PathLike, output: PathLike, tag: Optional[str] = None, dtype: str = "fp32",
                tokenizer: Optional[PathLike] = None) -> dict:
    """DeepSpeed checkpoint -> consolidated folder. fp32 output of a bf16 run uses the fp32 master weights."""
    if dtype not in ("fp32", "bf16"):
        _fail(f"--dtype {dtype!r} is invalid: expected fp32 or bf16")
    ref = resolve_checkpoint(checkpoint, tag)
    states, cfg = read_model_states(ref)
    state, uni, bf16, need_masters = _weights(ref, states, cfg, dtype)
    tok, dataset = (Path(tokenizer), None) if tokenizer else find_run_data(ref, states)
    tok = _check_tokenizer(tok, cfg)
    cfg1 = single_rank_config(cfg)
    info = {"source": str(ref.tag_dir.resolve()), "tag": ref.tag, "step": states.get("step"),
            "dataset": str(Path(dataset).resolve()) if dataset else None,
            "trained_ep_size": cfg.moe.ep_size if cfg.moe else None, "world_size": uni.world,
            "zero_stage": _zero_stage(uni), "trained_dtype": "bf16" if bf16 else "fp32",
            "weights": "fp32 master copies" if need_masters else "model weights"}
    with atomic_output_dir(output) as work:
        save_pretrained(work, state, cfg1, tok, dtype=dtype, conversion={"command": "consolidate", **info})
    return {"output": str(output), **info}


def _weights(ref: CheckpointRef, states: dict, cfg: ModelConfig, dtype: str) -> tuple:
    """`(weights, universal, bf16, from masters)`: the model's weights (ep_size=1 names) to write in `dtype`;
    fp32 weights of a bf16 run are its fp32 master copies."""
    _, _, bf16 = _detect(ref, states, cfg)
    need_masters = bf16 and dtype == "fp32"
    uni = read_universal(ref, with_optimizer=need_masters, loaded=(states, cfg))
    return (uni.masters if need_masters else uni.weights), uni, bf16, need_masters


def fp32_weights(checkpoint: PathLike, tag: Optional[str] = None) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint, every expert under its global id: what DeepSpeed's
    zero_to_fp32 extracts, for the expert-parallel checkpoints it cannot read."""
    ref = resolve_checkpoint(checkpoint, tag)
    return _weights(ref, *read_model_states(ref), "fp32")[0]


def _zero_stage(uni: Universal) -> Optional[int]:
    """The ZeRO stage the run used, from the DeepSpeed config saved with it (None if unreadable)."""
    try:
        return int((uni.states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    except (AttributeError, TypeError, ValueError):
        return None


# ================================================================================================================
# reshard


def reshard(checkpoint: PathLike, ep_size: int, output: PathLike, tag: Optional[str] = None,
            world_size: Optional[int] = None) -> dict:
    """Rewrite a checkpoint for expert-parallel degree `ep_size` (and world size, for ZeRO 1/2)."""
    ref = resolve_checkpoint(checkpoint, tag)
    uni = read_universal(ref, with_optimizer=True)
    cfg = uni.cfg
    if cfg.moe is None:
        _fail("the checkpoint's model is dense (moe is null): there is no expert-parallel layout to change")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        _fail(f"--ep_size {ep_size!r} is invalid: expected an integer >= 1")
    try:
        target_cfg = cfg.with_moe(ep_size=ep_size)
    except ConfigError as e:
        _fail(f"--ep_size {ep_size}: {e}")
    # ZeRO 1/2 files are per data-parallel rank, so the target world size matters; without ZeRO it only
    # sets which ranks' RNG states are carried over.
    world = ep_size if world_size is None else world_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or world % ep_size:
        _fail(f"--world_size {world!r} is invalid: expected a positive multiple of --ep_size {ep_size}")
    dst_layout = build_layout(cfg, ep_size)
    with atomic_output_dir(output) as work:
        tag_dir = work / ref.tag
        tag_dir.mkdir()
        states = _target_states(uni, target_cfg, world)
        if uni.kind == "zero":
            shapes0 = []
            for r in range(world):
                osd, param_shapes = _zero_partition_state(uni, dst_layout, r, world)
                if r == 0:
                    shapes0 = param_shapes
                content = {"optimizer_state_dict": osd, **uni.extra.get("file", {})}
                torch.save(content, _zero_file(tag_dir, r, uni.bf16))
            states["param_shapes"] = shapes0
        else:
            for e in range(ep_size):
                opt = _torch_optimizer_state(uni, dst_layout, e)
                torch.save({"optimizer": opt}, _expp_file(tag_dir, e))
                if e == 0:
                    states["optimizer"] = opt
        torch.save(states, tag_dir / MODEL_STATES)
        for file in sorted(ref.tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
            shutil.copyfile(file, tag_dir / file.name)  # keyed by global expert id: layout independent
        for r in range(world):
            rng = ref.tag_dir / f"rng_state_rank{r}.pt"
            if rng.is_file():
                shutil.copyfile(rng, tag_dir / rng.name)
        from .train import manifest

        manifest.write(tag_dir, _resharded_run(ref, target_cfg))
        (work / LATEST).write_text(ref.tag)
    return {"output": str(output), "tag": ref.tag, "from_ep_size": cfg.moe.ep_size, "ep_size": ep_size,
            "from_world_size": uni.world, "world_size": world, "optimizer": uni.kind}


def _resharded_run(ref: CheckpointRef, target_cfg: ModelConfig) -> Optional[dict]:
    """The source's run record (manifest.py) with the new layout, so `--resume --ep_size K` checks it."""
    from .train import manifest

    try:
        run = manifest.read(ref.tag_dir).get("run")
    except ValueError:  # a checkpoint from before manifests
        return None
    return {**run, "model_config": target_cfg.to_dict()} if isinstance(run, dict) else None


def _target_states(uni: Universal, target_cfg: ModelConfig, world: int) -> dict:
    states = dict(uni.states)
    states["model_config"] = target_cfg.to_dict()
    states["dp_world_size"] = world
    return states


def _group_hparams(uni: Universal, spec: GroupSpec, names: list) -> dict:
    hp = dict(uni.hparams[names[0]]) if names else {}
    hp["name"] = spec.name
    if spec.moe:
        hp["moe"] = True
    else:
        hp.pop("moe", None)
    return hp


def _torch_optimizer_state(uni: Universal, layout: Layout, ep_rank: int) -> dict:
    """ZeRO 0 target: a torch optimizer state dict for EP rank `ep_rank` (wrapped for bf16)."""
    state, groups, idx = {}, [], 0
    fp32_groups = []
    for spec in layout.groups:
        names = layout.group_names(spec, ep_rank)
        params = []
        masters = []
        for name in names:
            st = uni.opt_state.get(name)
            if st is not None:
                state[idx] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            params.append(idx)
            idx += 1
            if uni.kind == "fp16opt":
                masters.append(uni.masters[name].clone())
        groups.append({**_group_hparams(uni, spec, names), "params": params})
        fp32_groups.append(masters)
    torch_sd = {"state": state, "param_groups": groups}
    if uni.kind != "fp16opt":
        return torch_sd
    return {**uni.extra.get("fp16opt", {}), "optimizer_state_dict": torch_sd, "fp32_groups": fp32_groups}


def _zero_partition_state(uni: Universal, layout: Layout, rank: int, world: int) -> tuple:
    """ZeRO 1/2 target: the optimizer state DeepSpeed's stage 1/2 optimizer saves on `rank` (rigid format).

    Mirrors `DeepSpeedZeroOptimizer.__init__`: per group the parameters are flattened in group order
    (with per-parameter padding when `parameter_alignment` is on), padded to a multiple of
    2 x the group's data-parallel size, and cut into equal partitions.
    """
    from deepspeed.utils.tensor_fragment import fragment_address

    ep = layout.ep
    ds = uni.states.get("ds_config") or {}
    aligned = bool((ds.get("zero_optimization") or {}).get("parameter_alignment", False))
    element_size = 2 if uni.bf16 else 4
    param_alignment = 16 // math.gcd(16, element_size) if aligned else 1
    partitions, base_state, pgroups, paddings, param_paddings, counts, mappings, shapes0 = [], {}, [], [], [], [], [], []
    for gi, spec in enumerate(layout.groups):
        dp = world // ep if spec.moe else world
        pid = rank // ep if spec.moe else rank
        names = layout.group_names(spec, rank % ep) if spec.moe else list(spec.local_names)
        pads, offsets, offset = [], [], 0
        for j, name in enumerate(names):
            offsets.append(offset)
            numel = uni.masters[name].numel()
            offset += numel
            pad = 0 if j == len(names) - 1 else (-offset) % param_alignment
            pads.append(pad)
            offset += pad
        padded = offset
        alignment = 2 * dp
        total = int(math.ceil(padded / alignment)) * alignment
        size = total // dp
        left = pid * size
        if padded <= left:
            group_pad = size
        elif padded < left + size:
            group_pad = left + size - padded
        else:
            group_pad = 0

        def flat_partition(get) -> torch.Tensor:
            out = torch.zeros(size, dtype=torch.float32)
            for name, off in zip(names, offsets):
                lo, hi = max(off, left), min(off + uni.masters[name].numel(), left + size)
                if lo < hi:
                    out[lo - left:hi - left] = get(name).reshape(-1)[lo - off:hi - off].float()
            return out

        fp32 = flat_partition(lambda n: uni.masters[n])
        partitions.append(fp32[:size - group_pad].clone())
        st0 = uni.opt_state.get(names[0], {}) if names else {}
        gstate = {}
        for k, v in st0.items():
            if torch.is_tensor(v) and v.dim() > 0:
                gstate[k] = flat_partition(lambda n, k=k: uni.opt_state[n][k])
            else:
                gstate[k] = v.clone() if torch.is_tensor(v) else v
        if gstate:
            base_state[gi] = gstate
        pgroups.append({**_group_hparams(uni, spec, names), "params": [gi]})
        paddings.append(group_pad)
        param_paddings.append(pads)
        counts.append(dp)
        mapping = OrderedDict()
        for local, name, off in zip(spec.local_names, names, offsets):
            lo, hi = max(off, left), min(off + uni.masters[name].numel(), left + size)
            if lo < hi:
                mapping[local] = fragment_address(numel=hi - lo, start=lo - left)
        mappings.append(mapping)
        shapes0.append(OrderedDict((local, torch.Size(layout.shapes[name])) for local, name in zip(spec.local_names, names)))
    extra = uni.extra.get("zero", {})
    osd = {
        "loss_scaler": extra.get("loss_scaler"),
        "dynamic_loss_scale": extra.get("dynamic_loss_scale", False),
        "overflow": extra.get("overflow", False),
        "clip_grad": extra.get("clip_grad", 0.0),
        "base_optimizer_state": {"state": base_state, "param_groups": pgroups},
        "single_partition_of_fp32_groups": partitions,
        "zero_stage": extra.get("zero_stage"),
        "group_paddings": paddings,
        "param_alignment_paddings": param_paddings,
        "partition_count": counts,
        "ds_version": extra.get("ds_version"),
        "param_slice_mappings": mappings,
    }
    return osd, shapes0


# ================================================================================================================
# upcycle


def _read_consolidated(path: PathLike) -> tuple:
    try:
        cfg, raw = read_config(path)
        state = read_weights(path, cfg)
    except PretrainedError as e:
        _fail(str(e))
    return cfg, raw, state


def upcycle(input_dir: PathLike, moe_config: PathLike, output: PathLike, noise: float = 0.0, seed: int = 0) -> dict:
    """Dense consolidated model -> MoE model whose experts and bases are copies of each layer's dense FFN.

    With all experts equal to the base every task vector is exactly zero, so merge layers compute the
    dense FFN whatever their gates (dynamic chains too, when alpha = 1: Ŵ^l = Ŵ^{l-1} + Σ g (FFN_l − Ŵ^{l-1})
    with gates summing to 1). Routers start as configured (random gate, zero noise weights), curvature
    factors at identity. `noise > 0` adds N(0, noise²) to every expert copy (symmetry breaking; then
    the function is no longer exactly the dense one).
    """
    from .model import GPT

    cfg, raw_cfg, dense = _read_consolidated(input_dir)
    if cfg.moe is not None:
        _fail(f"'{input_dir}' is a {cfg.method} model: upcycle starts from a dense model (moe null)")
    path = Path(moe_config)
    if not path.is_file():
        _fail(f"MoE config '{path}' does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        _fail(f"MoE config '{path}' is not valid JSON ({e})")
    if not isinstance(raw, dict):
        _fail(f"MoE config '{path}' must be a JSON object")
    if "moe" in raw:  # a whole model config: its dimensions must be the dense model's
        for key, value in raw.items():
            if key != "moe" and key in cfg.to_dict() and value is not None and cfg.to_dict()[key] != value:
                _fail(f"MoE config '{path}' sets {key}={value!r} but the dense model has {cfg.to_dict()[key]!r}")
        raw = raw["moe"]
    if not isinstance(raw, dict) or raw.get("method") in (None, "dense"):
        _fail(f"MoE config '{path}' must give a MoE 'method' (one of smoe, euclid, ties, dare, camex, camex-ties, "
              "camex-dare)")
    raw = {**raw, "ep_size": 1}
    new_cfg = _config_from({**cfg.to_dict(), "moe": raw}, f"MoE config '{path}'")
    if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
        _fail(f"--noise {noise!r} is invalid: expected a number >= 0")
    moe = new_cfg.moe
    if moe.dynamic and moe.alpha != 1.0 and noise == 0:
        _fail(f"a dynamic chain with alpha={moe.alpha} cannot reproduce the dense model (Ŵ^l = (1-α)Ŵ^(l-1) + α FFN_l): "
              "use alpha 1.0")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(new_cfg)  # fresh routers and identity curvature, everything else overwritten below
    state = model.state_dict()
    dtype = next(v.dtype for v in dense.values() if v.is_floating_point())
    matrices = [n for n in ("w_in", "w_out", "w_gate", "w_up", "w_down")
                if any(k.endswith(f".ffn.{n}") for k in dense)]
    out, fresh = {}, []
    for name, value in state.items():
        if name in dense:
            out[name] = dense[name].clone()
            continue
        # an expert's matrix or bias (smoe experts own GPT-2's FFN biases; merge layers share the dense ones)
        m = re.match(r"^blocks\.(\d+)\.ffn\.(?:base\.|deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.)"
                     r"((?:bias\.)?(\w+))$", name)
        if m and m[4] in matrices:
            src = dense.get(f"blocks.{m[1]}.ffn.{m[3]}")
            if src is None:
                _fail(f"'{input_dir}' lacks the dense FFN 'blocks.{m[1]}.ffn.{m[3]}' needed for '{name}'")
            copy_ = src.clone()
            if m[2] is not None and noise > 0:
                copy_ = (copy_.float() + noise * torch.randn(copy_.shape, generator=gen)).to(copy_.dtype)
            out[name] = copy_
            continue
        if ".router." in name or ".curvature." in name or ".gate.wg." in name:
            out[name] = value.to(dtype)
            fresh.append(name)
            continue
        _fail(f"cannot initialise '{name}' from the dense model '{input_dir}'")
    notes = []
    if moe.method == "smoe":
        notes.append("smoe: token routing with top-1 gate scaling or capacity drops does not reproduce the dense "
                     "model exactly")
    info = {"command": "upcycle", "source": str(Path(input_dir).resolve()), "dataset": _dataset_of(raw_cfg),
            "noise": noise, "seed": seed, "fresh": len(fresh), "notes": notes}
    with atomic_output_dir(output) as work:
        save_pretrained(work, out, new_cfg, find_tokenizer(input_dir), dtype=_dtype_name(dtype),
                        conversion=info)
    return {"output": str(output), "method": moe.method, "moe_layers": new_cfg.moe_layers, **info}


def _dataset_of(raw_cfg: dict):
    """The training dataset a consolidated model's config.json records (carried over by upcycle and fold)."""
    conversion = raw_cfg.get("conversion")
    return conversion.get("dataset") if isinstance(conversion, dict) else None


def _dtype_name(dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


# ================================================================================================================
# fold


def _curvature_factors(state: dict, key: str, rank: int, shape) -> tuple:
    """One expert matrix's four factors (float64) from a state dict: flat (`key.flat`) or, as older
    checkpoints hold them, separately (`key.a` ... `key.d`)."""
    from .moe.layer import factor_shapes, split_factors

    if key + ".flat" in state:
        return split_factors(state[key + ".flat"].double(), factor_shapes(rank, *shape))
    return tuple(state[f"{key}.{f}"].double() for f in "abcd")


def fold(input_dir: PathLike, output: PathLike) -> dict:
    """Fold each expert's (constant) curvature into its task vector: E'_i = B + m_i ⊙ M_i(E_i − B).

    camex -> euclid and camex-dare -> dare (DARE's eval mask is 1) exactly. camex-ties -> euclid with
    the TIES mask folded in: TIES elects its mask from the raw task vectors, which the folded model no
    longer has (re-electing from M(τ) would change the function), and the mask is constant after
    training, so it goes into the experts and the model merges plainly. Dynamic chains are refused:
    there M_i applies to E_i − Ŵ_s, which depends on the segment.
    """
    from .moe import functional as Fn

    cfg, raw_cfg, state = _read_consolidated(input_dir)
    if cfg.moe is None or not cfg.moe.method.startswith("camex"):
        _fail(f"'{input_dir}' is a {cfg.method} model: only camex, camex-ties and camex-dare models have curvature "
              "to fold")
    if cfg.moe.dynamic:
        _fail(f"'{input_dir}' is a dynamic chain: its curvature acts on E - Ŵ_s, which depends on the segment, so it "
              "cannot be folded into the experts")
    twin = EUCLIDEAN_TWIN[cfg.moe.method]
    new_cfg = cfg.with_moe(method=twin)
    shapes = reference_shapes(new_cfg)
    out = {k: v for k, v in state.items() if ".curvature." not in k}
    for prefix, count in _moe_layers(state).items():
        for mat in _matrices(state, prefix):
            base = state[f"{prefix}.base.{mat}"].double()
            experts = torch.stack([state[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.{mat}"].double()
                                   for e in range(count)])
            factors = [torch.stack(fs, dim=1) for fs in zip(*(
                _curvature_factors(state, f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.curvature.{mat}",
                                   cfg.moe.curvature_rank, base.shape) for e in range(count)))]
            tau = experts - base
            curved = Fn.apply_curvature(tau, factors)
            if cfg.moe.mask == "ties":
                curved = curved * Fn.ties_mask(tau)
            folded = base + curved
            dtype = state[f"{prefix}.base.{mat}"].dtype
            for e in range(count):
                out[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.{mat}"] = folded[e].to(dtype)
    missing = [k for k in shapes if k not in out]
    if missing:
        _fail(f"folding '{input_dir}' left tensor '{missing[0]}' undefined")
    info = {"command": "fold", "source": str(Path(input_dir).resolve()), "dataset": _dataset_of(raw_cfg),
            "folded_from": cfg.moe.method,
            "mask": "ties mask folded into the experts" if cfg.moe.mask == "ties" else cfg.moe.mask}
    with atomic_output_dir(output) as work:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        save_pretrained(work, out, new_cfg, find_tokenizer(input_dir), dtype=_dtype_name(dtype),
                        conversion=info)
    return {"output": str(output), "method": twin, **info}


def _moe_layers(state: dict) -> dict:
    """Merge-layer prefix -> number of stored experts, from the state dict's names."""
    counts = {}
    for name in state:
        m = EXPERT_RE.match(name)
        if m:
            prefix = m["prefix"][: -len(".deepspeed_moe.experts.deepspeed_experts.")]
            counts[prefix] = max(counts.get(prefix, 0), int(m["id"]) + 1)
    return counts


def _matrices(state: dict, prefix: str) -> list:
    return [n for n in ("w_in", "w_out", "w_gate", "w_up", "w_down") if f"{prefix}.base.{n}" in state]


__all__ = ["ConvertError", "consolidate", "fold", "fp32_weights", "read_universal", "reshard", "resolve_checkpoint",
           "upcycle"]
