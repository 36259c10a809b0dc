#!/usr/bin/env python
"""Training throughput of the small default model per method, on 1 and 2 ranks, through the real launcher.

Each (method, ranks, ep) runs `launcher/pretrain.py` (under `deepspeed --num_gpus R` for R > 1) for
--steps steps on the default corpus and reads its metrics.jsonl: tokens/s and step time are medians over
the logged windows after the first (warm-up), and `ep_bytes_sent_per_step` is what rank 0's expert-parallel
collectives sent, next to the analytic `camex_ds.flops.ep_bytes_per_step` (`smoe`'s all-to-all runs inside
DeepSpeed's MoE layer, outside that counter: only its analytic figure is given). Prints a table and a JSON line.

    python tools/bench_train.py                                   # dense, smoe, euclid, camex, camex-dynamic; 1 and 2 ranks
    python tools/bench_train.py --methods camex --ranks 2 --ep 1,2  # issue 3: ep=1 vs ep=2 at 2 ranks
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("dense", "smoe", "euclid", "ties", "camex", "camex-ties", "camex-dynamic")


def model_config(method: str, ep: int) -> dict:
    from camex_ds.train.loop import DEFAULT_MODEL

    cfg = json.loads(json.dumps(DEFAULT_MODEL))
    if method == "dense":
        cfg["moe"] = None
    elif method == "smoe":
        cfg["moe"] = {"method": "smoe", "num_experts": 4, "top_k": 2, "every": 2, "ep_size": ep}
    elif method == "camex-dynamic":
        cfg["moe"].update(method="camex", num_experts=5, dynamic=True, ep_size=ep)
    else:
        cfg["moe"].update(method=method, ep_size=ep)
    return cfg


def run_one(method: str, ranks: int, ep: int, steps: int, log_interval: int, work: Path) -> dict:
    from camex_ds.config import ModelConfig
    from camex_ds.flops import ep_bytes_per_step
    from camex_ds.parallel import free_port

    out = work / f"{method}-r{ranks}-ep{ep}"
    cfg_path = work / f"{method}-ep{ep}.json"
    cfg = model_config(method, ep)
    cfg_path.write_text(json.dumps(cfg))
    args = ["--model_config", str(cfg_path), "--output_dir", str(out), "--max_steps", str(steps),
            "--log_interval", str(log_interval), "--eval_interval", str(10 * steps), "--save_interval",
            str(10 * steps), "--eval_batches", "1", "--no_progress"]
    launcher = str(ROOT / "launcher" / "pretrain.py")
    cmd = ([sys.executable, launcher] if ranks == 1 else
           [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), launcher])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{method} on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    model = ModelConfig.from_dict(dict(cfg, vocab_size=4096))
    micro = 8
    # smoe's all-to-all runs inside DeepSpeed's MoE layer, which the trainer's byte counter does not see
    sent = None if method == "smoe" else statistics.median(r["ep_bytes_sent_per_step"] for r in rows)
    return {"method": method, "ranks": ranks, "ep": ep,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "ep_bytes_sent_per_step": sent,
            "ep_bytes_analytic": ep_bytes_per_step(model, micro * model.seq_len, gloo=True) if ep > 1 else 0,
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
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}: choose from {', '.join(METHODS)}")
    if args.steps < 3 * args.log_interval:
        ap.error(f"--steps={args.steps} must be at least 3 x --log_interval={args.log_interval}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in map(int, args.ranks.split(",")):
            for method in methods:
                eps = [1] if method == "dense" or ranks == 1 else (
                    [ranks] if args.ep == "max" else [int(e) for e in args.ep.split(",")])
                for ep in eps:
                    rows.append(run_one(method, ranks, ep, args.steps, args.log_interval, Path(tmp)))
                    if not args.json:
                        r = rows[-1]
                        sent = "n/a" if r["ep_bytes_sent_per_step"] is None else \
                            f"{r['ep_bytes_sent_per_step'] / 2**20:.2f}"
                        print(f"{method:<14} ranks={ranks} ep={ep}  {r['tokens_per_s']:8.0f} tok/s  "
                              f"step {1e3 * r['step_time_s']:7.1f} ms  EP sent {sent:>7} MiB/step "
                              f"(analytic {r['ep_bytes_analytic'] / 2**20:.2f})", flush=True)
    print(json.dumps({"steps": args.steps, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
