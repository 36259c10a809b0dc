"""DeepSpeed checkpoints -> the consolidated format (`consolidate`), and -> another expert-parallel layout (`reshard`).

* `consolidate`: a DeepSpeed checkpoint (ZeRO 0, 1 or 2; fp32 or bf16; any ep_size and world size)
  -> a consolidated folder (`ckpt.format`): experts renumbered by their global id, the ep_size=1
  model's state dict, the config and the run's tokenizer.
* `reshard`: a DeepSpeed checkpoint -> the same checkpoint for another expert-parallel degree (and,
  for ZeRO 1/2, another data-parallel world size), optimizer state included, that
  `launcher/pretrain.py --resume --ep_size K` continues from. Files are rewritten directly: no process
  group is needed, so a checkpoint of any size of job can be resharded on one machine.

Both read the checkpoint into a layout-free `Universal` (`read_universal`); the on-disk layout is
`ckpt.deepspeed`, the optimizer files `ckpt.optimizer`. Errors are one-line `ConvertError`s.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from ..config import DEFAULT_VOCAB_SIZE, ConfigError, ModelConfig, read_json_object
from ..deepspeed_adapter import (
    DP_WORLD_KEY,
    DS_CONFIG_KEY,
    EXPERT_FILES,
    LATEST,
    MODEL_STATES,
    OPTIMIZER_KEY,
    PARAM_SHAPES_KEY,
)
from .deepspeed import (
    CheckpointRef,
    Universal,
    build_layout,
    detect,
    expp_file,
    read_model_states,
    read_weights_from_checkpoint,
    resolve_checkpoint,
    rng_file,
    zero_file,
)
from .format import ConvertError, PathLike, atomic_output_dir, save_pretrained, single_rank_config
from .optimizer import read_torch_optimizer, read_zero_optimizer, torch_optimizer_state, zero_partition_state


def read_universal(ref: CheckpointRef, with_optimizer: bool = True, loaded: Optional[tuple] = None) -> Universal:
    """Read a checkpoint completely: weights, and (if asked) fp32 masters and optimizer state by name.

    `loaded` is `read_model_states(ref)` when the caller has it already.
    """
    states, cfg = loaded if loaded is not None else read_model_states(ref)
    ep = cfg.moe.ep_size if cfg.moe is not None else 1
    layout = build_layout(cfg, ep)
    weights = read_weights_from_checkpoint(ref, states, layout)
    kind, world, bf16 = detect(ref, states, cfg)
    uni = Universal(cfg=cfg, states=states, weights=weights, kind=kind, world=world, bf16=bf16)
    if with_optimizer:
        if kind == "zero":
            read_zero_optimizer(ref, uni, layout)
        else:
            read_torch_optimizer(ref, uni, layout)
    return uni


# ================================================================================================================
# the tokenizer of a run


def find_run_data(ref: CheckpointRef, states: dict) -> tuple:
    """`(tokenizer path, prepared dataset path or None)` of the run that wrote the checkpoint.

    Looked up in this order: a prepared dataset recorded in the client state or train_args.json
    (keys 'prepared_data', 'dataset_path', 'dataset'), a --data that was a prepared dataset, a recorded
    --tokenizer, and finally the run's dataset cache through `prepare_data` with the run's settings
    (a cache hit costs nothing; a deleted cache entry is rebuilt, identically, from the run's data).
    """
    from ..data import DataError, PreparedDataset, cache_dir, is_prepared_dataset, prepare_data

    args = {}
    if ref.run_dir is not None and (ref.run_dir / "train_args.json").is_file():
        args = read_json_object(ref.run_dir / "train_args.json", "training arguments", ConvertError)
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
                    raise ConvertError(f"the run's tokenizer '{value}' (recorded as '{key}') does not exist; pass "
                                       "--tokenizer")
                return Path(value), None
    if not args:
        raise ConvertError(f"cannot find the run's tokenizer: no train_args.json next to '{ref.root}'; pass "
                           "--tokenizer")
    try:
        prepared = prepare_data(data, None, cache_dir(args.get("cache_dir")),
                                vocab_size=args.get("vocab_size", DEFAULT_VOCAB_SIZE))
    except DataError as e:
        raise ConvertError(f"cannot find the run's tokenizer through its data ({e}); pass --tokenizer")
    return prepared.tokenizer_path, prepared.path


def _check_tokenizer(path: Path, cfg: ModelConfig) -> Path:
    from ..data import DataError, Tokenizer

    try:
        tok = Tokenizer.load(path)
    except DataError as e:
        raise ConvertError(str(e))
    if tok.vocab_size > cfg.vocab_size:
        raise ConvertError(f"tokenizer '{path}' has {tok.vocab_size} pieces, more than the model's vocab_size "
                           f"{cfg.vocab_size}: it is not the run's tokenizer")
    return Path(path)


# ================================================================================================================
# consolidate


def consolidate(checkpoint: PathLike, output: PathLike, tag: Optional[str] = None, dtype: str = "fp32",
                tokenizer: Optional[PathLike] = None) -> dict:
    """DeepSpeed checkpoint -> consolidated folder. fp32 output of a bf16 run uses the fp32 master weights."""
    if dtype not in ("fp32", "bf16"):
        raise ConvertError(f"--dtype {dtype!r} is invalid: expected fp32 or bf16")
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
    _, _, bf16 = detect(ref, states, cfg)
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
        return int((uni.states.get(DS_CONFIG_KEY) or {}).get("zero_optimization", {}).get("stage", 0))
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
        raise ConvertError("the checkpoint's model is dense (moe is null): there is no expert-parallel layout to "
                           "change")
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ConvertError(f"--ep_size {ep_size!r} is invalid: expected an integer >= 1")
    try:
        target_cfg = cfg.with_moe(ep_size=ep_size)
    except ConfigError as e:
        raise ConvertError(f"--ep_size {ep_size}: {e}")
    # ZeRO 1/2 files are per data-parallel rank, so the target world size matters; without ZeRO it only
    # sets which ranks' RNG states are carried over.
    world = ep_size if world_size is None else world_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1 or world % ep_size:
        raise ConvertError(f"--world_size {world!r} is invalid: expected a positive multiple of --ep_size {ep_size}")
    dst_layout = build_layout(cfg, ep_size)
    with atomic_output_dir(output) as work:
        tag_dir = work / ref.tag
        tag_dir.mkdir()
        states = _target_states(uni, target_cfg, world)
        if uni.kind == "zero":
            shapes0 = []
            for r in range(world):
                content, param_shapes = zero_partition_state(uni, dst_layout, r, world)
                if r == 0:
                    shapes0 = param_shapes
                torch.save(content, zero_file(tag_dir, r, uni.bf16))
            states[PARAM_SHAPES_KEY] = shapes0
        else:
            for e in range(ep_size):
                opt = torch_optimizer_state(uni, dst_layout, e)
                torch.save({OPTIMIZER_KEY: opt}, expp_file(tag_dir, e))
                if e == 0:
                    states[OPTIMIZER_KEY] = opt
        torch.save(states, tag_dir / MODEL_STATES)
        for file in sorted(ref.tag_dir.glob(EXPERT_FILES)):
            shutil.copyfile(file, tag_dir / file.name)  # keyed by global expert id: layout independent
        for r in range(world):
            rng = rng_file(ref.tag_dir, r)
            if rng.is_file():
                shutil.copyfile(rng, tag_dir / rng.name)
        from ..train import manifest

        manifest.write(tag_dir, _resharded_run(ref, target_cfg))
        (work / LATEST).write_text(ref.tag)
    return {"output": str(output), "tag": ref.tag, "from_ep_size": cfg.moe.ep_size, "ep_size": ep_size,
            "from_world_size": uni.world, "world_size": world, "optimizer": uni.kind}


def _resharded_run(ref: CheckpointRef, target_cfg: ModelConfig) -> Optional[dict]:
    """The source's run record (manifest.py) with the new layout, so `--resume --ep_size K` checks it."""
    from ..train import manifest

    try:
        run = manifest.read(ref.tag_dir).get("run")
    except ValueError:  # a checkpoint from before manifests
        return None
    return {**run, "model_config": target_cfg.to_dict()} if isinstance(run, dict) else None


def _target_states(uni: Universal, target_cfg: ModelConfig, world: int) -> dict:
    states = dict(uni.states)
    states["model_config"] = target_cfg.to_dict()
    states[DP_WORLD_KEY] = world
    return states

