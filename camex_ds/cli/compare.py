"""`camex-compare` (`python tools/compare_methods.py`): train a grid of (method x seed) pretraining runs with launcher/pretrain.py and
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
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..analysis.grid import (SMOE_DEFAULT_TOP_K, Grid, UsageError, build_method_config, step_batch,
                             validate_configs, write_grid_report)
from ..analysis.supervise import run_grid
from ..config import (COMPARED_METHODS, DEFAULT_DEEPSPEED_CONFIG, DEFAULT_MODEL_CONFIG, EUCLIDEAN_TWIN, METHODS,
                      REPO_ROOT, default_model)
from . import ArgumentParser, run_cli

PROG = "compare_methods.py"
DEFAULT_LAUNCHER = REPO_ROOT / "launcher" / "pretrain.py"
DEFAULT_METHODS = ",".join(COMPARED_METHODS)
DEFAULT_DATA_SEED = 1234
#: The base config when --model_config is not given: the default model (`config.DEFAULT_MODEL_CONFIG`).
DEFAULT_BASE_CONFIG = default_model()


EPILOG = f"""\
methods:
  dense        no MoE layers ("moe": null)
  smoe         sparse top-k MoE ("top_k": {SMOE_DEFAULT_TOP_K} unless the base config is smoe with its own top_k)
  {", ".join(EUCLIDEAN_TWIN.values()):<39}Euclidean expert merging
  {", ".join(EUCLIDEAN_TWIN):<39}curvature-aware twins of {", ".join(EUCLIDEAN_TWIN.values())}
  Each method's config is the base config with "moe.method" replaced (and
  "moe": null for dense); other MoE fields come from the base config, or from
  the default model's MoE block when the base config is dense.

budget:
  steps  every method trains --max_steps steps.
  flops  the reference method (--reference, default: first of --methods) trains
         --max_steps steps; its training FLOPs
             budget = max_steps * tokens_per_step * flops_per_token_train(reference)
         are given to every other method as
             max_steps(m) = floor(budget / (flops_per_token_train(m) * tokens_per_step))
         with tokens_per_step = micro batch x grad accumulation x GPUs x seq_len
         and flops_per_token_train = camex_ds.analysis.flops.flops_per_token(cfg, seq_len,
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
    p = ArgumentParser(
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
                   help="base model config JSON (see launcher/pretrain.py); default: the launcher's small "
                   f"default model, {os.path.relpath(DEFAULT_MODEL_CONFIG, REPO_ROOT)}")
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


def _source(flag: str, value: Optional[str]) -> Optional[str]:
    """A --data/--val_data value as the launcher will get it: hub names as given, paths absolute and existing."""
    if value is None or value.startswith("hf:"):
        return value
    if not os.path.exists(value):
        raise UsageError(f"{flag} path {value!r} does not exist (expected a text/.jsonl/.parquet file, "
                         f"a folder of them, a preprocessed dataset folder, or hf:NAME[:CONFIG])")
    return str(Path(value).resolve())


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
    validate_configs(configs)
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


def _split_extra(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[Sequence[str]] = None, *, flops_fn: Optional[Callable] = None,
         poll_interval: float = 1.0) -> int:
    """`camex-compare`; `flops_fn` (FLOPs per token for --budget flops) and `poll_interval` (seconds between
    looks at a running job) are for tests."""
    own, extra = _split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)

    def body() -> int:
        grid = make_grid(args, extra)
        if not args.report_only:
            rc = run_grid(grid, PROG, progress=not args.no_progress, dry_run=args.dry_run,
                          flops_fn=flops_fn, poll_interval=poll_interval)
            if rc != 0 or args.dry_run:
                return rc
        paths = write_grid_report(grid, args.bootstrap_resamples, args.band)
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
        return 0

    return run_cli(body, (UsageError,), prefix=f"{PROG}: ",
                   interrupted="interrupted; finished runs are kept, rerun the same command to resume")
