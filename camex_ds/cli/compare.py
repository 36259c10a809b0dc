#!/usr/bin/env python
"""Train a grid of (method x seed) pretraining runs with launcher/pretrain.py and
compare the methods statistically.

Every run is started as its own subprocess exactly as a user would start it::

    python launcher/pretrain.py --model_config OUT/configs/<method>.json \\
        --data DATA --output_dir OUT/runs/<method>/seed<k> --max_steps N \\
        --seed <k> --data_seed D --eval_interval E [--deepspeed_config DS] [--resume]

(``deepspeed --num_gpus G launcher/pretrain.py ...`` with ``--num_gpus G``).
All runs share the same ``--data_seed``, so seeds only change initialisation
and routing noise, and paired comparisons over seeds are meaningful.

Outputs in OUT: ``configs/<method>.json`` (model config of each method),
``runs/<method>/seed<k>/`` (one folder per run: the launcher's files plus
``log.txt`` with its stdout/stderr and ``run_spec.json``), ``grid.json``,
``results.json``, ``results.md`` and ``curves.png``.

Running the same command again resumes the grid: finished runs (with
``final_metrics.json``) are skipped, unfinished runs restart with ``--resume``
when their folder holds a checkpoint and from scratch otherwise.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from camex_ds.cli import run_cli  # noqa: E402
from camex_ds.stats import METHODS  # noqa: E402
from camex_ds.config import DEFAULT_DEEPSPEED_CONFIG, TrainArgs  # noqa: E402

PROG = "compare_methods.py"
DEFAULT_LAUNCHER = REPO_ROOT / "launcher" / "pretrain.py"
LAUNCHER_VOCAB_SIZE = TrainArgs.vocab_size  # the tokenizer the launcher trains when a config leaves vocab_size out
DEFAULT_METHODS = "dense,smoe,euclid,ties,camex,camex-ties"
DEFAULT_DATA_SEED = 1234
DEFAULT_MOE = {
    "method": "camex",
    "num_experts": 4,
    "top_k": None,
    "every": 2,
    "segment_len": 64,
    "routing": "causal",
    "curvature_rank": 1,
    "alpha": 1.0,
    "ep_size": 1,
    "dynamic": False,
}
#: Small built-in base config used when --model_config is not given.
DEFAULT_BASE_CONFIG = {
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "ffn_hidden_size": 512,
    "seq_len": 256,
    "activation": "gelu",
    "moe": DEFAULT_MOE,
}
SMOE_DEFAULT_TOP_K = 2
LOG_TAIL_LINES = 40
CHECKPOINT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


EPILOG = f"""\
methods:
  dense        no MoE layers ("moe": null)
  smoe         sparse top-k MoE ("top_k": {SMOE_DEFAULT_TOP_K} unless the base config is smoe with its own top_k)
  euclid, ties, dare                     Euclidean expert merging
  camex, camex-ties, camex-dare          curvature-aware twins of euclid, ties, dare
  Each method's config is the base config with "moe.method" replaced (and
  "moe": null for dense); other MoE fields come from the base config, or from
  the built-in MoE block when the base config is dense.

budget:
  steps  every method trains --max_steps steps.
  flops  the reference method (--reference, default: first of --methods) trains
         --max_steps steps; its training FLOPs
             budget = max_steps * tokens_per_step * flops_per_token_train(reference)
         are given to every other method as
             max_steps(m) = floor(budget / (flops_per_token_train(m) * tokens_per_step))
         with tokens_per_step = micro batch x grad accumulation x GPUs x seq_len
         and flops_per_token_train = camex_ds.flops.flops_per_token(cfg, seq_len,
         micro batch x seq_len, accumulation=grad accumulation)["train"]: each
         rank curves its experts once per optimizer step over its own tokens.
         The batch comes from --deepspeed_config (the launcher's default
         ds_configs/cpu.json without it) and --num_gpus.

