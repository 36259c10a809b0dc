#!/usr/bin/env python
"""Predicted (camex_ds.analysis.memory) against measured (camex_ds.analysis.measured_memory) peak memory per rank of
DeepSpeed training steps, for the configurations of docs/memory.md's table; one row per configuration.

    python tools/bench_memory.py                 # every configuration, ep 2 ones on two local ranks
    python tools/bench_memory.py --only camex-z2 --json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 256, "seq_len": 128, "vocab_size": 512}
MOE = {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 32}
# name -> (model config, ZeRO stage, micro-batch, world size, accumulation, bf16)
CONFIGS = {
    "dense-z0": ({**BASE, "moe": None}, 0, 8, 1, 1, False),
    "camex-z0": ({**BASE, "moe": MOE}, 0, 8, 1, 1, False),
    "camex-z2": ({**BASE, "moe": MOE}, 2, 4, 1, 1, False),
    "camex-z2-bf16": ({**BASE, "moe": MOE}, 2, 4, 1, 1, True),
    "camex-z1-acc4": ({**BASE, "moe": MOE}, 1, 2, 1, 4, False),
    "dynamic-z0": ({**BASE, "moe": {**MOE, "dynamic": True}}, 0, 4, 1, 1, False),
    "camex-ep2-z2": ({**BASE, "moe": {**MOE, "ep_size": 2}}, 2, 4, 2, 1, False),
    "dynamic-ep2-z1": ({**BASE, "moe": {**MOE, "dynamic": True, "num_experts": 5, "ep_size": 2}}, 1, 4, 2, 1, False),
}
BUCKET = 100_000


def ds_config(stage: int, micro: int, accumulation: int, bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "bf16": {"enabled": bf16}}


def measure_here(name: str) -> int:
    """This rank's measured peak for configuration `name`."""
    from camex_ds.analysis.measured_memory import measure_train_memory

    cfg, stage, micro, _, accumulation, bf16 = CONFIGS[name]
    return measure_train_memory(cfg, ds_config(stage, micro, accumulation, bf16))["peak"]


def measure(name: str) -> int:
    """The largest rank's measured peak, in `world` fresh rank processes: the merge layers' CPU work buffers outlive
    a run (`functional._scratch`), so a second configuration measured in one process would find them allocated."""
    world = CONFIGS[name][3]
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

    cfg, stage, micro, world, accumulation, bf16 = CONFIGS[name]
    return memory(cfg, micro_batch=micro, zero_stage=stage, world_size=world, accumulation=accumulation, bf16=bf16,
                  reduce_bucket_size=BUCKET, gpu=False)["peak"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(CONFIGS), help="measure these configurations only")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rank_of", help=argparse.SUPPRESS)  # one rank of a multi-rank measurement
    args = p.parse_args(argv)
    if args.rank_of:
        print(measure_here(args.rank_of))
        return 0
    rows = []
    for name in args.only or CONFIGS:
        measured, predicted = measure(name), predict(name)
        rows.append({"config": name, "predicted": predicted, "measured": measured, "ratio": predicted / measured})
        if not args.json:
            print(f"{name:16s} predicted {predicted / 2**20:8.2f} MiB  measured {measured / 2**20:8.2f} MiB  "
                  f"ratio {predicted / measured:.3f}", flush=True)
    if args.json:
        print(json.dumps(rows))  # one line, the last: DeepSpeed logs to stdout too
    return 0


if __name__ == "__main__":
    sys.exit(main())
