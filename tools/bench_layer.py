#!/usr/bin/env python
"""Forward+backward time and peak memory of one MoE merge layer, against a dense FFN and a naive einsum.

Every measurement runs in a fresh subprocess (so its peak resident memory is its own) and reports the
median of its timed steps after warm-up. Runs are interleaved in rounds, `dense, method 1, method 2, ...`
in every round, and each method's time is divided by the dense time *of its own round*, so a slow spell
of a noisy machine hits both sides of a ratio; the table gives medians over the rounds and their spread.
After its own timed steps, each method's process also alternates `--pair-steps` steps of a dense FFN and of
the layer and reports the median step-by-step ratio ("paired"): the least noisy ratio on a shared machine.
The naive baseline is the straightforward implementation of the same math with `einsum`: the curvature as
four mode products over all experts at once, and the `[segments × experts × out × in]` merge that the
reference code materialises; it is slow, so it runs in `--naive-repeats` rounds only.

    python tools/bench_layer.py                 # spec shapes: d=256 h=1024 N=8 T=128, batch 8x512, 2 threads
    python tools/bench_layer.py --methods camex --repeats 5 --no-naive
    python tools/bench_layer.py --threads 1 --clock cpu     # low-noise proxy: CPU time at one thread
    python tools/bench_layer.py --omp-wait-policy inherit   # OpenMP's default (spinning) wait policy
    python tools/bench_layer.py --methods camex --no-naive --floor  # + what no merge strategy removes
    python tools/bench_layer.py --device cuda --dtype bfloat16 --d 768 --h 3072 --T 256 --seq 1024  # a GPU
    python tools/bench_layer.py --methods euclid,camex,camex-ties --no-naive --grad_accum 4  # time per micro-batch
                                                    # when the curvature is computed once per optimizer step

`--count-ops` counts instead of timing, a proxy for kernel launches: the aten ops one forward+backward of the layer
dispatches in eager mode, and under `torch.compile` the graphs and graph breaks, the aten ops in the forward and
backward graphs, and the kernels inductor generates for them (fused kernels plus the GEMMs it calls out to).

With `--grad_accum K` every timed step is one optimizer step of K micro-batches of `--batch` sequences, each told
its place in the step (as DeepSpeed's trainer tells the model), and times are per micro-batch.

On CUDA the clock is wall time around a synchronised step and the memory is the peak allocated by the
caching allocator above what the inputs and parameters already held.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from camex_ds.config import MERGE_METHODS as METHODS

SHAPE_KEYS = ("d", "h", "experts", "T", "rank", "batch", "seq", "threads", "device", "dtype", "grad_accum")


def _naive_curvature(tau, factors, rank):
    """`(1/R) Σ_r (A_r⊗B_r) τ (C_r⊗D_r)ᵀ` for all experts: four einsum mode products on `[R,N,o1,o2,i1,i2]`."""
    import torch

    from camex_ds.moe import functional as Fn

    n, out_f, in_f = tau.shape
    t = tau.reshape(n, *Fn.kron_factor_shape(out_f), *Fn.kron_factor_shape(in_f))
    a, b, c, d = factors
    x = torch.einsum("rnpa,nabce->rnpbce", a, t)
    x = torch.einsum("rnqb,rnpbce->rnpqce", b, x)
    x = torch.einsum("rnsc,rnpqce->rnpqse", c, x)
    x = torch.einsum("rnue,rnpqse->rnpqsu", d, x)
    return x.sum(0).reshape(n, out_f, in_f) / rank


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
        gates = Fn.causal_shift(Fn.topk_softmax(Fn.summarize_segments(x, args.T) @ params["w_gate"], n))
        gates = gates.reshape(-1, n)
        xs = x.reshape(-1, args.T, d)
        weights = {}
        for name in shapes:
            tau = params["experts." + name] - params["base." + name]
            curved = tau
            if method_is_curved(method):
                curved = _naive_curvature(tau, [params[f"{k}.{name}"] for k in "ABCD"], rank)
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
        return (lambda x, plans: net(x)), list(net.parameters())
    if impl == "naive":
        forward, params = _naive_layer(args, method)
        return (lambda x, plans: forward(x)), params
    from camex_ds.moe import CAMExMoE

    layer = CAMExMoE(args.d, args.h, args.experts, method=method, segment_len=args.T,
                     curvature_rank=args.rank, noisy_gating=False)
    with torch.no_grad():  # curvature away from identity: same arithmetic, but an honest test of the path
        for name, p in layer.named_parameters():
            if "curvature" in name:
                p.add_(0.01 * torch.randn_like(p))
    def forward(x, plans):
        """One micro-batch; `plans`: `(the step's plan, whether this is its last micro-batch)`, or None for a plan
        per call."""
        if plans is None:
            return layer(x)[0]
        plan, last = plans
        return layer(x, None, plan.for_micro_batch(last))[0]

    forward.plan = lambda x, accum: layer.plan(x.shape[0] * (x.shape[1] // args.T), accum)
    return forward, list(layer.parameters())


def _floor_parts(args) -> dict:
    """The parts of a camex step that no merge strategy removes, each timed alone without autograd overhead:
    the FFN's six GEMMs and GELU on per-segment weights that are already merged (outputs and a chunk of
    weight gradients preallocated, as the layer's backward keeps them), the same on one dense weight, and the
    curvature forward + backward of both matrices. Their sum over the dense time is the ratio camex would
    reach if the merge, the task/base reduction and the gate gradients cost nothing."""
    import torch
    import torch.nn.functional as F

    from camex_ds.moe import functional as Fn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, h, n, seg = args.d, args.h, args.experts, args.T
    segments = args.batch * args.seq // seg

    def ffn(x, gy, w1, w2, g1, g2, step, pre, y, gh, gx):
        """Forward and backward of GELU(x w1ᵀ) w2ᵀ into preallocated outputs, weight gradients `step` at a time."""
        torch.matmul(x, w1.transpose(-1, -2), out=pre)
        act = F.gelu(pre)
        torch.matmul(act, w2.transpose(-1, -2), out=y)
        torch.matmul(gy, w2, out=gh)
        for s in range(0, x.shape[0], step):
            torch.matmul(gy[s:s + step].transpose(-1, -2), act[s:s + step], out=g2)
        g = torch.ops.aten.gelu_backward(gh, pre)
        torch.matmul(g, w1, out=gx)
        for s in range(0, x.shape[0], step):
            torch.matmul(g[s:s + step].transpose(-1, -2), x[s:s + step], out=g1)

    x, gy = torch.randn(segments, seg, d), torch.randn(segments, seg, d)
    chunk = Fn.segment_chunk(segments, d * h, x)  # the merged layer's weight-gradient chunk
    outputs = [torch.empty(segments, seg, k) for k in (h, d, h, d)]
    per_segment = (x, gy, torch.randn(segments, h, d) * 0.02, torch.randn(segments, d, h) * 0.02,
                   torch.empty(chunk, h, d), torch.empty(chunk, d, h), chunk, *outputs)
    one_weight = (x.view(1, -1, d), gy.view(1, -1, d), torch.randn(1, h, d) * 0.02, torch.randn(1, d, h) * 0.02,
                  torch.empty(1, h, d), torch.empty(1, d, h), 1, *(t.view(1, -1, t.shape[-1]) for t in outputs))

    taus = [torch.randn(n, h, d, requires_grad=True), torch.randn(n, d, h, requires_grad=True)]
    factors = [[f + 0.01 * torch.randn_like(f) for f in Fn.identity_factors(args.rank, n, *t.shape[1:])] for t in taus]
    for fs in factors:
        for f in fs:
            f.requires_grad_(True)

    def curvature():
        for t, fs in zip(taus, factors):
            Fn.apply_curvature(t, fs).backward(torch.ones_like(t))
        for p in taus + [f for fs in factors for f in fs]:
            p.grad = None

    parts = {"dense_s": lambda: ffn(*one_weight), "segment_gemms_s": lambda: ffn(*per_segment),
             "curvature_s": curvature}
    times = {k: [] for k in parts}
    for step in range(args.warmup + args.steps):
        for k, fn in parts.items():
            start = time.perf_counter()
            fn()
            if step >= args.warmup:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.set_default_dtype(getattr(torch, args.dtype))
    cuda = args.device == "cuda"
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn, prm):
        """Seconds per micro-batch of one optimizer step of `--grad_accum` micro-batches."""
        accum = args.grad_accum
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        plan = fn.plan(x, accum) if accum > 1 and hasattr(fn, "plan") else None  # the step's, at its start
        for j in range(accum):
            fn(x, None if plan is None else (plan, j == accum - 1)).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        elapsed = clock() - start
        for p in prm + [x]:
            p.grad = None
        return elapsed / accum

    forward, params = _build(args, args.impl, args.method)
    x = torch.randn(args.batch, args.seq, args.d, requires_grad=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [timed(forward, params) for _ in range(args.warmup + args.steps)][args.warmup:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"impl": args.impl, "method": args.method, "time_s": statistics.median(times), "times_s": times,
              "peak_mib": (peak - rss_before) / 1024, "peak_rss_mib": peak / 1024}
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - held) / 2**20
    if args.pair_steps and args.impl != "dense":
        # Paired ratio: alternate steps of the dense FFN and this layer in one process, so both see the
        # same machine state; the memory figures above were taken before the dense FFN existed.
        dense, dense_params = _build(args, "dense", args.method)
        ratios = [timed(forward, params) / timed(dense, dense_params) for _ in range(1 + args.pair_steps)][1:]
        result["paired_ratio"] = statistics.median(ratios)
    return result


def _count_ops(args, method) -> dict:
    """Aten ops per forward+backward, eager and compiled (see the module docstring)."""
    import torch
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor import metrics
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            self.ops += 1
            return func(*args_, **(kwargs or {}))

    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.set_default_dtype(getattr(torch, args.dtype))
    forward, params = _build(args, "camex_ds", method)
    x = torch.randn(args.batch, args.seq, args.d, requires_grad=True)
    torch.set_default_device(None)  # the default-device mode would itself break dynamo's graphs

    def step(fn):
        fn(x, None).square().mean().backward()

    step(forward)  # warm-up: scratch buffers and lazy state
    with Count() as eager:
        step(forward)
    graph_ops, gemms = [], []
    gemm_ops = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                torch.ops.aten.baddbmm.default}

    def counting(gm, example_inputs):
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        graph_ops.append(len(calls))
        gemms.append(sum(n.target in gemm_ops for n in calls))  # inductor calls these out, outside its kernels
        return gm.forward

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda inp: forward(inp, None))(x)
    torch._dynamo.reset()
    step(torch.compile(forward, backend=aot_autograd(fw_compiler=counting, bw_compiler=counting)))
    torch._dynamo.reset()
    metrics.reset()
    step(torch.compile(forward))
    return {"method": method, "eager_ops": eager.ops, "graphs": explanation.graph_count,
            "graph_breaks": explanation.graph_break_count, "compiled_graph_ops": sum(graph_ops),
            "compiled_kernels": metrics.generated_kernel_count + sum(gemms)}


def _spread(values) -> list:
    return [min(values), max(values)]


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
    ap.add_argument("--threads", type=int, default=2, help="intra-op CPU threads")
    ap.add_argument("--grad_accum", type=int, default=1,
                    help="micro-batches per optimizer step; times are per micro-batch (default: %(default)s)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="parameters and activations (bfloat16: as DeepSpeed's bf16 mode trains)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (the real number); cpu: process CPU time (a low-noise proxy at 1 thread)")
    ap.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"), default="passive",
                    help="OMP_WAIT_POLICY of the timed processes (default passive: on a shared machine, spinning "
                         "OpenMP threads turn every parallel region into a wait for a descheduled thread, which "
                         "times the OS scheduler rather than the layer); 'inherit' keeps the caller's environment")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per subprocess (their median is taken)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of dense + every method")
    ap.add_argument("--pair-steps", type=int, default=5,
                    help="steps alternating with a dense FFN in the method's process, for a paired ratio (0: off)")
    ap.add_argument("--naive-repeats", type=int, default=1, help="rounds that also time the naive einsum")
    ap.add_argument("--naive-steps", type=int, default=3, help="timed steps of the naive einsum")
    ap.add_argument("--no-naive", action="store_true", help="skip the (slow) naive einsum baseline")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--count-ops", action="store_true",
                    help="count aten ops per forward+backward (eager and compiled) instead of timing")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--floor", action="store_true",
                    help="also time the parts no merge strategy removes (per-segment FFN GEMMs, curvature) and "
                         "print the ratio camex would reach if merging, reductions and gate gradients were free")
    args = ap.parse_args(argv)
    if args.impl:
        print(json.dumps(_floor_parts(args) if args.impl == "floor" else _run_one(args)))
        return 0
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    if args.repeats < 1 or args.steps < 1 or args.grad_accum < 1:
        ap.error("--repeats, --steps and --grad_accum must be at least 1")
    if args.floor and args.device != "cpu":
        ap.error("--floor times CPU kernels: use it with --device cpu")
    if args.count_ops:
        counts = [_count_ops(args, method) for method in methods]
        if not args.json:
            print(f"{'method':<11} {'eager ops':>9} {'graphs':>6} {'breaks':>6} {'graph ops':>9} {'kernels':>7}")
            for c in counts:
                print(f"{c['method']:<11} {c['eager_ops']:>9} {c['graphs']:>6} {c['graph_breaks']:>6} "
                      f"{c['compiled_graph_ops']:>9} {c['compiled_kernels']:>7}")
        print(json.dumps({"shapes": {k: getattr(args, k) for k in SHAPE_KEYS}, "count_ops": counts}))
        return 0

    def measure(impl, method="euclid"):
        steps, warmup = (args.naive_steps, 1) if impl == "naive" else (args.steps, args.warmup)
        pair = args.pair_steps if impl == "camex_ds" else 0
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--method", method, f"--pair-steps={pair}",
               f"--steps={steps}", f"--warmup={warmup}", f"--clock={args.clock}"] + [
            f"--{k}={getattr(args, k)}" for k in SHAPE_KEYS]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        if args.omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"benchmark of {impl}/{method} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    dense_runs, ours, naive, floors = [], {m: [] for m in methods}, {m: [] for m in methods}, []
    for rnd in range(args.repeats):
        dense_runs.append(measure("dense"))
        if args.floor:
            floors.append(measure("floor"))
        for method in methods:
            ours[method].append(measure("camex_ds", method))
            if not args.no_naive and rnd < args.naive_repeats:
                naive[method].append(measure("naive", method))
        if not args.json:
            print(f"round {rnd + 1}/{args.repeats}: dense {1e3 * dense_runs[-1]['time_s']:.1f} ms, " + ", ".join(
                f"{m} {1e3 * ours[m][-1]['time_s']:.1f}" for m in methods), file=sys.stderr, flush=True)

    dense_t = [r["time_s"] for r in dense_runs]
    dense_peak = statistics.median(r["peak_mib"] for r in dense_runs)
    rows = []
    for method in methods:
        t = [r["time_s"] for r in ours[method]]
        ratios = [a / b for a, b in zip(t, dense_t)]
        peak = statistics.median(r["peak_mib"] for r in ours[method])
        paired = [r["paired_ratio"] for r in ours[method] if "paired_ratio" in r]
        row = {"method": method, "time_ms": 1e3 * statistics.median(t), "time_ms_spread": [1e3 * v for v in _spread(t)],
               "vs_dense_time": statistics.median(ratios), "vs_dense_time_spread": _spread(ratios),
               "vs_dense_time_rounds": ratios,
               "vs_dense_paired": statistics.median(paired) if paired else None,
               "vs_dense_paired_spread": _spread(paired) if paired else None, "vs_dense_paired_rounds": paired,
               "peak_mib": peak, "vs_dense_peak": peak / max(dense_peak, 1e-9),
               "naive_time_ms": None, "naive_peak_mib": None, "speedup_vs_naive": None,
               "vs_euclid_time": statistics.median(a / b for a, b in zip(t, (r["time_s"] for r in ours["euclid"])))
               if "euclid" in ours else None}
        if naive[method]:
            nt = statistics.median(r["time_s"] for r in naive[method])
            row.update(naive_time_ms=1e3 * nt, naive_peak_mib=statistics.median(r["peak_mib"] for r in naive[method]),
                       speedup_vs_naive=nt / statistics.median(t))
        rows.append(row)

    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit" else args.omp_wait_policy
    result = {"shapes": {k: getattr(args, k) for k in SHAPE_KEYS}, "clock": args.clock, "omp_wait_policy": policy,
              "repeats": args.repeats,
              "steps": args.steps, "torch": torch.__version__, "machine": (torch.cuda.get_device_name() if args.device == "cuda"
                                                                else f"{platform.machine()}, {os.cpu_count()} cpus"),
              "dense_time_ms": 1e3 * statistics.median(dense_t), "dense_time_ms_spread": [1e3 * v for v in _spread(dense_t)],
              "dense_peak_mib": dense_peak, "methods": rows, "floor": None}
    if floors:
        ratios = [(f["segment_gemms_s"] + f["curvature_s"]) / f["dense_s"] for f in floors]
        result["floor"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
        result["floor"].update(free_merge_vs_dense=statistics.median(ratios), free_merge_vs_dense_spread=_spread(ratios))
    if not args.json:
        lo, hi = result["dense_time_ms_spread"]
        print(f"dense FFN on {result['machine']} ({args.dtype}): {result['dense_time_ms']:.1f} ms fwd+bwd "
              f"({args.clock} clock, {args.threads} threads, "
              f"OMP_WAIT_POLICY {policy}; rounds {lo:.1f}-{hi:.1f}), peak +{dense_peak:.0f} MiB")
        print("x dense: ratio to the dense FFN of the same round; paired: median of step-by-step ratios against a "
              "dense FFN in the same process (spreads: min-max over rounds)")
        print(f"{'method':<11} {'ms':>7} {'x dense':>7} {'(spread)':>11} {'paired':>7} {'(spread)':>11} {'MiB':>6} "
              f"{'x dense':>7} {'naive ms':>9} {'MiB':>6} {'speedup':>8}")
        for r in rows:
            lo, hi = r["vs_dense_time_spread"]
            pr = (f"{r['vs_dense_paired']:>6.2f}x {'({:.2f}-{:.2f})'.format(*r['vs_dense_paired_spread']):>11}"
                  if r["vs_dense_paired"] is not None else f"{'-':>7} {'':>11}")
            nv = (f"{r['naive_time_ms']:>9.1f} {r['naive_peak_mib']:>6.0f} {r['speedup_vs_naive']:>7.1f}x"
                  if r["naive_time_ms"] is not None else f"{'-':>9} {'-':>6} {'-':>8}")
            print(f"{r['method']:<11} {r['time_ms']:>7.1f} {r['vs_dense_time']:>6.2f}x {f'({lo:.2f}-{hi:.2f})':>11} "
                  f"{pr} {r['peak_mib']:>6.0f} {r['vs_dense_peak']:>6.2f}x {nv}")
    if "euclid" in ours and not args.json:
        print(f"x euclid (median of per-round ratios, time per micro-batch at grad_accum {args.grad_accum}): " +
              ", ".join(f"{r['method']} {r['vs_euclid_time']:.3f}" for r in rows))
    if result["floor"] and not args.json:
        f = result["floor"]
        print(f"floor (no autograd, preallocated outputs): dense GEMMs+GELU {1e3 * f['dense_s']:.1f} ms, per-segment "
              f"GEMMs+GELU {1e3 * f['segment_gemms_s']:.1f} ms ({f['segment_gemms_s'] / f['dense_s']:.2f}x), curvature "
              f"fwd+bwd {1e3 * f['curvature_s']:.1f} ms ({f['curvature_s'] / f['dense_s']:.2f}x): camex with a free "
              f"merge, reduction and gate gradients would be {f['free_merge_vs_dense']:.2f}x dense "
              "({:.2f}-{:.2f} over rounds; medians of each part)".format(*f["free_merge_vs_dense_spread"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
