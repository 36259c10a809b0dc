"""A compare grid of (method x arm x seed) training runs: each variant's model config (a method with the grid's MoE
settings and the arm's settings that act on it, `arms`), the batch of one optimizer step, the FLOPs-budget policy
that gives every variant its steps, and each run's folder, spec and launcher command. Building one from the user's
options is `options`' job, running it `supervise`'s; the command line is `camex_ds.cli.compare`'s."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..config import DEFAULT_VOCAB_SIZE, METHODS, ModelConfig
from ..run_args import default_model
from .arms import Arm
from .report import write_report
from .results import run_dir

LAUNCHER_VOCAB_SIZE = DEFAULT_VOCAB_SIZE  # the tokenizer the launcher trains when a config leaves vocab_size out
#: What every run of a grid starts: the trainer of the installed package (`camex-pretrain`), wherever it is installed.
TRAINER_MODULE = "camex_ds.cli.pretrain"
SMOE_DEFAULT_TOP_K = 2
CHECKPOINT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


class UsageError(Exception):
    """A grid setting the user gave is wrong: the command line reports it as one line, exit code 2."""


# --------------------------------------------------------------------------- configs


def build_method_config(base: dict, method: str, settings: Optional[dict] = None) -> dict:
    """Model config of ``method`` derived from ``base`` (see --help, 'methods'), with the MoE ``settings`` (the
    grid's and its arm's) over the base's MoE block."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    cfg = copy.deepcopy(base)
    if method == "dense":
        cfg["moe"] = None
        return cfg
    base_moe = base.get("moe")
    moe = copy.deepcopy(base_moe) if isinstance(base_moe, dict) else default_model()["moe"]
    moe.update(copy.deepcopy(settings or {}))
    base_method = moe.get("method")
    base_top_k = moe.get("top_k")
    if method == "smoe":
        n_exp = moe.get("num_experts")
        default_k = min(SMOE_DEFAULT_TOP_K, n_exp) if isinstance(n_exp, int) and n_exp >= 1 else SMOE_DEFAULT_TOP_K
        moe["top_k"] = base_top_k if (base_method == "smoe" and base_top_k) else default_k
    else:
        # merging methods keep a top_k only if the base config was itself a merging config
        moe["top_k"] = None if base_method in (None, "smoe", "dense") else base_top_k
    if settings and "top_k" in settings:  # one the user set for the grid holds for every method
        moe["top_k"] = settings["top_k"]
    moe["method"] = method
    cfg["moe"] = moe
    return cfg


def validate_configs(configs: Dict[str, dict]) -> None:
    """Check each method's config with `ModelConfig`, so a bad base config fails here in one line instead of in
    every run."""
    for m, cfg in configs.items():
        try:
            ModelConfig.from_dict(copy.deepcopy(cfg))
        except (ValueError, TypeError) as e:  # ConfigError is a ValueError
            raise UsageError(f"model config for method {m!r} is invalid: {e}")


@dataclass(frozen=True)
class Variant:
    """What one set of runs (one per seed) trains: `method` with the arm settings that act on it; `name` is its
    folder below `runs/` and its key in the grid's per-variant tables."""

    name: str
    method: str


@dataclass
class Grid:
    """Everything a grid run needs; `method_steps`, `flops_per_token_train` and `flops_budget` (keyed by variant
    name) fill in as the FLOPs budget resolves. `arm_variants[arm label][method]` names the variant a method trains
    in an arm; `inits[variant name]` is the model a run starts from when the grid fine-tunes `init_from`."""

    methods: List[str]
    seeds: List[int]
    base_config: dict
    arms: List[Arm]
    variants: Dict[str, Variant]
    arm_variants: Dict[str, Dict[str, str]]
    configs: Dict[str, dict]
    output: Path
    data: str
    data_seed: int
    max_steps: Optional[int]
    eval_interval: Optional[int]
    budget: str
    reference: str
    step_batch: "StepBatch"
    deepspeed_config: Optional[str]
    num_gpus: Optional[int]
    launcher: Optional[Path]  # a script that stands in for the trainer (tests' fakes); None: TRAINER_MODULE
    extra_args: List[str]
    model_config_path: Optional[str]
    val_data: Optional[str] = None
    moe_settings: dict = field(default_factory=dict)
    init_from: Optional[Path] = None
    inits: Dict[str, Path] = field(default_factory=dict)
    init_keys: Dict[str, str] = field(default_factory=dict)
    upcycle_seed: int = 0
    eval_batches: Optional[int] = None
    eval_windows: Optional[int] = None
    arm_seeds: Optional[int] = None
    seed_data_order: bool = False
    method_steps: Dict[str, Optional[int]] = field(default_factory=dict)
    flops_per_token_train: Dict[str, float] = field(default_factory=dict)
    flops_budget: Optional[float] = None


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step's batch: `micro` sequences per rank and forward, `accumulation` forwards, `ranks` ranks."""

    micro: int
    accumulation: int
    ranks: int

    def tokens(self, seq_len: int) -> int:
        return self.micro * self.accumulation * self.ranks * seq_len


