"""The run's inputs, checked once before any process talks: flags, the model config, the DeepSpeed config and
the output folder. Every check fails on every rank alike, with one line that says what to change."""
from __future__ import annotations

import copy
import math
import os
import socket
from pathlib import Path

from ..config import ConfigError, ModelConfig, TrainArgs, default_model, read_json_object
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


# Fields DeepSpeed reads without checking their types (it would fail later, or with a message about Python)
_DS_COUNTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print")
_DS_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "tensorboard")


def _ds_section(ds: dict, name: str) -> dict:
    section = ds.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"--deepspeed_config: {name}={section!r} is invalid: expected a JSON object")
    return section


def deepspeed_config(args: TrainArgs) -> dict:
    """The user's DeepSpeed JSON with our run's facts filled in where it says "auto"."""
    ds = read_json_object(args.deepspeed_config, "--deepspeed_config")
    for name in _DS_COUNTS:
        value = ds.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--deepspeed_config: {name}={value!r} is invalid: expected an integer >= 1")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf:
        raise ConfigError(f"--deepspeed_config: gradient_clipping={clip!r} is invalid: expected a number >= 0")
    for name in _DS_SECTIONS:
        _ds_section(ds, name)
    for name in ("optimizer", "scheduler"):
        section = _ds_section(ds, name)
        if section and not isinstance(section.get("type"), str):
            raise ConfigError(f"--deepspeed_config: {name}.type={section.get('type')!r} is invalid: expected a name "
                              "such as " + ("\"AdamW\"" if name == "optimizer" else "\"WarmupCosineLR\""))
        if not isinstance(section.get("params", {}), dict):
            raise ConfigError(f"--deepspeed_config: {name}.params={section['params']!r} is invalid: expected a JSON "
                              "object")
    zero = _ds_section(ds, "zero_optimization").get("stage", 0)
    if zero not in (0, 1, 2) or isinstance(zero, bool):
        raise ConfigError(f"zero_optimization.stage={zero!r} is not supported: MoE merge layers need ZeRO stage 0, "
                          "1 or 2 (stage 3 partitions the expert parameters the merge reads whole)")
    if _ds_section(ds, "fp16").get("enabled"):
        raise ConfigError("fp16 is not supported: use bf16 (\"bf16\": {\"enabled\": true}) or fp32")
    sched = _ds_section(ds, "scheduler").get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = args.max_steps
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, min(100, args.max_steps // 10))
    tb = ds.get("tensorboard")
    if tb and tb.get("output_path", "auto") in (None, "auto"):
        tb["output_path"] = str(Path(args.output_dir) / "tensorboard")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def validate(args: TrainArgs) -> tuple[ModelConfig, dict]:
    """Everything checkable before processes talk: flags, configs, the output folder."""
    for name in ("max_steps", "eval_interval", "save_interval", "log_interval", "eval_windows", "eval_batches",
                 "stop_at_step", "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 1")
    if args.eval_windows is not None and args.eval_batches is not None:
        raise ConfigError(f"--eval_windows={args.eval_windows} and --eval_batches={args.eval_batches} both set the "
                          "validation windows: give one of them")
    for name in ("seed", "data_seed", "skip_nonfinite"):
        value = getattr(args, name)
        if not 0 <= value < 2 ** 63:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 0")
    if not 0 < args.dist_timeout < math.inf:
        raise ConfigError(f"--dist_timeout={args.dist_timeout} is invalid: expected a number of seconds > 0")
    cfg = load_model_config(args)
    ds = deepspeed_config(args)
    check_offload(ds)
    if cfg.method == "smoe":  # settled here, from the run's precision, and recorded in model_config.json
        bf16 = bool(ds.get("bf16", {}).get("enabled"))
        cfg = cfg.with_moe(backend=resolve_backend(cfg.moe.backend, cfg.moe.ep_size, bf16, cfg.ffn_bias))
    if args.resume and args.overwrite_output_dir:
        raise ConfigError("--resume and --overwrite_output_dir contradict each other: --resume continues the run in "
                          "--output_dir, --overwrite_output_dir moves it aside to start afresh; give one")
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
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        ds = DeepSpeedConfig(copy.deepcopy(ds_config))
    except Exception as e:  # only the user's JSON is read here: whatever fails is about it
        raise ConfigError(f"--deepspeed_config '{args.deepspeed_config}' is not valid for DeepSpeed: {reason(e)}") \
            from None
    return ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps
