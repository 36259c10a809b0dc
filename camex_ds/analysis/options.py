"""A grid's options as one typed object (`GridOptions`: what `camex-compare`'s flags and the curvature study set),
validated once into a `Grid` by `make_grid`: every bad value is one `UsageError` line naming it and what is valid."""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..config import COMPARED_METHODS, METHODS, ConfigError, ModelConfig, read_json_object
from ..run_args import DEFAULT_DEEPSPEED_CONFIG, default_model
from .arms import SettingsError, moe_settings, parse_sweeps, variant_name
from .grid import Grid, UsageError, Variant, build_method_config, reference_variant, step_batch, validate_configs
from .upcycled import dense_fingerprint, upcycle_key, upcycled_path


@dataclass
class GridOptions:
    """Every setting of a grid, as `camex-compare --help` explains it; `methods` is a comma-separated list."""

    output: str
    max_steps: Optional[int] = None
    methods: str = ",".join(COMPARED_METHODS)
    seeds: int = 3
    arm_seeds: Optional[int] = None
    first_seed: int = 0
    data: Optional[str] = None
    val_data: Optional[str] = None
    model_config: Optional[str] = None
    init_from: Optional[str] = None
    moe: Optional[str] = None
    moe_set: List[str] = field(default_factory=list)
    sweep: List[str] = field(default_factory=list)
    upcycle_seed: int = 0
    budget: str = "steps"
    reference: Optional[str] = None
    num_gpus: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_batches: Optional[int] = None
    eval_windows: Optional[int] = None
    data_seed: int = 1234
    seed_data_order: bool = False
    deepspeed_config: Optional[str] = None
    launcher_script: Optional[str] = None  # a script standing in for the trainer (tests); None: the package's own
    extra_args: List[str] = field(default_factory=list)
    report_only: bool = False
    dry_run: bool = False


def parse_methods(text: str) -> List[str]:
    items = [m.strip() for m in text.split(",")]
    if not any(items):
        raise UsageError(f"--methods is empty; valid choices: {', '.join(METHODS)}")
    out: List[str] = []
    for m in items:
        if not m:
            continue
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; valid choices: {', '.join(METHODS)}")
        if m in out:
            raise UsageError(f"method {m!r} given twice in --methods")
        out.append(m)
    return out


def load_json(path: str, what: str) -> dict:
    try:
        return read_json_object(Path(path), what)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def source(flag: str, value: Optional[str]) -> Optional[str]:
    """A --data/--val_data value as the launcher will get it: hub names as given, paths absolute and existing."""
    if value is None or value.startswith("hf:"):
        return value
    if not os.path.exists(value):
        raise UsageError(f"{flag} path {value!r} does not exist (expected a text/.jsonl/.parquet file, "
                         f"a folder of them, a preprocessed dataset folder, or hf:NAME[:CONFIG])")
    return str(Path(value).resolve())