def reference_variant(grid: Grid) -> str:
    """The variant whose steps set a `--budget flops` grid's budget: the reference method in the first arm."""
    return grid.arm_variants[grid.arms[0].label][grid.reference]


def step_batch(ds: dict, ranks: int, source: str) -> StepBatch:
    """The batch DeepSpeed derives from its config: `train_micro_batch_size_per_gpu` and
    `gradient_accumulation_steps`, or `train_batch_size` = micro × accumulation × ranks."""
    def positive(key, default=None):
        v = ds.get(key, default)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    accumulation = positive("gradient_accumulation_steps", 1)
    micro = positive("train_micro_batch_size_per_gpu")
    total = positive("train_batch_size")
    if micro is None and total is not None and accumulation and total % (accumulation * ranks) == 0:
        micro = total // (accumulation * ranks)
    if micro is None or accumulation is None:
        raise UsageError(f"{source}: cannot read the batch for --budget flops: expected integer "
                         "train_micro_batch_size_per_gpu (or train_batch_size divisible by accumulation x GPUs) and "
                         "gradient_accumulation_steps")
    return StepBatch(micro, accumulation, ranks)


# --------------------------------------------------------------------------- FLOPs budget


def flops_budget_steps(
    configs: Dict[str, dict],
    reference: str,
    reference_steps: int,
    batch: StepBatch,
    flops_fn: Callable,
) -> Tuple[Dict[str, int], Dict[str, float], float]:
    """max_steps per method under the reference's FLOPs budget.

    Returns ``(steps, flops_per_token_train, budget)`` with
    ``budget = reference_steps * tokens_per_step * fpt(reference)`` and
    ``steps[m] = floor(budget / (fpt(m) * tokens_per_step))`` (``steps[reference]
    = reference_steps`` exactly), where ``fpt`` counts one rank's forward of ``batch.micro`` sequences and
    its per-step work once per ``batch.accumulation`` forwards.
    """
    fpt: Dict[str, float] = {}
    for m, cfg in configs.items():
        seq_len = cfg["seq_len"]
        val = float(flops_fn(cfg, seq_len, batch.micro * seq_len, accumulation=batch.accumulation,
                             vocab_size=cfg.get("vocab_size") or LAUNCHER_VOCAB_SIZE)["train"])
        if not (math.isfinite(val) and val > 0):
            raise ValueError(f"flops_per_token(...)['train'] for {m} is {val!r}; expected a positive number")
        fpt[m] = val
    tokens = batch.tokens(configs[reference]["seq_len"])
    budget = reference_steps * tokens * fpt[reference]
    steps: Dict[str, int] = {}
    for m in configs:
        if m == reference:
            steps[m] = reference_steps
        else:
            # tiny relative slack so exact ratios do not lose a step to rounding
            steps[m] = int(math.floor(budget / (fpt[m] * tokens) * (1 + 1e-12)))
    return steps, fpt, budget


