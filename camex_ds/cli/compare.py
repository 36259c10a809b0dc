"""`camex-compare` (`python tools/compare_methods.py`): train a grid of (method x arm x seed) runs with the
installed package's trainer (`camex-pretrain`), from scratch or fine-tuning an upcycled dense model, and compare the
methods statistically.

Every run is started as its own subprocess exactly as a user would start it::

    python -m camex_ds.cli.pretrain --model_config OUT/configs/<method>.json \\
        --data DATA --output_dir OUT/runs/<method>/seed<k> --max_steps N \\
        --seed <k> --data_seed D --eval_interval E [--deepspeed_config DS] [--resume]

(``--init_from OUT/upcycled/<method>-<key>`` instead of ``--model_config`` when the grid fine-tunes
``--init_from DENSE``; ``deepspeed --num_gpus G --module camex_ds.cli.pretrain ...`` with ``--num_gpus G``).
All runs of one seed share the data order and the upcycled routers, so paired runs differ only in the method.

Outputs in OUT: ``configs/<variant>.json`` (model config of each variant), ``runs/<variant>/seed<k>/`` (one
folder per run: the launcher's files plus ``log.txt`` with its stdout/stderr and ``run_spec.json``),
``upcycled/`` (fine-tuning grids), ``grid.json``, ``results.json``, ``results.md`` and the figures it shows.
A variant is a method with the swept settings that act on it: ``camex`` or ``camex/curvature_rank=8``.

Running the same command again resumes the grid: finished runs (with
``final_metrics.json``) are skipped, unfinished runs restart with ``--resume``
when their folder holds a checkpoint and from scratch otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from ..analysis.arms import moe_keys
from ..analysis.grid import SMOE_DEFAULT_TOP_K, UsageError, write_grid_report
from ..analysis.options import GridOptions, make_grid
from ..analysis.supervise import run_grid
from ..config import EUCLIDEAN_TWIN, METHODS
from ..run_args import DEFAULT_MODEL_CONFIG, default_model
from . import ArgumentParser, run_cli

PROG = "compare_methods.py"
DEFAULTS = GridOptions(output="")
#: The base config when --model_config is not given: the default model (`run_args.DEFAULT_MODEL_CONFIG`).
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

fine-tuning (--init_from DENSE_MODEL):
  The base config is the dense model's own.  Every method but dense starts
  from an upcycled copy (camex_ds.ckpt.upcycle, as camex-convert upcycle:
  every expert a copy of the dense FFN, so it computes the dense function),
  made once per variant into OUT/upcycled/<method>-<key> and reused while its
  key (the dense model, the variant's config, --upcycle_seed) is unchanged;
  dense fine-tunes DENSE_MODEL itself.  All of one seed's runs share the
  routers' seed and the data order, so a pair differs only in the method.

MoE settings and sweeps:
  --moe MOE.json and --moe_set KEY=VALUE set MoE keys for every method (over
  the base config's MoE block; VALUE is JSON, or a word such as 'segment').
  --sweep KEY=V1,V2,... makes each value an arm; several --sweep flags make
  the product.  Runs are named runs/<method>[/<key>=<value>,...]/seed<k>: the
  arm's keys that act on the method (curvature_* keys act only on camex*,
  none on dense), so e.g. a rank sweep trains euclid once.  Each arm has its
  own tables, pairs (each method against its twin and dense, same seeds) and
  figures.  Every value is checked by MoEConfig before anything runs.

budget:
  steps  every method trains --max_steps steps.
  flops  the reference method (--reference, default: first of --methods; with
         --sweep, in the first arm) trains --max_steps steps; its training FLOPs
             budget = max_steps * tokens_per_step * flops_per_token_train(reference)
         are given to every other method as
             max_steps(m) = floor(budget / (flops_per_token_train(m) * tokens_per_step))
         with tokens_per_step = micro batch x grad accumulation x GPUs x seq_len
         and flops_per_token_train = camex_ds.analysis.flops.flops_per_token(cfg, seq_len,
         micro batch x seq_len, accumulation=grad accumulation)["train"]: each
         rank curves its experts once per optimizer step over its own tokens.
         The batch comes from --deepspeed_config (the launcher's default
         ds_configs/cpu.json without it) and --num_gpus.
  Either way the report also compares each pair where the shorter run ended,
  in training FLOPs and in steps, reading the longer run's value off its
  evaluations (linear between two), with the pair's FLOPs ratio.

resuming:
  Rerun the same command.  OUT/runs/<variant>/seed<k>/final_metrics.json marks a
  finished run (skipped); an unfinished run restarts with --resume if its folder
  holds a checkpoint (a 'latest' file, a global_step* folder or a *.pt/.pth/.ckpt/
  .safetensors file, at most two levels deep), otherwise from scratch (an
  old metrics.jsonl is moved to metrics.jsonl.prev).  Each run folder keeps a
  run_spec.json; rerunning into OUT with different settings for an existing
  run (max_steps, config, data, starting model, ...) is refused - use a new
  --output.

outputs (in OUT):
  results.json  per method: per-seed final val_loss, val_ppl, val_bpb,
                tokens_per_s, flops_per_token and their mean / sample std;
                per pair (each camex* vs its Euclidean twin, every other
                method vs euclid, every method vs dense): mean paired
                difference (A - B; negative = A better) of val_bpb and
                val_loss, paired t-test p-value, percentile bootstrap CI, n,
                the FLOPs ratio and the equal-FLOPs / equal-steps comparisons;
                per method the diagnostics (curvature distance from identity,
                task-vector norm, router entropy: final_metrics.json, else the
                per-layer values of metrics.jsonl).  Undefined numbers are null.
                With --sweep: {{"meta", "arms_order", "arms": {{label: ...}}}}.
  results.md    the same as Markdown tables, per arm.
  curves.png    validation bpb vs step and vs training FLOPs, mean over seeds
                with a min-max (or +-std, --band std) band (curves-<arm>.png).
  diagnostics.png  the per-layer diagnostics vs step (diagnostics-<arm>.png).

extra launcher arguments:
  Arguments after a literal '--' are appended to every launcher command.

exit codes: 0 success, 1 a run failed (its log tail and exact command are
printed; finished runs are kept), 2 bad input, 130 interrupted.

examples:
  python tools/compare_methods.py --data data/tiny.txt --methods euclid,camex \\
      --seeds 3 --max_steps 500 --budget flops --output out/cmp
  python tools/compare_methods.py --init_from out/dense --data wiki/train.txt \\
      --val_data wiki/valid.txt --methods dense,euclid,ties,camex,camex-ties \\
      --moe_set num_experts=7 --moe_set curvature_rank=8 --sweep curvature_rank=1,8 \\
      --seeds 3 --max_steps 1000 --output out/finetune
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Train every (method, arm, seed) of a grid with camex-pretrain's trainer as subprocesses\n"
        "(resumable), from scratch or fine-tuning an upcycled dense model (--init_from),\n"
        "and write results.json, results.md and figures comparing the methods over seeds\n"
        "(mean/std, paired t-test, bootstrap CI, equal-FLOPs comparison, diagnostics).\n\n"
        "Arguments after a literal '--' are passed on to every launcher command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    g = p.add_argument_group("grid")
    g.add_argument("--data", metavar="DATA",
                   help="training data passed to the launcher's --data: a text/.jsonl/.parquet file, a folder "
                   "of them or a preprocessed dataset folder (must exist), or hf:NAME[:CONFIG]; default: the "
                   "launcher's default corpus (this Python's standard-library sources)")
    g.add_argument("--val_data", metavar="VAL",
                   help="a separate validation source for the launcher's --val_data (a corpus's valid.txt; same "
                   "forms as --data): every run validates on it and trains on all of --data")
    g.add_argument("--methods", default=d.methods, metavar="M1,M2,...",
                   help=f"comma-separated methods, from: {', '.join(METHODS)} (default: {d.methods})")
    g.add_argument("--seeds", type=int, default=d.seeds, metavar="K",
                   help=f"number of seeds per method, >= 1; seeds are FIRST_SEED..FIRST_SEED+K-1 (default: {d.seeds})")
    g.add_argument("--arm_seeds", type=int, metavar="K2",
                   help="with --sweep: seeds of every arm but the first, the first K2 of --seeds (the first arm, "
                   "usually the reference settings, keeps all; a method the sweep does not change runs the seeds "
                   "of every arm it is in; default: --seeds)")
    g.add_argument("--first_seed", type=int, default=d.first_seed, metavar="S",
                   help=f"first seed value (default: {d.first_seed})")
    g.add_argument("--max_steps", type=int, metavar="N",
                   help="training steps of every method (--budget steps) or of the reference method "
                   "(--budget flops); required unless --report_only")
    g.add_argument("--model_config", metavar="CFG.json",
                   help="base model config JSON (see launcher/pretrain.py); default: the launcher's small "
                   f"default model, {DEFAULT_MODEL_CONFIG}")
    g.add_argument("--budget", choices=("steps", "flops"), default=d.budget,
                   help=f"equal training steps or equal training FLOPs across methods (default: {d.budget})")
    g.add_argument("--reference", metavar="METHOD",
                   help="reference method of --budget flops (default: first of --methods)")
    g.add_argument("--output", required=True, metavar="DIR", help="output folder (created; reused to resume)")

    u = p.add_argument_group("MoE settings, sweeps and upcycling (see 'fine-tuning' below)")
    u.add_argument("--init_from", metavar="DENSE_MODEL",
                   help="a consolidated dense model folder (camex-convert consolidate or import-hf): every method "
                   "fine-tunes its upcycled copy (experts = the dense FFN), dense fine-tunes it as it is")
    u.add_argument("--moe", metavar="MOE.json",
                   help="a JSON object of MoE settings for every method, over the base config's MoE block")
    u.add_argument("--moe_set", action="append", default=[], metavar="KEY=VALUE",
                   help="one MoE setting for every method, over --moe (repeatable; VALUE is JSON or a word), "
                   f"KEY from: {', '.join(moe_keys())}")
    u.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep a MoE key: each value is an arm of the report (repeatable: the arms are the "
                   "product of the sweeps)")
    u.add_argument("--upcycle_seed", type=int, default=d.upcycle_seed, metavar="S",
                   help=f"router seed of every upcycled model (default: {d.upcycle_seed})")

    r = p.add_argument_group("launcher")
    r.add_argument("--num_gpus", type=int, metavar="G",
                   help="start runs with 'deepspeed --num_gpus G' instead of the current Python interpreter")
    r.add_argument("--eval_interval", type=int, metavar="E",
                   help="evaluation interval in steps (default: max(1, max_steps // 10))")
    r.add_argument("--eval_batches", type=int, metavar="B",
                   help="validation batches per evaluation, passed to every run (default: the launcher's)")
    r.add_argument("--eval_windows", type=int, metavar="W",
                   help="validation windows (seq_len + 1 tokens each) per evaluation, passed to every run: the same "
                   "set at any micro batch (default: the launcher's; excludes --eval_batches)")
    r.add_argument("--data_seed", type=int, default=d.data_seed, metavar="D",
                   help=f"data-order seed shared by all runs (default: {d.data_seed})")
    r.add_argument("--seed_data_order", action="store_true",
                   help="seed k trains on data order D+k (the same for every method of seed k), so seeds also "
                   "sample the data order; without it every run sees order D")
    r.add_argument("--deepspeed_config", metavar="DS.json", help="DeepSpeed config passed to every run")
    # hidden: lets tests substitute a fake training script for the package's trainer (camex_ds.cli.pretrain)
    r.add_argument("--launcher_script", default=d.launcher_script, help=argparse.SUPPRESS)

    o = p.add_argument_group("report")
    o.add_argument("--bootstrap_resamples", type=int, default=10_000, metavar="B",
                   help="bootstrap resamples for the confidence intervals (default: 10000)")
    o.add_argument("--band", choices=("minmax", "std"), default="minmax",
                   help="shaded band in the curves: min-max over seeds or +-1 sample std (default: minmax)")
    o.add_argument("--report_only", action="store_true",
                   help="do not train; only (re)write the report from the runs already in --output")
    o.add_argument("--dry_run", action="store_true",
                   help="print the launcher commands that would run, then exit")
    o.add_argument("--no_progress", action="store_true", help="disable the progress bar")
    return p


def _split_extra(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def options_of(args: argparse.Namespace, extra: Sequence[str]) -> GridOptions:
    """The parsed flags as the library's typed grid options."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GridOptions) if hasattr(args, f.name)}
    return GridOptions(**given, extra_args=list(extra))


def main(argv: Optional[Sequence[str]] = None, *, flops_fn: Optional[Callable] = None,
         poll_interval: float = 1.0) -> int:
    """`camex-compare`; `flops_fn` (FLOPs per token for --budget flops) and `poll_interval` (seconds between
    looks at a running job) are for tests."""
    own, extra = _split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)

    def body() -> int:
        if args.bootstrap_resamples < 1:
            raise UsageError(f"--bootstrap_resamples must be >= 1, got {args.bootstrap_resamples}")
        grid = make_grid(options_of(args, extra))
        if not args.report_only:
            rc = run_grid(grid, PROG, progress=not args.no_progress, dry_run=args.dry_run,
                          flops_fn=flops_fn, poll_interval=poll_interval)
            if rc != 0 or args.dry_run:
                return rc
        paths = write_grid_report(grid, args.bootstrap_resamples, args.band)
        print(f"wrote {paths['json']}, {paths['md']} and its figures")
        return 0

    return run_cli(body, (UsageError,), prefix=f"{PROG}: ",
                   interrupted="interrupted; finished runs are kept, rerun the same command to resume")
