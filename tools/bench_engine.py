#!/usr/bin/env python
"""Host-side cost of DeepSpeed's engine per method: forward, backward and step times of a tiny model.

The model is so small that its arithmetic is negligible, so what is timed is the per-parameter and per-op
bookkeeping (autograd nodes, the engine's gradient hooks, buckets, clipping, the optimizer loop). On a GPU
this cost does not overlap with the kernels; here it shows which method pays how much of it. One process,
one rank; prints a line per method and a JSON line.

    python tools/bench_engine.py                          # ZeRO-0, fp32, euclid and camex
    python tools/bench_engine.py --zero 2 --dtype bf16 --methods euclid,camex,camex-ties
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from camex_ds.config import MERGE_METHODS

TINY = {"vocab_size": 256, "d_model": 32, "n_layers": 12, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 64,
        "moe": {"method": "camex", "num_experts": 8, "every": 2, "segment_len": 16, "ep_size": 1}}


def time_method(method: str, zero: int, bf16: bool, steps: int, warmup: int) -> dict:
    import deepspeed
    import torch

    from camex_ds.config import ModelConfig
    from camex_ds.model import GPT
    from camex_ds.model import param_groups

    cfg = json.loads(json.dumps(TINY))
    cfg["moe"]["method"] = method
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_dict(cfg))
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    ids = torch.randint(0, TINY["vocab_size"], (2, TINY["seq_len"]), device=engine.device)
    times = {"forward_ms": [], "backward_ms": [], "step_ms": []}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = engine(ids, labels=ids)
        t1 = time.perf_counter()
        engine.backward(out.loss + out.aux_loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(1e3 * dt)
    row = {"method": method, "parameters": sum(1 for _ in model.parameters())}
    row.update({k: statistics.median(v) for k, v in times.items()})
    row["total_ms"] = row["forward_ms"] + row["backward_ms"] + row["step_ms"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="euclid,camex", help="comma list of merge methods (default: %(default)s)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, help="ZeRO stage (default: %(default)s)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in MERGE_METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}: choose from {', '.join(MERGE_METHODS)}")
    import torch

    from camex_ds import parallel

    torch.set_num_threads(2)
    parallel.init_distributed()
    rows = []
    try:
        for method in methods:
            rows.append(time_method(method, args.zero, args.dtype == "bf16", args.steps, args.warmup))
            r = rows[-1]
            print(f"ZeRO-{args.zero} {args.dtype} {method:<11} {r['parameters']:4d} params: forward "
                  f"{r['forward_ms']:6.1f} ms, backward {r['backward_ms']:6.1f} ms, step {r['step_ms']:6.1f} ms, "
                  f"total {r['total_ms']:6.1f} ms", flush=True)
    finally:
        parallel.shutdown()
    print(json.dumps({"zero": args.zero, "dtype": args.dtype, "model": TINY, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
