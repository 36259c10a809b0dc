"""`camex-study` (`python tools/curvature_study.py`): issue 24's curvature study in one resumable command: pretrain a
dense base, fine-tune its upcycled copies with the paper's protocol (and a sweep of the curvature's learning-rate
scale and rank), train the same methods from scratch, and write one report. The logic is
`camex_ds.analysis.study`'s."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

from ..analysis.grid import UsageError
from ..analysis.study import EVAL_WINDOWS_CAP, PLANS, STUDY_METHODS, StudySettings, run_study
from . import ArgumentParser, run_cli

PROG = "curvature_study.py"


def _plan_default(key: str) -> str:
    return f"(full: {PLANS['full'][key]}, --quick: {PLANS['quick'][key]})"


EPILOG = f"""\
stages (each a camex-compare grid in its own folder of --output; rerun the same command to resume):
  pretrain/   a dense model (the default model's size; --quick: a tiny one) pretrained on --base_data,
              consolidated into dense_model/
  finetune/   methods {", ".join(STUDY_METHODS)}: dense fine-tunes dense_model/ as it is, every
              other method its upcycled copy (7 experts, curvature rank 8, 4 segments per sequence);
              fine-tuned on --data, evaluated on all of --val_data (up to {EVAL_WINDOWS_CAP} windows); arms:
              curvature_lr_scale 1,10,100 (--quick: 1,100) x curvature_rank 8,1, the first
              arm being the reference (every seed; the other arms: --sweep_seeds); seed k trains on
              data order 1234+k for every method
  scratch/    the same methods trained from scratch on --data at the default MoE settings
  scratch_scaled/  euclid, ties, camex, camex-ties from scratch again (--sweep_seeds seeds) at the
              largest curvature_lr_scale of the fine-tuning sweep: a setting that wins there is
              tried in both protocols

outputs (in --output): report.md (the plan, measured time and every stage's tables and figures),
results.json, study.log, and each stage's results.md, results.json, figures and run logs.

The plan (runs, steps, estimated time) is printed first; --plan prints it and exits.
exit codes: 0 done, 1 a run failed (its log tail is printed; rerun to resume), 2 bad input, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    d = StudySettings()
    p = ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=d.output, metavar="DIR", help=f"study folder (default: {d.output})")
    p.add_argument("--quick", action="store_true",
                   help="a tiny model, 2-3 steps per run, one seed: every stage and arm in about 1.5 minutes on 2 cores")
    p.add_argument("--seeds", type=int, metavar="K", help=f"seeds per method {_plan_default('seeds')}")
    p.add_argument("--sweep_seeds", type=int, metavar="K2",
                   help="seeds of the fine-tuning sweep's arms other than the reference (the first K2 of --seeds; "
                   f"the reference arm keeps all) {_plan_default('sweep_seeds')}")
    p.add_argument("--pretrain_steps", type=int, metavar="N",
                   help=f"steps of the dense pretraining {_plan_default('pretrain_steps')}")
    p.add_argument("--finetune_steps", type=int, metavar="N",
                   help=f"steps of each upcycled fine-tuning run {_plan_default('finetune_steps')}")
    p.add_argument("--scratch_steps", type=int, metavar="N",
                   help=f"steps of each from-scratch run {_plan_default('scratch_steps')}")
    p.add_argument("--finetune_lr", type=float, metavar="LR",
                   help=f"peak learning rate of the fine-tuning {_plan_default('finetune_lr')}; the paper's 5e-6 "
                   "suits GPT-2 over 10 epochs, not a small model over about one")
    p.add_argument("--base_data", metavar="DATA",
                   help="pretraining corpus (any launcher --data form; default: the launcher's default corpus, "
                   "this Python's standard-library sources)")
    p.add_argument("--data", metavar="TRAIN",
                   help="the second corpus's training text (default: this Python's standard-library docstrings, "
                   "written to OUTPUT/prose/train.txt)")
    p.add_argument("--val_data", metavar="VALID", help="the second corpus's held-out text (with --data)")
    p.add_argument("--plan", dest="plan_only", action="store_true", help="print the plan and exit")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = StudySettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)})
    return run_cli(lambda: run_study(settings), (UsageError,), prefix=f"{PROG}: ",
                   interrupted="interrupted; finished runs are kept, rerun the same command to resume")
