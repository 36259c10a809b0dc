#!/usr/bin/env python
"""Predicted (camex_ds.analysis.memory) against measured (camex_ds.analysis.measured_memory) peak memory per rank of
DeepSpeed training steps, for the configurations of docs/memory.md's table; one row per configuration.

    python tools/bench_memory.py                 # every configuration, ep 2 ones on two local ranks
    python tools/bench_memory.py --only camex-z2 --json
    python tools/bench_memory.py --repeats 3     # each row's median of 3 runs, and their range

A run's peak can differ from the next one's by up to a few MiB at these sizes (ep 2 most): the same allocations,
but some tensors are freed from other threads (the collectives') or by the garbage collector, whose timing varies.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from typing import NamedTuple

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 256, "seq_len": 128, "vocab_size": 512}
MOE = {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 32}
# the checkpointing rows: four blocks, so that recomputing them changes the peak by more than one block's activations
DEEP = {**BASE, "n_layers": 4}


class Config(NamedTuple):
    """One row: the model, ZeRO stage and micro-batch, and the rest as the trainer's flags would set them."""

    model: dict
    stage: int
    micro: int
    world: int = 1  # ranks, each measured in its own process
    accumulation: int = 1
    bf16: bool = False
    checkpoint_every: int = 0  # --activation_checkpointing_interval (0: off)


CONFIGS = {
    "dense-z0": Config({**BASE, "moe": None}, 0, 8),
    "camex-z0": Config({**BASE, "moe": MOE}, 0, 8),
    "camex-z2": Config({**BASE, "moe": MOE}, 2, 4),
    "camex-z2-bf16": Config({**BASE, "moe": MOE}, 2, 4, bf16=True),
    "camex-z1-acc4": Config({**BASE, "moe": MOE}, 1, 2, accumulation=4),
    "dynamic-z0": Config({**BASE, "moe": {**MOE, "dynamic": True}}, 0, 4),
    "camex-ep2-z2": Config({**BASE, "moe": {**MOE, "ep_size": 2}}, 2, 4, world=2),
    "dynamic-ep2-z1": Config({**BASE, "moe": {**MOE, "dynamic": True, "num_experts": 5, "ep_size": 2}}, 1, 4, world=2),
    "dense-z0-ckpt": Config({**DEEP, "moe": None}, 0, 8, checkpoint_every=1),
    "camex-z0-ckpt": Config({**DEEP, "moe": MOE}, 0, 8, checkpoint_every=1),
    "camex-z0-ckpt2": Config({**DEEP, "moe": MOE}, 0, 8, checkpoint_every=2),
    "camex-z1-acc4-ckpt": Config({**DEEP, "moe": MOE}, 1, 2, accumulation=4, checkpoint_every=1),
    "dynamic-z0-ckpt": Config({**DEEP, "moe": {**MOE, "dynamic": True}}, 0, 4, checkpoint_every=1),
    "camex-ep2-z2-ckpt": Config({**DEEP, "moe": {**MOE, "ep_size": 2}}, 2, 4, world=2, checkpoint_every=1),
    "dynamic-ep2-z1-ckpt": Config({**DEEP, "moe": {**MOE, "dynamic": True, "num_experts": 5, "ep_size": 2}}, 1, 4,
                                  world=2, checkpoint_every=1),
}
BUCKET = 100_000


def ds_config(c: Config) -> dict:
    return {"train_micro_batch_size_per_gpu": c.micro, "gradient_accumulation_steps": c.accumulation,
            "zero_optimization": {"stage": c.stage, "reduce_bucket_size": BUCKET},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": c.bf16}}


def measure_here(name: str) -> int:
    """This rank's measured peak for configuration `name`."""
    from camex_ds.analysis.measured_memory import measure_train_memory

    c = CONFIGS[name]
    return measure_train_memory(c.model, ds_config(c), checkpoint_every=c.checkpoint_every)["peak"]


def measure(name: str) -> int:
    """The largest rank's measured peak, in `world` fresh rank processes: the merge layers' CPU work buffers outlive
    a run (`functional._scratch`), so a second configuration measured in one process would find them allocated."""
    world = CONFIGS[name].world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, __file__, "--rank_of", name], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       OMP_NUM_THREADS="1")) for r in range(world)]
    peaks = [int(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return max(peaks)


def predict(name: str) -> int:
    from camex_ds.analysis.memory import memory

    c = CONFIGS[name]
    return memory(c.model, micro_batch=c.micro, zero_stage=c.stage, world_size=c.world, accumulation=c.accumulation,
                  bf16=c.bf16, checkpoint_every=c.checkpoint_every or None, reduce_bucket_size=BUCKET,
                  gpu=False)["peak"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(CONFIGS), help="measure these configurations only")
    p.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times (the median)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rank_of", help=argparse.SUPPRESS)  # one rank of a multi-rank measurement
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} is invalid: expected an integer >= 1")
    if args.rank_of:
        print(measure_here(args.rank_of))
        return 0
    rows = []
    for name in args.only or CONFIGS:
        runs = [measure(name) for _ in range(args.repeats)]
        measured, predicted = statistics.median(runs), predict(name)
        rows.append({"config": name, "predicted": predicted, "measured": measured, "ratio": predicted / measured,
                     "range": [min(runs), max(runs)]})
        if not args.json:
            print(f"{name:20s} predicted {predicted / 2**20:8.2f} MiB  measured {measured / 2**20:8.2f} MiB  "
                  f"ratio {predicted / measured:.3f}  range {min(runs) / 2**20:.2f}-{max(runs) / 2**20:.2f} MiB",
                  flush=True)
    if args.json:
        print(json.dumps(rows))  # one line, the last: DeepSpeed logs to stdout too
    return 0


if __name__ == "__main__":
    sys.exit(main())