def resolve_flops_budget(grid: Grid, flops_fn: Optional[Callable] = None) -> None:
    """Give every variant its steps under `--budget flops` (`flops_budget_steps`), once `grid` knows enough;
    `flops_fn` defaults to `camex_ds.analysis.flops.flops_per_token`."""
    if grid.budget != "flops" or all(v is not None for v in grid.method_steps.values()):
        return
    if flops_fn is None:
        from .flops import flops_per_token as flops_fn  # lazy: torch and DeepSpeed load only for --budget flops
    reference = reference_variant(grid)
    steps, fpt, budget = flops_budget_steps(grid.configs, reference, grid.max_steps, grid.step_batch, flops_fn)
    for m, n in steps.items():
        if n < 1:
            raise UsageError(f"the FLOPs budget of {reference} ({budget:.3e}) buys {m} less than one "
                             f"step; raise --max_steps")
    grid.method_steps, grid.flops_per_token_train, grid.flops_budget = steps, fpt, budget


# --------------------------------------------------------------------------- runs


def has_checkpoint(path: Path) -> bool:
    """Whether a run folder holds a checkpoint to --resume from (see --help)."""
    path = Path(path)
    if not path.is_dir():
        return False
    stack = [(path, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            name = e.name
            if e.is_file():
                if name == "latest" or name.endswith(CHECKPOINT_FILE_SUFFIXES):
                    return True
            elif e.is_dir():
                if name.startswith("global_step"):
                    return True
                if depth < 2:
                    stack.append((Path(e.path), depth + 1))
    return False


def run_data_seed(grid: Grid, seed: int) -> int:
    """The data order of seed `seed`'s runs: the grid's, or with `seed_data_order` its own (the same for every
    method, so a pair still differs only in the method)."""
    return grid.data_seed + seed if grid.seed_data_order else grid.data_seed


def seeds_of_arm(grid: Grid, label: str) -> List[int]:
    """The seeds an arm reports: every seed for the first arm (the reference settings), the first `arm_seeds`
    for the others, so a sweep costs less than the reference it is compared with."""
    if grid.arm_seeds is None or label == grid.arms[0].label:
        return list(grid.seeds)
    return list(grid.seeds[:grid.arm_seeds])


def seeds_of_variant(grid: Grid, variant: str) -> List[int]:
    """The seeds a variant trains: those of the arms it takes part in."""
    wanted = set()
    for label, folders in grid.arm_variants.items():
        if variant in folders.values():
            wanted.update(seeds_of_arm(grid, label))
    return [s for s in grid.seeds if s in wanted]


def run_spec(grid: Grid, variant: str, seed: int) -> dict:
    """What a run folder records of its settings (`run_spec.json`); a rerun with other settings is refused."""
    spec = {
        "method": grid.variants[variant].method,
        "seed": seed,
        "model_config": grid.configs[variant],
        "max_steps": grid.method_steps[variant],
        "data": grid.data,
        "val_data": grid.val_data,
        "data_seed": run_data_seed(grid, seed),
        "eval_interval": grid.eval_interval,
        "deepspeed_config": grid.deepspeed_config,
        "launcher_args": grid.extra_args,
    }
    if grid.eval_batches is not None:
        spec["eval_batches"] = grid.eval_batches
    if grid.eval_windows is not None:
        spec["eval_windows"] = grid.eval_windows
    if grid.init_from is not None:
        spec["init_from"] = str(grid.inits[variant])
        spec["init_key"] = grid.init_keys[variant]
    return spec


def check_spec(path: Path, spec: dict, label: str) -> None:
    f = path / "run_spec.json"
    if not f.exists():
        return
    try:
        old = json.loads(f.read_text())
    except ValueError:
        return
    diff = [k for k in spec if k in old and old[k] != spec[k]]
    if diff:
        details = "; ".join(f"{k}: {json.dumps(old[k])} -> {json.dumps(spec[k])}" for k in diff)
        raise UsageError(
            f"run {label} in {str(path)!r} was started with different settings ({details}); "
            f"use a new --output or delete that run folder"
        )


def config_path(grid: Grid, variant: str) -> Path:
    """Where the grid writes a variant's model config (the upcycle reads it; a from-scratch run trains it)."""
    return grid.output / "configs" / f"{variant}.json"


def launcher_command(grid: Grid, variant: str, seed: int, resume: bool) -> List[str]:
    """The one place a grid's launcher command is built: every setting the grid fixes is passed explicitly."""
    rd = run_path(grid, variant, seed)
    model = (["--init_from", str(grid.inits[variant])] if grid.init_from is not None
             else ["--model_config", str(config_path(grid, variant))])
    args = [
        *model,
        *(["--data", grid.data] if grid.data else []),
        *(["--val_data", grid.val_data] if grid.val_data else []),
        "--output_dir", str(rd),
        "--max_steps", str(grid.method_steps[variant]),
        "--seed", str(seed),
        "--data_seed", str(run_data_seed(grid, seed)),
        "--eval_interval", str(grid.eval_interval),
        *(["--eval_batches", str(grid.eval_batches)] if grid.eval_batches is not None else []),
        *(["--eval_windows", str(grid.eval_windows)] if grid.eval_windows is not None else []),
    ]
    if grid.deepspeed_config:
        args += ["--deepspeed_config", grid.deepspeed_config]
    if resume:
        args.append("--resume")
    args += grid.extra_args
    if grid.num_gpus is not None:  # DeepSpeed's launcher spells python's `-m` `--module`
        start, module_flag = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(grid.num_gpus)], "--module"
    else:
        start, module_flag = [sys.executable], "-m"
    return start + ([str(grid.launcher)] if grid.launcher else [module_flag, TRAINER_MODULE]) + args


def run_path(grid: Grid, variant: str, seed: int) -> Path:
    return run_dir(grid.output, variant, seed)


def grid_meta(grid: Grid) -> dict:
    """What `grid.json` and the report's settings table record about the grid."""
    return {
        "methods": grid.methods,
        "seeds": grid.seeds,
        "arm_seeds": grid.arm_seeds,
        "data": grid.data,
        "val_data": grid.val_data,
        "data_seed": grid.data_seed,
        "seed_data_order": grid.seed_data_order,
        "budget": grid.budget,
        "reference": reference_variant(grid) if grid.budget == "flops" else None,
        "max_steps": grid.max_steps,
        "max_steps_per_method": grid.method_steps,
        "tokens_per_step": grid.step_batch.tokens(grid.base_config["seq_len"]),
        "step_batch": dataclasses.asdict(grid.step_batch),
        "flops_per_token_train": grid.flops_per_token_train or None,
        "flops_budget": grid.flops_budget,
        "eval_interval": grid.eval_interval,
        "eval_batches": grid.eval_batches,
        "eval_windows": grid.eval_windows,
        "model_config": grid.model_config_path or "built-in",
        "moe_settings": grid.moe_settings or None,
        "arms": [arm.label for arm in grid.arms] if len(grid.arms) > 1 else None,
        "init_from": str(grid.init_from) if grid.init_from is not None else None,
        "upcycle_seed": grid.upcycle_seed if grid.init_from is not None else None,
        "deepspeed_config": grid.deepspeed_config,
        "num_gpus": grid.num_gpus,
        "launcher": str(grid.launcher) if grid.launcher else TRAINER_MODULE,
        "launcher_args": grid.extra_args,
    }


def _steps_from_specs(grid: Grid) -> Dict[str, Optional[int]]:
    """max_steps per variant as recorded in existing run folders (for --report_only)."""
    out: Dict[str, Optional[int]] = {}
    for v in grid.variants:
        out[v] = grid.method_steps.get(v)
        if out[v] is None:
            for s in seeds_of_variant(grid, v):
                try:
                    out[v] = json.loads((run_path(grid, v, s) / "run_spec.json").read_text())["max_steps"]
                    break
                except (OSError, ValueError, KeyError):
                    continue
    return out


def write_grid_report(grid: Grid, bootstrap_resamples: int, band: str) -> Dict[str, Path]:
    steps = _steps_from_specs(grid)
    meta = grid_meta(grid)
    meta["max_steps_per_method"] = steps
    meta["bootstrap_resamples"] = bootstrap_resamples
    return write_report(grid.output, grid.methods, grid.seeds, meta=meta, max_steps=steps,
                        n_resamples=bootstrap_resamples, band=band, arms=grid.arm_variants,
                        arm_seeds={label: seeds_of_arm(grid, label) for label in grid.arm_variants})
