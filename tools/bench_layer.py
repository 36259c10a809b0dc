#!/usr/bin/env python
"""Forward+backward time and peak memory of one MoE merge layer, against a dense FFN and a naive einsum.

Every (implementation, method) runs in a fresh subprocess so its peak resident memory is its own; the
table gives medians of timed steps after warm-up, and ratios to the dense FFN of the same width.
The naive baseline is the straightforward implementation of the same math: curvature as one einsum
over the four factors, and the `[segments × experts × out × in]` merge the reference code materialises.

    python tools/bench_layer.py                 # spec shapes: d=256 h=1024 N=8 T=128, batch 8x512, 2 threads
    python tools/bench_layer.py --methods camex --steps 3 --json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["euclid", "ties", "dare", "camex", "camex-ties", "camex-dare"]


def _naive_layer(args, method):
    """Straightforward einsum implementation of §3 (for comparison only)."""
    import torch
    import torch.nn.functional as F

    from camex_ds.config import method_is_curved, method_mask
    from camex_ds.moe import functional as Fn

    torch.manual_seed(0)
    d, h, n, rank = args.d, args.h, args.experts, args.rank
    shapes = {"w_in": (h, d), "w_out": (d, h)}
    params = {}
    for name, (o, i) in shapes.items():
        params["base." + name] = torch.randn(o, i) * 0.02
        params["experts." + name] = torch.randn(n, o, i) * 0.02
        if method_is_curved(method):
            for key, f in zip("ABCD", Fn.identity_factors(rank, n, o, i)):
                params[f"{key}.{name}"] = f + 0.01 * torch.randn_like(f)
    params["w_gate"] = torch.randn(d, n) * 0.02
    for p in params.values():
        p.requires_grad_(True)
    mask = method_mask(method)

    def forward(x):
        gates = Fn.segment_gates(x, params["w_gate"], args.T, n, causal=True).reshape(-1, n)
        xs = x.reshape(-1, args.T, d)
        weights = {}
        for name in shapes:
            tau = params["experts." + name] - params["base." + name]
            curved = tau
            if method_is_curved(method):
                o1, o2 = Fn.kron_factor_shape(tau.shape[1])
                i1, i2 = Fn.kron_factor_shape(tau.shape[2])
                t5 = tau.reshape(n, o1, o2, i1, i2)
                A, B, C, D = (params[f"{k}.{name}"] for k in "ABCD")
                curved = torch.einsum("rnab,rncd,rnef,rngh,nbdfh->naceg", A, B, C, D, t5).reshape_as(tau) / rank
            if mask == "ties":
                curved = curved * (torch.sign(tau) == torch.sign(tau.sum(0))).to(tau.dtype)
            elif mask == "dare":
                curved = curved * Fn.dare_mask(tau.shape, 0.1)
            per_segment = gates[:, :, None, None] * curved[None]  # [S, N, out, in]
            weights[name] = params["base." + name] + per_segment.sum(1)
        hidden = F.gelu(torch.einsum("sti,soi->sto", xs, weights["w_in"]))
        return torch.einsum("sti,soi->sto", hidden, weights["w_out"]).reshape_as(x)

    return forward, list(params.values())


def _build(args, impl, method):
    import torch

    torch.manual_seed(0)
    if impl == "dense":
        net = torch.nn.Sequential(torch.nn.Linear(args.d, args.h, bias=False), torch.nn.GELU(),
                                  torch.nn.Linear(args.h, args.d, bias=False))
        return net, list(net.parameters())
    if impl == "naive":
        return _naive_layer(args, method)
    from camex_ds.moe import CAMExMoE

    layer = CAMExMoE(args.d, args.h, args.experts, method=method, segment_len=args.T,
                     curvature_rank=args.rank, noisy_gating=False)
    with torch.no_grad():  # curvature away from identity: same arithmetic, but an honest test of the path
        for name, p in layer.named_parameters():
            if "curvature" in name:
                p.add_(0.01 * torch.randn_like(p))
    return (lambda x: layer(x)[0]), list(layer.parameters())


def _run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    forward, params = _build(args, args.impl, args.method)
    x = torch.randn(args.batch, args.seq, args.d, requires_grad=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        forward(x).square().mean().backward()
        elapsed = time.perf_counter() - start
        for p in params + [x]:
            p.grad = None
        if step >= args.warmup:
            times.append(elapsed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": args.impl, "method": args.method, "time_s": statistics.median(times),
            "peak_mib": (peak - rss_before) / 1024, "peak_rss_mib": peak / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated merge methods to time")
    ap.add_argument("--d", type=int, default=256, help="model width")
    ap.add_argument("--h", type=int, default=1024, help="FFN width")
    ap.add_argument("--experts", type=int, default=8, help="experts N")
    ap.add_argument("--T", type=int, default=128, help="segment length")
    ap.add_argument("--rank", type=int, default=1, help="curvature rank R")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-naive", action="store_true", help="skip the (slow) naive einsum baseline")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.impl:
        print(json.dumps(_run_one(args)))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")

    def measure(impl, method="euclid"):
        cmd = [sys.executable, __file__, "--impl", impl, "--method", method] + [
            f"--{k}={getattr(args, k)}" for k in ("d", "h", "experts", "T", "rank", "batch", "seq", "threads",
                                                   "warmup", "steps")]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"benchmark of {impl}/{method} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    dense = measure("dense")
    rows = []
    for method in methods:
        ours = measure("camex_ds", method)
        naive = None if args.no_naive else measure("naive", method)
        rows.append({"method": method, "time_ms": 1e3 * ours["time_s"], "peak_mib": ours["peak_mib"],
                     "vs_dense_time": ours["time_s"] / dense["time_s"],
                     "vs_dense_peak": ours["peak_mib"] / max(dense["peak_mib"], 1e-9),
                     "naive_time_ms": None if naive is None else 1e3 * naive["time_s"],
                     "naive_peak_mib": None if naive is None else naive["peak_mib"],
                     "speedup_vs_naive": None if naive is None else naive["time_s"] / ours["time_s"]})
    result = {"shapes": {k: getattr(args, k) for k in ("d", "h", "experts", "T", "rank", "batch", "seq", "threads")},
              "dense_time_ms": 1e3 * dense["time_s"], "dense_peak_mib": dense["peak_mib"], "methods": rows}
    if not args.json:
        print(f"dense FFN: {result['dense_time_ms']:.1f} ms fwd+bwd, peak +{dense['peak_mib']:.0f} MiB")
        print(f"{'method':<11} {'ms':>8} {'x dense':>8} {'MiB':>7} {'x dense':>8} {'naive ms':>9} {'MiB':>7} "
              f"{'speedup':>8}")
        for r in rows:
            naive = (f"{r['naive_time_ms']:>9.1f} {r['naive_peak_mib']:>7.0f} {r['speedup_vs_naive']:>7.1f}x"
                     if r["naive_time_ms"] is not None else f"{'-':>9} {'-':>7} {'-':>8}")
            print(f"{r['method']:<11} {r['time_ms']:>8.1f} {r['vs_dense_time']:>7.2f}x {r['peak_mib']:>7.0f} "
                  f"{r['vs_dense_peak']:>7.2f}x {naive}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
