"""Pretrain a CAMEx mixture-of-experts GPT with DeepSpeed.

With no flags: a small CAMEx model on the default corpus (this Python's standard-library sources),
a few minutes on 2 CPU cores. Runs as plain `python` (one rank) or under the DeepSpeed launcher:

    camex-pretrain                                    (or: python -m camex_ds.cli.pretrain)
    deepspeed --num_gpus 2 --module camex_ds.cli.pretrain --ep_size 2   (in a checkout: launcher/pretrain.py)
    deepspeed --hostfile ds_configs/hostfile --num_nodes 2 launcher/pretrain.py --deepspeed_config ds_configs/gpu_zero2_bf16.json

Writes to --output_dir: metrics.jsonl, final_metrics.json, tensorboard/, checkpoints/ (resume with --resume).
Every checkpoint is verified (sizes and sha256) before a resume loads it; `python checkpoints/zero_to_fp32.py
checkpoints/ out/` extracts the fp32 weights as DeepSpeed's script does. Exit codes: 0 done, 1 a lost rank or a
NaN/Inf step, 2 bad input (one `error:` line), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from camex_ds.cli import ArgumentParser
from camex_ds.config import ConfigError
from camex_ds.run_args import TrainArgs

# The name in argparse's error lines: the same whether the launcher script, `camex-pretrain` or a test calls main
PROG = "pretrain.py"


def _value_type(annotation) -> type:
    """`int` for `int` and `Optional[int]`: what argparse converts a flag's text to."""
    return next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)


def add_dataclass_arguments(ap: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the dataclass `cls`, from the field's default, type and metadata (help, metavar, a
    `flag` for a boolean that defaults to true): the dataclass is the one home of every default."""
    from camex_ds.data import DATA_HELP

    types = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = dict(field.metadata)
        flag = meta.pop("flag", f"--{field.name}")
        if meta.pop("data_forms", False):
            meta["help"] += DATA_HELP
        kind = _value_type(types[field.name])
        if kind is bool:  # a switch: --x turns a false default on, a named flag turns a true default off
            action = "store_false" if field.default else "store_true"
            ap.add_argument(flag, dest=field.name, action=action, **meta)
        else:
            ap.add_argument(flag, dest=field.name, type=kind, default=field.default, **meta)


def parse_args(argv=None) -> TrainArgs:
    """The flags as a `TrainArgs`; a bad one exits 2 with one line: argparse's for a malformed flag, `error: ...`
    (as every other user error) for a value `TrainArgs` refuses."""
    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(ap, TrainArgs)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = vars(ap.parse_args(argv))
    try:
        return TrainArgs(**{field.name: args[field.name] for field in dataclasses.fields(TrainArgs)})
    except ConfigError as e:
        ap.exit(2, f"error: {e}\n")


def main(argv=None) -> int:
    """Train with the flags in `argv` (default: the command line); the process's exit code."""
    train_args = parse_args(argv)
    from camex_ds.cli import run_cli
    from camex_ds.data import DataError
    from camex_ds.ckpt.format import PretrainedError
    from camex_ds.deepspeed_adapter import warn_if_untested
    from camex_ds.train import CheckpointError

    warn_if_untested()
    return run_cli(lambda: _train(train_args), (ConfigError, DataError, CheckpointError, PretrainedError, OSError))


def _train(train_args: TrainArgs) -> int:
    from camex_ds import parallel
    from camex_ds.train import NonFiniteError, run
    from camex_ds.train.peers import describe, is_communication_error

    try:
        final = run(train_args)
    except NonFiniteError as e:  # a fault, not bad input: one line, exit 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        if not is_communication_error(e):
            raise
        print(f"error: {describe(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the group is broken: tearing it down can abort in gloo's destructors (SIGABRT, 1 run in 4)
    finally:
        parallel.shutdown()
    if final.get("rank") == 0 and "val_ppl" in final:
        print(f"done: step {final['step']}  train loss {final['train_loss']:.4f}  val loss {final['val_loss']:.4f}  "
              f"val ppl {final['val_ppl']:.2f}  val bpb {final['val_bpb']:.4f}  {final['tokens_per_s']:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
