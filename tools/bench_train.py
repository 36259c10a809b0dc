#!/usr/bin/env python
"""Training throughput of the small default model per method, on 1 and 2 ranks, through the real launcher.

Each (method, ranks, ep) runs `launcher/pretrain.py` (under `deepspeed --num_gpus R` for R > 1) for
--steps steps on the default corpus and reads its metrics.jsonl: tokens/s and step time are medians over
the logged windows after the first (warm-up), and `ep_bytes_sent_per_step` is what rank 0's expert-parallel
collectives sent, next to the analytic `camex_ds.analysis.flops.ep_bytes_per_step` (`smoe`'s all-to-all runs inside
DeepSpeed's MoE layer, outside that counter: only its analytic figure is given). Prints a table and a JSON line.

    python tools/bench_train.py                                   # dense, smoe, euclid, camex, camex-dynamic; 1 and 2 ranks
    python tools/bench_train.py --methods camex --ranks 2 --ep 1,2  # issue 3: ep=1 vs ep=2 at 2 ranks
    python tools/bench_train.py --ranks 1 --model ds_configs/models/gpt2_small_camex.json \
        --deepspeed_config ds_configs/gpu_zero2_bf16.json --peak_tflops 989   # one H100, bf16
    python tools/bench_train.py --ranks 1 --methods euclid,camex --model ds_configs/models/bench_layer_shapes.json \
        --micro_batch 2 --grad_accum 1,4 --repeats 3      # the curvature once per optimizer step, side by side

`--repeats R` runs every configuration R times in interleaved rounds (so a slow spell of a shared machine hits all
of them) and reports medians, with each method's median per-round ratio of tokens/s to euclid's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from camex_ds.config import COMPARED_METHODS, DEFAULT_VOCAB_SIZE, SMOE_BACKENDS
from camex_ds.run_args import DEFAULT_DEEPSPEED_CONFIG

ROOT = Path(__file__).resolve().parent.parent

# What `compare` compares, and camex as a dynamic chain (a pseudo-method: camex with moe.dynamic=true).
METHODS = COMPARED_METHODS + ("camex-dynamic",)


def model_config(base: dict, method: str, ep: int, smoe_backend: str) -> dict:
    """`base` (a CAMEx model JSON) turned into `method`: same trunk, same expert count and MoE placement."""
    cfg = json.loads(json.dumps(base))
    moe = cfg["moe"]
    if method == "dense":
        cfg["moe"] = None
    elif method == "smoe":
        cfg["moe"] = {"method": "smoe", "num_experts": moe["num_experts"], "top_k": 2, "every": moe["every"],
                      "ep_size": ep, "backend": smoe_backend}
    elif method == "camex-dynamic":
        moe.update(method="camex", num_experts=moe["num_experts"] + 1, dynamic=True, ep_size=ep)
    else:
        moe.update(method=method, dynamic=False, ep_size=ep)
    return cfg


def run_one(args, method: str, ranks: int, ep: int, accum: int, work: Path) -> dict:
    from camex_ds.config import ModelConfig
    from camex_ds.analysis.flops import ep_bytes_per_step
    from camex_ds.parallel import free_port

    out = work / f"{method}-r{ranks}-ep{ep}-ga{accum}"
    cfg_path = work / f"{method}-ep{ep}.json"
    ds_path = work / f"ds-ga{accum}.json"
    ds_path.write_text(json.dumps(dict(args.ds_config, train_micro_batch_size_per_gpu=args.micro_batch,
                                       gradient_accumulation_steps=accum)))
    cfg = model_config(args.base_model, method, ep, args.smoe_backend)
    cfg_path.write_text(json.dumps(cfg))
    steps = args.steps
    flags = ["--model_config", str(cfg_path), "--output_dir", str(out), "--max_steps", str(steps),
             "--log_interval", str(args.log_interval), "--eval_interval", str(10 * steps), "--save_interval",
             str(10 * steps), "--eval_batches", "1", "--no_progress", "--deepspeed_config", str(ds_path)]
    if args.peak_tflops:
        flags += ["--peak_tflops", str(args.peak_tflops)]
    if args.compile:
        flags.append("--compile")
    launcher = str(ROOT / "launcher" / "pretrain.py")
    cmd = ([sys.executable, launcher] if ranks == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), launcher])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd + flags, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{method} on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # the next round's run of this configuration starts in an empty folder
    rows = [r for r in rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    model = ModelConfig.from_dict(dict(cfg, vocab_size=DEFAULT_VOCAB_SIZE))
    micro = args.micro_batch
    # smoe's all-to-all runs inside DeepSpeed's MoE layer, which the trainer's byte counter does not see
    sent = None if method == "smoe" else statistics.median(r["ep_bytes_sent_per_step"] for r in rows)
    return {"method": method, "backend": args.smoe_backend if method == "smoe" else None, "ranks": ranks, "ep": ep,
            "grad_accum": accum,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "ep_bytes_sent_per_step": sent,
            "ep_bytes_analytic": ep_bytes_per_step(model, micro * model.seq_len, gloo=True, accumulation=accum)
            if ep > 1 else 0,
            "flops_per_token": rows[-1]["flops_per_token"], "mfu": rows[-1].get("mfu")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dense,smoe,euclid,camex,camex-dynamic",
                    help=f"comma list from {', '.join(METHODS)} (default: %(default)s)")
    ap.add_argument("--ranks", default="1,2", help="rank counts (default: %(default)s)")
    ap.add_argument("--ep", default="max", help="expert-parallel degrees at R ranks: comma list, or 'max' "
                                                "(ep = R for MoE methods) (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="steps per run (default: %(default)s)")
    ap.add_argument("--log_interval", type=int, default=5, help="steps per timed window (default: %(default)s)")
    ap.add_argument("--model", help="base model JSON whose trunk, expert count and MoE placement every method "
                                    "shares (default: the launcher's small default model)")
    ap.add_argument("--deepspeed_config", default=DEFAULT_DEEPSPEED_CONFIG,
                    help="DeepSpeed JSON of every run (default: %(default)s; on GPUs: ds_configs/gpu_zero2_bf16.json)")
    ap.add_argument("--smoe_backend", choices=SMOE_BACKENDS, default="auto",
                    help="smoe's implementation (default: %(default)s: MegaBlocks where CUDA and the package are "
                         "present and ep is 1, else DeepSpeed's MoE)")
    ap.add_argument("--peak_tflops", type=float, help="accelerator peak, for the launcher's MFU (e.g. 989 for an "
                                                      "H100 SXM in bf16)")
    ap.add_argument("--micro_batch", type=int, help="sequences per rank and micro-batch (default: the DeepSpeed "
                                                    "config's train_micro_batch_size_per_gpu)")
    ap.add_argument("--grad_accum", default="1", help="gradient_accumulation_steps to run, comma list "
                                                      "(default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="run the launcher with --compile (torch.compile per block)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every configuration "
                                                           "(default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    try:
        from camex_ds.run_args import default_model

        args.base_model = default_model() if args.model is None else json.loads(Path(args.model).read_text())
        args.ds_config = json.loads(Path(args.deepspeed_config).read_text())
        accums = [int(k) for k in args.grad_accum.split(",")]
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"cannot read --model/--deepspeed_config: {e}")
    except ValueError:
        ap.error(f"--grad_accum={args.grad_accum} is invalid: expected a comma list of integers >= 1")
    if min(accums) < 1 or args.repeats < 1:
        ap.error("--grad_accum values and --repeats must be at least 1")
    if not args.base_model.get("moe"):
        ap.error(f"--model={args.model} is dense (moe is null): give a CAMEx model for the methods to share")
    args.micro_batch = args.micro_batch or args.ds_config["train_micro_batch_size_per_gpu"]
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    if args.steps < 3 * args.log_interval:
        ap.error(f"--steps={args.steps} must be at least 3 x --log_interval={args.log_interval}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeats):
            for ranks in map(int, args.ranks.split(",")):
                for accum in accums:
                    for method in methods:
                        eps = [1] if method == "dense" or ranks == 1 else (
                            [ranks] if args.ep == "max" else [int(e) for e in args.ep.split(",")])
                        for ep in eps:
                            runs.append(dict(run_one(args, method, ranks, ep, accum, Path(tmp)), round=rnd))
                            if not args.json:
                                _print_row(runs[-1])
    rows = _summarise(runs)
    if not args.json and args.repeats > 1:
        print("medians over rounds (x euclid: median of per-round tokens/s ratios):")
        for r in rows:
            _print_row(r)
    print(json.dumps({"steps": args.steps, "model": args.model, "deepspeed_config": args.deepspeed_config,
                      "compile": args.compile,
                      "micro_batch": args.micro_batch, "repeats": args.repeats, "rows": rows, "runs": runs}))
    return 0


def _key(r: dict) -> tuple:
    return r["method"], r["ranks"], r["ep"], r["grad_accum"]


def _summarise(runs: list) -> list:
    """One row per configuration: medians over rounds, and the median per-round tokens/s ratio to euclid."""
    rows = []
    for key in dict.fromkeys(_key(r) for r in runs):
        mine = [r for r in runs if _key(r) == key]
        row = dict(mine[0])
        row.pop("round")
        for k in ("tokens_per_s", "step_time_s"):
            row[k] = statistics.median(r[k] for r in mine)
        euclid = {r["round"]: r["tokens_per_s"] for r in runs if _key(r) == ("euclid",) + key[1:]}
        ratios = [euclid[r["round"]] / r["tokens_per_s"] for r in mine if r["round"] in euclid]
        row["time_vs_euclid"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def _print_row(r: dict) -> None:
    sent = "n/a" if r["ep_bytes_sent_per_step"] is None else f"{r['ep_bytes_sent_per_step'] / 2**20:.2f}"
    mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:.1f}%"
    vs = f"  x euclid {r['time_vs_euclid']:.3f}" if r.get("time_vs_euclid") else ""
    print(f"{r['method']:<14} ranks={r['ranks']} ep={r['ep']} ga={r['grad_accum']}  {r['tokens_per_s']:8.0f} tok/s"
          f"{mfu}  step {1e3 * r['step_time_s']:7.1f} ms{vs}  EP sent {sent:>7} MiB/step "
          f"(analytic {r['ep_bytes_analytic'] / 2**20:.2f})", flush=True)

if __name__ == "__main__":
    sys.exit(main())