resuming:
  Rerun the same command.  OUT/runs/<method>/seed<k>/final_metrics.json marks a
  finished run (skipped); an unfinished run restarts with --resume if its folder
  holds a checkpoint (a 'latest' file, a global_step* folder or a *.pt/.pth/.ckpt/
  .safetensors file, at most two levels deep), otherwise from scratch (an
  old metrics.jsonl is moved to metrics.jsonl.prev).  Each run folder keeps a
  run_spec.json; rerunning into OUT with different settings for an existing
  run (max_steps, config, data, ...) is refused - use a new --output.

outputs (in OUT):
  results.json  per method: per-seed final val_loss, val_ppl, val_bpb,
                tokens_per_s, flops_per_token and their mean / sample std;
                per pair (each camex* vs its Euclidean twin, every method vs
                euclid): mean paired difference (A - B; negative = A better) of
                val_bpb and val_loss, paired t-test p-value, percentile
                bootstrap CI, n.  Undefined numbers are null.
  results.md    the same as Markdown tables.
  curves.png    validation bpb vs step and vs training FLOPs, mean over seeds
                with a min-max (or +-std, --band std) band.

extra launcher arguments:
  Arguments after a literal '--' are appended to every launcher command.

exit codes: 0 success, 1 a run failed (its log tail and exact command are
printed; finished runs are kept), 2 bad input, 130 interrupted.

example:
  python tools/compare_methods.py --data data/tiny.txt --methods euclid,camex \\
      --seeds 3 --max_steps 500 --budget flops --output out/cmp
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train every (method, seed) of a grid with launcher/pretrain.py as subprocesses\n"
        "(resumable) and write results.json, results.md and curves.png comparing the\n"
        "methods over seeds (mean/std, paired t-test, bootstrap CI).\n\n"
        "Arguments after a literal '--' are passed on to every launcher command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--data", metavar="DATA",
                   help="training data passed to the launcher's --data: a text/.jsonl/.parquet file, a folder "
                   "of them or a preprocessed dataset folder (must exist), or hf:NAME[:CONFIG]; default: the "
                   "launcher's default corpus (this Python's standard-library sources)")
    g.add_argument("--val_data", metavar="VAL",
                   help="a separate validation source for the launcher's --val_data (a corpus's valid.txt; same "
                   "forms as --data): every run validates on all of it and trains on all of --data")
    g.add_argument("--methods", default=DEFAULT_METHODS, metavar="M1,M2,...",
                   help=f"comma-separated methods, from: {', '.join(METHODS)} (default: {DEFAULT_METHODS})")
    g.add_argument("--seeds", type=int, default=3, metavar="K",
                   help="number of seeds per method, >= 1; seeds are FIRST_SEED..FIRST_SEED+K-1 (default: 3)")
    g.add_argument("--first_seed", type=int, default=0, metavar="S",
                   help="first seed value (default: 0)")
    g.add_argument("--max_steps", type=int, metavar="N",
                   help="training steps of every method (--budget steps) or of the reference method "
                   "(--budget flops); required unless --report_only")
    g.add_argument("--model_config", metavar="CFG.json",
                   help="base model config JSON (see launcher/pretrain.py); default: a small built-in "
                   "config (d_model 128, 4 layers, 4 heads, ffn 512, seq_len 256, 4 experts every 2nd layer)")
    g.add_argument("--budget", choices=("steps", "flops"), default="steps",
                   help="equal training steps or equal training FLOPs across methods (default: steps)")
    g.add_argument("--reference", metavar="METHOD",
                   help="reference method of --budget flops (default: first of --methods)")
    g.add_argument("--output", required=True, metavar="DIR", help="output folder (created; reused to resume)")

    r = p.add_argument_group("launcher")
    r.add_argument("--num_gpus", type=int, metavar="G",
                   help="start runs with 'deepspeed --num_gpus G' instead of the current Python interpreter")
    r.add_argument("--eval_interval", type=int, metavar="E",
                   help="evaluation interval in steps (default: max(1, max_steps // 10))")
    r.add_argument("--data_seed", type=int, default=DEFAULT_DATA_SEED, metavar="D",
                   help=f"data-order seed shared by all runs (default: {DEFAULT_DATA_SEED})")
    r.add_argument("--deepspeed_config", metavar="DS.json", help="DeepSpeed config passed to every run")
    # hidden: lets tests substitute a fake training script for launcher/pretrain.py
    r.add_argument("--launcher_script", default=str(DEFAULT_LAUNCHER), help=argparse.SUPPRESS)

    o = p.add_argument_group("report")
    o.add_argument("--bootstrap_resamples", type=int, default=10_000, metavar="B",
                   help="bootstrap resamples for the confidence intervals (default: 10000)")
    o.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="shaded band in curves.png: min-max over seeds or +-1 sample std (default: minmax)")
    o.add_argument("--report_only", action="store_true",
                   help="do not train; only (re)write the report from the runs already in --output")
    o.add_argument("--dry_run", action="store_true",
                   help="print the launcher commands that would run, then exit")
    o.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    return p


