"""The run's inputs, checked once before any process talks: the model config, the DeepSpeed config and the output
folder (the flags check themselves: `TrainArgs`). Every check fails on every rank alike, with one line that says
what to change."""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

from ..config import ConfigError, ModelConfig, read_json_object
from ..ds_config import DeepSpeedSettings
from ..run_args import TrainArgs, default_model
from ..moe.token_moe import resolve_backend
from . import checkpoint
from .checkpoint import CheckpointError
from .offload import check_offload


def load_model_config(args: TrainArgs) -> ModelConfig:
    """--model_config, else the --init_from model's own config, else the small default CAMEx model."""
    if args.model_config is None and args.init_from:
        from ..ckpt.format import read_config

        cfg = read_config(args.init_from)[0]
    else:
        raw = default_model() if args.model_config is None else read_json_object(args.model_config, "--model_config")
        cfg = ModelConfig.from_dict(raw)
    if args.ep_size is not None:
        if cfg.moe is None:
            raise ConfigError(f"--ep_size={args.ep_size} given, but the model is dense (moe is null)")
        cfg = cfg.with_moe(ep_size=args.ep_size)
    return cfg


def deepspeed_config(args: TrainArgs) -> dict:
    """The user's DeepSpeed JSON, checked where we read it (`DeepSpeedSettings`), with our run's facts filled in
    where it says "auto"."""
    ds = read_json_object(args.deepspeed_config, "--deepspeed_config")
    settings = DeepSpeedSettings.from_dict(ds)
    if settings.scheduler is not None:
        sched = ds["scheduler"].get("params", {})
        if sched.get("total_num_steps") == "auto":
            sched["total_num_steps"] = args.max_steps
        if sched.get("warmup_num_steps") == "auto":
            sched["warmup_num_steps"] = max(1, min(100, args.max_steps // 10))
    if ds.get("tensorboard") and settings.tensorboard_output_path in (None, "auto"):
        ds["tensorboard"]["output_path"] = str(Path(args.output_dir) / "tensorboard")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def validate(args: TrainArgs) -> tuple[ModelConfig, dict]:
    """What the flags alone do not settle (`TrainArgs` checked those): the configs and the output folder."""
    cfg = load_model_config(args)
    ds = deepspeed_config(args)
    check_offload(ds)
    if cfg.method == "smoe":  # settled here, from the run's precision, and recorded in model_config.json
        bf16 = DeepSpeedSettings.from_dict(ds).bf16
        cfg = cfg.with_moe(backend=resolve_backend(cfg.moe.backend, cfg.moe.ep_size, bf16, cfg.ffn_bias))
    if args.checkpoint_interval > cfg.n_layers:
        raise ConfigError(f"--activation_checkpointing_interval={args.checkpoint_interval} is invalid: expected "
                          f"1..{cfg.n_layers}, the model's n_layers (every K-th block is recomputed)")
    check_writable(Path(args.output_dir))
    if args.resume and not checkpoint.tags(Path(args.output_dir) / "checkpoints"):
        raise CheckpointError(f"--resume: no checkpoint in {Path(args.output_dir) / 'checkpoints'}; run without "
                              "--resume to start fresh")
    return cfg, ds


def check_writable(out_dir: Path) -> None:
    """Every rank writes checkpoint files: each checks, before any work, that it can."""
    probe = out_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir '{out_dir}' is not writable ({e.strerror or e}): choose another folder") \
            from None


def reason(e: BaseException) -> str:
    """One line from a library's exception: pydantic's first error with its field, else the first line."""
    if hasattr(e, "errors") and callable(e.errors):
        first = e.errors()[0]
        field = ".".join(map(str, first.get("loc", ()))) or "value"
        return f"{field}: {first.get('msg')} (got {first.get('input')!r})"
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def deepspeed_batch(args: TrainArgs, ds_config: dict) -> tuple[int, int]:
    """`(micro batch, accumulation steps)` as DeepSpeed reads the config for this job's world size.

    Constructing DeepSpeed's own config object validates it (batch sizes against the world size, field
    types), so a bad config fails here, on every rank, before any model is built.
    """
    from ..deepspeed_adapter import batch_sizes

    try:
        return batch_sizes(copy.deepcopy(ds_config))
    except Exception as e:  # only the user's JSON is read here: whatever fails is about it
        raise ConfigError(f"--deepspeed_config '{args.deepspeed_config}' is not valid for DeepSpeed: {reason(e)}") \
            from None