def _check_numbers(o: GridOptions) -> None:
    for flag, value, low in (("--seeds", o.seeds, 1), ("--first_seed", o.first_seed, 0),
                             ("--max_steps", o.max_steps, 1), ("--eval_interval", o.eval_interval, 1),
                             ("--eval_batches", o.eval_batches, 1), ("--eval_windows", o.eval_windows, 1),
                             ("--arm_seeds", o.arm_seeds, 1), ("--num_gpus", o.num_gpus, 1)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if o.arm_seeds is not None and o.arm_seeds > o.seeds:
        raise UsageError(f"--arm_seeds {o.arm_seeds} is more than --seeds {o.seeds}: the sweep's arms take the first "
                         f"seeds of the first arm's, so give 1 to {o.seeds}")
    if o.eval_batches is not None and o.eval_windows is not None:
        raise UsageError("--eval_batches and --eval_windows exclude each other: give the validation set in windows "
                         "(the same at any micro batch) or in batches, not both")
    if o.max_steps is None and not o.report_only:
        raise UsageError("--max_steps is required (unless --report_only)")


def _base_config(o: GridOptions) -> dict:
    """The config every method's derives from: --model_config, the --init_from model's own, or the default model."""
    if o.init_from is None:
        return load_json(o.model_config, "--model_config") if o.model_config else default_model()
    if o.model_config:
        raise UsageError("--model_config and --init_from exclude each other: a fine-tuning grid's model is the "
                         "--init_from model's (set its MoE layers with --moe/--moe_set)")
    from ..ckpt.format import PretrainedError, read_config  # torch loads only for a fine-tuning grid

    try:
        cfg, _ = read_config(o.init_from)
    except PretrainedError as e:
        raise UsageError(f"--init_from: {e}") from None
    if cfg.moe is not None:
        raise UsageError(f"--init_from {o.init_from!r} is a {cfg.method} model: a grid upcycles a dense model")
    return cfg.to_dict()


def variant_configs(methods: List[str], base: dict, settings: dict, arms, dense_dims: bool = False) -> tuple:
    """`(variants, arm_variants, configs)`: one model config per distinct variant (arms that share a variant share
    its config and runs). `dense_dims`: the configs an upcycle of the dense model `base` writes (its fields, a MoE
    block at ep_size 1)."""
    variants, arm_variants, configs = {}, {}, {}
    for arm in arms:
        arm_variants[arm.label] = {}
        for m in methods:
            name = variant_name(m, arm)
            arm_variants[arm.label][m] = name
            if name not in variants:
                variants[name] = Variant(name, m)
                configs[name] = build_method_config(base, m, {**settings, **dict(arm.acting_on(m))})
    validate_configs(configs)
    if dense_dims:
        for name, cfg in configs.items():
            if cfg["moe"] is not None:
                cfg["moe"]["ep_size"] = 1
                configs[name] = ModelConfig.from_dict(cfg).to_dict()
    return variants, arm_variants, configs


def _inits(o: GridOptions, output: Path, variants: dict, configs: dict) -> tuple:
    """`(inits, keys)`: each variant's starting model (the dense one, or its upcycled copy) and its content key."""
    dense = Path(o.init_from).resolve()
    fingerprint = dense_fingerprint(dense)
    inits, keys = {}, {}
    for name, v in variants.items():
        if v.method == "dense":
            inits[name], keys[name] = dense, fingerprint
        else:
            keys[name] = upcycle_key(fingerprint, configs[name], o.upcycle_seed)
            inits[name] = upcycled_path(output, v.method, keys[name])
    return inits, keys


def make_grid(o: GridOptions) -> Grid:
    """Validate `o` and build its grid (raises UsageError)."""
    methods = parse_methods(o.methods)
    _check_numbers(o)
    data, val_data = source("--data", o.data), source("--val_data", o.val_data)
    reference = o.reference or methods[0]
    if reference not in methods:
        raise UsageError(f"--reference {reference!r} is not in --methods; valid choices: {', '.join(methods)}")
    if o.reference and o.budget != "flops":
        raise UsageError("--reference only applies to --budget flops")
    base = copy.deepcopy(_base_config(o))
    seq_len = base.get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"model config needs a positive integer 'seq_len', got {seq_len!r}")
    try:
        arms = parse_sweeps(o.sweep)
        settings = moe_settings(load_json(o.moe, "--moe") if o.moe else {}, o.moe_set)
    except SettingsError as e:
        raise UsageError(str(e)) from None
    variants, arm_variants, configs = variant_configs(methods, base, settings, arms, o.init_from is not None)
    ds_path = o.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG
    batch = step_batch(load_json(ds_path, "--deepspeed_config"), o.num_gpus or 1, ds_path)

    launcher = Path(o.launcher_script).resolve() if o.launcher_script else None
    running = not o.report_only and not o.dry_run
    if running and launcher is not None and not launcher.is_file():
        raise UsageError(f"launcher script {str(launcher)!r} does not exist")
    if o.num_gpus is not None and running and shutil.which("deepspeed") is None:
        raise UsageError("--num_gpus needs the 'deepspeed' launcher on PATH, which was not found")
    output = Path(o.output).resolve()
    inits, keys = _inits(o, output, variants, configs) if o.init_from is not None else ({}, {})

    grid = Grid(
        methods=methods, seeds=list(range(o.first_seed, o.first_seed + o.seeds)), base_config=base, arms=arms,
        variants=variants, arm_variants=arm_variants, configs=configs, output=output, data=data,
        data_seed=o.data_seed, max_steps=o.max_steps,
        eval_interval=o.eval_interval or (max(1, o.max_steps // 10) if o.max_steps else None),
        budget=o.budget, reference=reference, step_batch=batch,
        deepspeed_config=str(Path(o.deepspeed_config).resolve()) if o.deepspeed_config else None,
        num_gpus=o.num_gpus, launcher=launcher, extra_args=list(o.extra_args),
        model_config_path=str(Path(o.model_config).resolve()) if o.model_config else None, val_data=val_data,
        moe_settings=settings, init_from=Path(o.init_from).resolve() if o.init_from else None, inits=inits,
        init_keys=keys, upcycle_seed=o.upcycle_seed, eval_batches=o.eval_batches, seed_data_order=o.seed_data_order,
        eval_windows=o.eval_windows, arm_seeds=o.arm_seeds,
    )
    grid.method_steps = {v: (grid.max_steps if o.budget == "steps" else None) for v in variants}
    if o.budget == "flops":
        grid.method_steps[reference_variant(grid)] = grid.max_steps
    return grid