# --------------------------------------------------------------------------- configs


def build_method_config(base: dict, method: str) -> dict:
    """Model config of ``method`` derived from ``base`` (see --help, 'methods')."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    cfg = copy.deepcopy(base)
    if method == "dense":
        cfg["moe"] = None
        return cfg
    base_moe = base.get("moe")
    moe = copy.deepcopy(base_moe) if isinstance(base_moe, dict) else copy.deepcopy(DEFAULT_MOE)
    base_method = moe.get("method")
    base_top_k = moe.get("top_k")
    if method == "smoe":
        n_exp = moe.get("num_experts")
        default_k = min(SMOE_DEFAULT_TOP_K, n_exp) if isinstance(n_exp, int) and n_exp >= 1 else SMOE_DEFAULT_TOP_K
        moe["top_k"] = base_top_k if (base_method == "smoe" and base_top_k) else default_k
    else:
        # merging methods keep a top_k only if the base config was itself a merging config
        moe["top_k"] = None if base_method in (None, "smoe", "dense") else base_top_k
    moe["method"] = method
    cfg["moe"] = moe
    return cfg


def _parse_methods(text: str) -> List[str]:
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


def _load_json(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file {path!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise UsageError(f"{what} file {path!r} is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise UsageError(f"{what} file {path!r} must hold a JSON object")
    return data


def _validate_configs(configs: Dict[str, dict]) -> None:
    """Check each method's config with camex_ds.config.ModelConfig when that module is
    available, so a bad base config fails here in one line instead of in every run."""
    try:
        from camex_ds.config import ModelConfig
    except Exception:  # not available: the launcher validates instead
        return
    for m, cfg in configs.items():
        try:
            ModelConfig.from_dict(copy.deepcopy(cfg))
        except (ValueError, TypeError) as e:  # ConfigError is a ValueError
            raise UsageError(f"model config for method {m!r} is invalid: {e}")


@dataclass
class Grid:
    methods: List[str]
    seeds: List[int]
    base_config: dict
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
    launcher: Path
    extra_args: List[str]
    model_config_path: Optional[str]
    val_data: Optional[str] = None
    method_steps: Dict[str, Optional[int]] = field(default_factory=dict)
    flops_per_token_train: Dict[str, float] = field(default_factory=dict)
    flops_budget: Optional[float] = None


def _source(flag: str, value: Optional[str]) -> Optional[str]:
    """A --data/--val_data value as the launcher will get it: hub names as given, paths absolute and existing."""
    if value is None or value.startswith("hf:"):
        return value
    if not os.path.exists(value):
        raise UsageError(f"{flag} path {value!r} does not exist (expected a text/.jsonl/.parquet file, "
                         f"a folder of them, a preprocessed dataset folder, or hf:NAME[:CONFIG])")
    return str(Path(value).resolve())


@dataclass(frozen=True)
class StepBatch:
    """One optimizer step's batch: `micro` sequences per rank and forward, `accumulation` forwards, `ranks` ranks."""

    micro: int
    accumulation: int
    ranks: int

    def tokens(self, seq_len: int) -> int:
        return self.micro * self.accumulation * self.ranks * seq_len


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


def make_grid(args: argparse.Namespace, extra: Sequence[str]) -> Grid:
    """Validate the arguments and build the grid (raises UsageError)."""
    methods = _parse_methods(args.methods)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.first_seed < 0:
        raise UsageError(f"--first_seed must be >= 0, got {args.first_seed}")
    if args.max_steps is None and not args.report_only:
        raise UsageError("--max_steps is required (unless --report_only)")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise UsageError(f"--eval_interval must be >= 1, got {args.eval_interval}")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if args.bootstrap_resamples < 1:
        raise UsageError(f"--bootstrap_resamples must be >= 1, got {args.bootstrap_resamples}")
    data, val_data = _source("--data", args.data), _source("--val_data", args.val_data)
    reference = args.reference or methods[0]
    if reference not in methods:
        raise UsageError(f"--reference {reference!r} is not in --methods; valid choices: {', '.join(methods)}")
    if args.reference and args.budget != "flops":
        raise UsageError("--reference only applies to --budget flops")

    if args.model_config:
        base = _load_json(args.model_config, "--model_config")
    else:
        base = copy.deepcopy(DEFAULT_BASE_CONFIG)
    seq_len = base.get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"model config needs a positive integer 'seq_len', got {seq_len!r}")
    configs = {m: build_method_config(base, m) for m in methods}
    _validate_configs(configs)
    ds_path = args.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG
    batch = step_batch(_load_json(ds_path, "--deepspeed_config"), args.num_gpus or 1, ds_path)

    launcher = Path(args.launcher_script).resolve()
    if not args.report_only and not args.dry_run and not launcher.is_file():
        raise UsageError(f"launcher script {str(launcher)!r} does not exist")
    if args.num_gpus is not None and not args.report_only and not args.dry_run and shutil.which("deepspeed") is None:
        raise UsageError("--num_gpus needs the 'deepspeed' launcher on PATH, which was not found")

    grid = Grid(
        methods=methods,
        seeds=list(range(args.first_seed, args.first_seed + args.seeds)),
        base_config=base,
        configs=configs,
        output=Path(args.output).resolve(),
        data=data,
        data_seed=args.data_seed,
        max_steps=args.max_steps,
        eval_interval=args.eval_interval or (max(1, args.max_steps // 10) if args.max_steps else None),
        budget=args.budget,
        reference=reference,
        step_batch=batch,
        deepspeed_config=str(Path(args.deepspeed_config).resolve()) if args.deepspeed_config else None,
        num_gpus=args.num_gpus,
        launcher=launcher,
        extra_args=list(extra),
        model_config_path=str(Path(args.model_config).resolve()) if args.model_config else None,
        val_data=val_data,
    )
    if grid.budget == "steps":
        grid.method_steps = {m: grid.max_steps for m in methods}
    else:
        grid.method_steps = {m: None for m in methods}
        grid.method_steps[reference] = grid.max_steps
    return grid


# --------------------------------------------------------------------------- FLOPs budget


def _load_flops_fn() -> Callable:
    try:
        from camex_ds.flops import flops_per_token  # lazy: only for --budget flops
    except Exception as e:  # ImportError, or errors inside the module
        raise UsageError(f"--budget flops needs camex_ds.flops.flops_per_token, which cannot be imported ({e})")
    return flops_per_token


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


def run_spec(grid: Grid, method: str, seed: int) -> dict:
    return {
        "method": method,
        "seed": seed,
        "model_config": grid.configs[method],
        "max_steps": grid.method_steps[method],
        "data": grid.data,
        "val_data": grid.val_data,
        "data_seed": grid.data_seed,
        "eval_interval": grid.eval_interval,
        "deepspeed_config": grid.deepspeed_config,
        "launcher_args": grid.extra_args,
    }


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


def launcher_command(grid: Grid, method: str, seed: int, resume: bool) -> List[str]:
    rd = run_path(grid, method, seed)
    args = [
        str(grid.launcher),
        "--model_config", str(grid.output / "configs" / f"{method}.json"),
        *(["--data", grid.data] if grid.data else []),
        *(["--val_data", grid.val_data] if grid.val_data else []),
        "--output_dir", str(rd),
        "--max_steps", str(grid.method_steps[method]),
        "--seed", str(seed),
        "--data_seed", str(grid.data_seed),
        "--eval_interval", str(grid.eval_interval),
    ]
    if grid.deepspeed_config:
        args += ["--deepspeed_config", grid.deepspeed_config]
    if resume:
        args.append("--resume")
    args += grid.extra_args
    if grid.num_gpus is not None:
        return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(grid.num_gpus)] + args
    return [sys.executable] + args


def run_path(grid: Grid, method: str, seed: int) -> Path:
    from camex_ds.report import run_dir

    return run_dir(grid.output, method, seed)


_STEP_RE = re.compile(r"\bstep\b\s*[=:]?\s*(\d+)", re.IGNORECASE)


class _StepWatcher:
    """Latest training step of a running job: from metrics.jsonl, else from its log."""

    def __init__(self, metrics: Path, log: Path, log_offset: int):
        self.metrics, self.log = metrics, log
        self.m_off, self.l_off = 0, log_offset
        self.m_buf, self.l_buf = "", ""
        self.m_step: Optional[int] = None
        self.l_step: Optional[int] = None

    @staticmethod
    def _read(path: Path, off: int) -> Tuple[str, int]:
        try:
            with open(path, "rb") as fh:
                fh.seek(off)
                data = fh.read()
        except OSError:
            return "", off
        return data.decode("utf-8", errors="replace"), off + len(data)

    def poll(self) -> Optional[int]:
        text, self.m_off = self._read(self.metrics, self.m_off)
        if text:
            self.m_buf += text
            *lines, self.m_buf = self.m_buf.split("\n")
            for line in lines:
                try:
                    row = json.loads(line)
                    self.m_step = int(row["step"])
                except (ValueError, KeyError, TypeError):
                    continue
        if self.m_step is None:
            text, self.l_off = self._read(self.log, self.l_off)
            if text:
                self.l_buf = (self.l_buf + text)[-4096:]
                found = _STEP_RE.findall(self.l_buf)
                if found:
                    self.l_step = int(found[-1])
        return self.m_step if self.m_step is not None else self.l_step


def _tail(path: Path, n: int) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return list(deque(fh, maxlen=n))
    except OSError:
        return []


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the subprocess we started and its children (own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _execute(cmd: List[str], rd: Path, log: Path, on_step: Callable[[Optional[int]], None],
             poll_interval: float) -> int:
    rd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with open(log, "a", encoding="utf-8") as fh:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        fh.write(f"\n===== {stamp} cwd={REPO_ROOT}\n===== {shlex.join(cmd)}\n")
        fh.flush()
        offset = fh.tell()
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        watcher = _StepWatcher(rd / "metrics.jsonl", log, offset)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_interval)
                    break
                except subprocess.TimeoutExpired:
                    on_step(watcher.poll())
        except BaseException:
            _kill_group(proc)
            raise
    on_step(watcher.poll())
    return rc


def _fmt_num(x) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _grid_meta(grid: Grid) -> dict:
    return {
        "methods": grid.methods,
        "seeds": grid.seeds,
        "data": grid.data,
        "val_data": grid.val_data,
        "data_seed": grid.data_seed,
        "budget": grid.budget,
        "reference": grid.reference if grid.budget == "flops" else None,
        "max_steps": grid.max_steps,
        "max_steps_per_method": grid.method_steps,
        "tokens_per_step": grid.step_batch.tokens(grid.base_config["seq_len"]),
        "step_batch": dataclasses.asdict(grid.step_batch),
        "flops_per_token_train": grid.flops_per_token_train or None,
        "flops_budget": grid.flops_budget,
        "eval_interval": grid.eval_interval,
        "model_config": grid.model_config_path or "built-in",
        "deepspeed_config": grid.deepspeed_config,
        "num_gpus": grid.num_gpus,
        "launcher": str(grid.launcher),
        "launcher_args": grid.extra_args,
    }


def _steps_from_specs(grid: Grid) -> Dict[str, Optional[int]]:
    """max_steps per method as recorded in existing run folders (for --report_only)."""
    out: Dict[str, Optional[int]] = {}
    for m in grid.methods:
        out[m] = grid.method_steps.get(m)
        if out[m] is None:
            for s in grid.seeds:
                try:
                    out[m] = json.loads((run_path(grid, m, s) / "run_spec.json").read_text())["max_steps"]
                    break
                except (OSError, ValueError, KeyError):
                    continue
    return out


def write_grid_report(grid: Grid, bootstrap_resamples: int, band: str) -> Dict[str, Path]:
    from camex_ds.report import write_report

    steps = _steps_from_specs(grid)
    meta = _grid_meta(grid)
    meta["max_steps_per_method"] = steps
    meta["bootstrap_resamples"] = bootstrap_resamples
    return write_report(grid.output, grid.methods, grid.seeds, meta=meta, max_steps=steps,
                        n_resamples=bootstrap_resamples, band=band)


def run_grid(grid: Grid, progress: bool = True, dry_run: bool = False,
             flops_fn: Optional[Callable] = None, poll_interval: float = 1.0,
             out=None, err=None) -> int:
    """Train every unfinished run of ``grid``; returns 0, or 1 when a run failed."""
    out = out or sys.stdout
    err = err or sys.stderr
    from tqdm import tqdm

    if grid.budget == "flops":
        flops_fn = flops_fn or _load_flops_fn()
    order = list(grid.methods)
    if grid.budget == "flops":
        order.remove(grid.reference)
        order.insert(0, grid.reference)
    runs = [(m, s) for m in order for s in grid.seeds]

    def resolve_flops_budget() -> None:
        if grid.budget != "flops" or all(v is not None for v in grid.method_steps.values()):
            return
        steps, fpt, budget = flops_budget_steps(grid.configs, grid.reference, grid.max_steps, grid.step_batch, flops_fn)
        for m, n in steps.items():
            if n < 1:
                raise UsageError(f"the FLOPs budget of {grid.reference} ({budget:.3e}) buys {m} less than one "
                                 f"step; raise --max_steps")
        grid.method_steps, grid.flops_per_token_train, grid.flops_budget = steps, fpt, budget

    resolve_flops_budget()

    for m in grid.methods:
        _write_json(grid.output / "configs" / f"{m}.json", grid.configs[m])
    # fail fast on settings clashes of runs whose max_steps is already known
    for m, s in runs:
        if grid.method_steps[m] is not None:
            check_spec(run_path(grid, m, s), run_spec(grid, m, s), f"{m}/seed{s}")
    _write_json(grid.output / "grid.json", _grid_meta(grid))

    if dry_run:
        for m, s in runs:
            rp = run_path(grid, m, s)
            if (rp / "final_metrics.json").exists():
                print(f"# {m}/seed{s}: finished, skipped", file=out)
            elif grid.method_steps[m] is None:
                print(f"# {m}/seed{s}: max_steps is set by the FLOPs budget once {grid.reference} has run", file=out)
            else:
                print(shlex.join(launcher_command(grid, m, s, has_checkpoint(rp))), file=out)
        return 0

    n_done = sum((run_path(grid, m, s) / "final_metrics.json").exists() for m, s in runs)
    interactive = bool(getattr(err, "isatty", lambda: False)())
    bar = tqdm(total=len(runs), initial=n_done, unit="run", dynamic_ncols=True, disable=not progress,
               smoothing=0.1, file=err, mininterval=0.5 if interactive else 30.0,
               bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total} runs "
                          "[{elapsed}<{remaining}{postfix}]")
    bar.set_description_str("grid ")
    try:
        for m, s in runs:
            rp = run_path(grid, m, s)
            label = f"{m}/seed{s}"
            if (rp / "final_metrics.json").exists():
                continue
            spec = run_spec(grid, m, s)
            check_spec(rp, spec, label)
            rp.mkdir(parents=True, exist_ok=True)
            resume = has_checkpoint(rp)
            if not resume and (rp / "metrics.jsonl").exists():
                os.replace(rp / "metrics.jsonl", rp / "metrics.jsonl.prev")
            _write_json(rp / "run_spec.json", spec)
            cmd = launcher_command(grid, m, s, resume)
            max_steps = grid.method_steps[m]
            state = {"frac": 0.0}

            def on_step(step: Optional[int], _label=label, _max=max_steps, _state=state, _resume=resume) -> None:
                txt = f"{_label}{' (resumed)' if _resume else ''} step {step if step is not None else '?'}/{_max}"
                if txt != _state.get("txt"):
                    bar.set_postfix_str(txt, refresh=False)
                    _state["txt"] = txt
                delta = 0.0
                if step is not None and _max:
                    frac = min(max(step / _max, 0.0), 0.999)
                    if frac > _state["frac"]:
                        delta = frac - _state["frac"]
                        _state["frac"] = frac
                bar.update(delta)  # redraws at most every `mininterval` seconds

            on_step(None)
            t0 = time.time()
            rc = _execute(cmd, rp, rp / "log.txt", on_step, poll_interval)
            final = rp / "final_metrics.json"
            if rc != 0 or not final.exists():
                bar.close()
                why = f"exit code {rc}" if rc != 0 else "exit code 0 but no final_metrics.json was written"
                tail = _tail(rp / "log.txt", LOG_TAIL_LINES)
                msg = [
                    f"{PROG}: run {label} failed ({why}).",
                    f"command: {shlex.join(cmd)}",
                    f"working directory: {REPO_ROOT}",
                    f"log: {rp / 'log.txt'}",
                    f"--- last {len(tail)} lines of the log ---",
                    "".join(tail).rstrip("\n"),
                    "--- end of log ---",
                    "Finished runs are kept; rerun the same command to resume the grid.",
                ]
                print("\n".join(msg), file=err)
                return 1
            n_done += 1
            bar.update(n_done - bar.n)  # land exactly on an integer (no float drift)
            try:
                fm = json.loads(final.read_text())
            except ValueError:
                fm = {}
            bar.write(f"finished {label}: val_bpb={_fmt_num(fm.get('val_bpb'))} "
                      f"val_loss={_fmt_num(fm.get('val_loss'))} in {time.time() - t0:.0f}s", file=err)
        resolve_flops_budget()
    finally:
        bar.close()
    _write_json(grid.output / "grid.json", _grid_meta(grid))
    return 0


def _split_extra(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[Sequence[str]] = None, flops_fn: Optional[Callable] = None,
         poll_interval: float = 1.0) -> int:
    own, extra = _split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)

    def body() -> int:
        grid = make_grid(args, extra)
        if not args.report_only:
            rc = run_grid(grid, progress=not args.no_progress, dry_run=args.dry_run,
                          flops_fn=flops_fn, poll_interval=poll_interval)
            if rc != 0 or args.dry_run:
                return rc
        paths = write_grid_report(grid, args.bootstrap_resamples, args.band)
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
        return 0

    return run_cli(body, (UsageError,), prefix=f"{PROG}: ",
                   interrupted="interrupted; finished runs are kept, rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
