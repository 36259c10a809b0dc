"""Fast tests of camex_ds.analysis (stats, results, report, grid, supervise) and the `camex-compare` CLI
(camex_ds.cli.compare, run as tools/compare_methods.py), with a fake training script instead of the launcher."""

import json
import math
import os
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from camex_ds.analysis import grid as cgrid
from camex_ds.analysis import report, results, stats
from camex_ds.cli import compare as cm

REPO = Path(__file__).resolve().parents[3]


# =========================================================================== stats


def test_summarize_mean_and_sample_std():
    s = stats.summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert s["min"] == 1.0 and s["max"] == 3.0 and s["n_dropped"] == 0


def test_summarize_degenerate_and_non_finite():
    one = stats.summarize([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["std"])
    none = stats.summarize([])
    assert none["n"] == 0 and math.isnan(none["mean"]) and math.isnan(none["std"])
    mixed = stats.summarize([1.0, None, float("nan"), 3.0, float("inf")])
    assert mixed["n"] == 2 and mixed["n_dropped"] == 3 and mixed["mean"] == 2.0
    assert mixed["std"] == pytest.approx(math.sqrt(2.0))


def _t_pvalue_df2(t):
    # Student t with 2 degrees of freedom: CDF(t) = 1/2 + t / (2 sqrt(2 + t^2)),
    # so the two-sided p-value is 1 - |t| / sqrt(2 + t^2).
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def test_paired_ttest_known_answer_differences_1_2_3():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]  # differences 1, 2, 3
    res = stats.paired_ttest(a, b)
    t_expected = 2.0 / (1.0 / math.sqrt(3.0))  # mean / (sd / sqrt(n)) = 2 sqrt(3)
    assert res["t"] == pytest.approx(t_expected)
    assert res["df"] == 2
    assert res["p_value"] == pytest.approx(_t_pvalue_df2(t_expected), rel=1e-10)
    assert res["p_value"] == pytest.approx(0.0741799, abs=1e-6)
    assert res["reason"] is None


def test_paired_ttest_matches_incomplete_beta_formula():
    from scipy.special import betainc

    rng = np.random.default_rng(3)
    a = rng.normal(size=7)
    b = a + rng.normal(0.3, 0.5, size=7)
    d = a - b
    n = d.size
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    df = n - 1
    p_expected = betainc(df / 2.0, 0.5, df / (df + t * t))  # two-sided p of Student t
    res = stats.paired_ttest(a, b)
    assert res["t"] == pytest.approx(t)
    assert res["p_value"] == pytest.approx(p_expected, rel=1e-9)


def test_paired_ttest_degenerate_cases():
    few = stats.paired_ttest([1.0], [2.0])
    assert math.isnan(few["p_value"]) and few["reason"] == stats.REASON_TOO_FEW
    empty = stats.paired_ttest([], [])
    assert math.isnan(empty["p_value"]) and empty["reason"] == stats.REASON_TOO_FEW
    same = stats.paired_ttest([1.2, 1.3, 1.4], [1.2, 1.3, 1.4])
    assert same["p_value"] == 1.0 and same["t"] == 0.0 and same["reason"] == stats.REASON_ALL_ZERO
    # constant non-zero differences (with float noise from the subtraction)
    const = stats.paired_ttest([1.3, 1.4, 1.5], [1.2, 1.3, 1.4])
    assert math.isnan(const["p_value"]) and const["reason"] == stats.REASON_CONSTANT
    assert const["t"] == math.inf
    with pytest.raises(ValueError):
        stats.paired_ttest([1.0, 2.0], [1.0])


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    d = [1.0, 2.0, 3.0]
    lo, hi = stats.bootstrap_ci(d, n_resamples=5000, seed=0)
    assert lo <= 2.0 <= hi
    assert 1.0 <= lo and hi <= 3.0  # resample means cannot leave the data range
    assert (lo, hi) == stats.bootstrap_ci(d, n_resamples=5000, seed=0)
    # chunked evaluation gives the same numbers as one big draw
    assert (lo, hi) == stats.bootstrap_ci(d, n_resamples=5000, seed=0, max_chunk_elements=7)


def test_bootstrap_ci_shrinks_with_n_and_matches_normal_approximation():
    rng = np.random.default_rng(0)
    pop = rng.normal(0.5, 1.0, size=2000)
    small, large = pop[:5], pop[:500]
    w_small = np.subtract(*stats.bootstrap_ci(small, n_resamples=4000)[::-1])
    lo, hi = stats.bootstrap_ci(large, n_resamples=4000)
    assert (hi - lo) < w_small
    assert lo <= large.mean() <= hi
    se = large.std(ddof=1) / math.sqrt(large.size)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_ci_degenerate():
    assert all(math.isnan(x) for x in stats.bootstrap_ci([]))
    assert stats.bootstrap_ci([0.7]) == (0.7, 0.7)
    assert stats.bootstrap_ci([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    with pytest.raises(ValueError):
        stats.bootstrap_ci([1.0, 2.0], confidence=1.5)


def test_paired_comparison_pairs_on_common_seeds():
    a = {0: 2.0, 1: 4.0, 2: 6.0, 3: 9.0, 4: float("nan")}
    b = {0: 1.0, 1: 2.0, 2: 3.0, 4: 1.0, 5: 1.0}
    c = stats.paired_comparison(a, b, n_resamples=2000)
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
    assert c["mean_diff"] == pytest.approx(2.0) and c["std_diff"] == pytest.approx(1.0)
    assert c["p_value"] == pytest.approx(_t_pvalue_df2(2 * math.sqrt(3)))
    assert c["ci_low"] <= 2.0 <= c["ci_high"]
    assert sorted(c["dropped_seeds"]) == ["3", "4", "5"]
    seq = stats.paired_comparison([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], n_resamples=2000)
    assert seq["mean_diff"] == pytest.approx(2.0) and seq["p_value"] == pytest.approx(c["p_value"])


def test_method_pairs():
    got = stats.method_pairs(["dense", "smoe", "euclid", "ties", "camex", "camex-ties"])
    assert got == [
        ("camex", "euclid", "twin"),
        ("camex-ties", "ties", "twin"),
        ("smoe", "euclid", "vs-euclid"),
        ("ties", "euclid", "vs-euclid"),
        ("camex-ties", "euclid", "vs-euclid"),
        ("smoe", "dense", "vs-dense"),
        ("euclid", "dense", "vs-dense"),
        ("ties", "dense", "vs-dense"),
        ("camex", "dense", "vs-dense"),
        ("camex-ties", "dense", "vs-dense"),
    ]
    assert stats.method_pairs(["camex-dare", "dare", "dense"]) == [
        ("camex-dare", "dare", "twin"), ("camex-dare", "dense", "vs-dense"), ("dare", "dense", "vs-dense")]
    assert stats.method_pairs(["camex", "smoe"]) == []


# =========================================================================== report


def _write_fake_run(folder: Path, final_bpb: float, seed: int, steps=(0, 5, 10), flops_per_step=1e9, finished=True):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(steps):
        bpb = final_bpb + 1.0 / (i + 1) - 1.0 / len(steps)
        if s:
            rows.append({"step": s, "loss": bpb * math.log(2), "lr": 1e-3, "tokens_per_s": 1000.0,
                         "tokens": 64 * s, "train_flops": flops_per_step * s})
        rows.append({"step": s, "val_loss": bpb * math.log(2), "val_ppl": math.exp(bpb * math.log(2)),
                     "val_bpb": bpb, "tokens": 64 * s, "train_flops": flops_per_step * s})
    with open(folder / "metrics.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.write('{"step": 99, "loss": ')  # a line cut short by a crash must be ignored
    if finished:
        (folder / "final_metrics.json").write_text(json.dumps({
            "step": steps[-1], "train_loss": final_bpb * math.log(2), "val_loss": final_bpb * math.log(2),
            "val_ppl": math.exp(final_bpb * math.log(2)), "val_bpb": final_bpb, "tokens_per_s": 1000.0 + seed,
            "flops_per_token": flops_per_step / 64,
        }))


def test_read_metrics_splits_rows_and_dedups_resumed_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "val_loss": 4.5, "val_bpb": 6.0},
        {"step": 2, "loss": 3.9},  # re-logged after resume: last one wins
        {"step": 3, "loss": 3.0},
    ]) + "\nnot json\n")
    m = results.read_metrics(tmp_path)
    assert [r["step"] for r in m["train"]] == [1, 2, 3]
    assert m["train"][1]["loss"] == 3.9
    assert [r["val_loss"] for r in m["eval"]] == [4.5]
    assert results.read_metrics(tmp_path / "nope") == {"train": [], "eval": []}


def test_write_report_produces_all_files(tmp_path):
    bpb = {"euclid": [1.50, 1.52, 1.51], "camex": [1.40, 1.43, 1.41], "dense": [1.60, 1.61, 1.62]}
    for m, vals in bpb.items():
        for s, v in enumerate(vals):
            _write_fake_run(results.run_dir(tmp_path, m, s), v, s,
                            flops_per_step=2e9 if m != "dense" else 1e9)
    # a fourth seed of camex that never finished: listed as missing, not used
    _write_fake_run(results.run_dir(tmp_path, "camex", 3), 0.1, 3, finished=False)
    paths = report.write_report(tmp_path, ["dense", "euclid", "camex"], [0, 1, 2, 3],
                                meta={"budget": "steps"}, max_steps={"dense": 10, "euclid": 10, "camex": 10},
                                n_resamples=2000)
    for key, name in (("json", "results.json"), ("md", "results.md"), ("png", "curves.png")):
        assert paths[key] == tmp_path / name and paths[key].stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((tmp_path / "results.json").read_text())  # strict JSON (no NaN)
    cam = res["methods"]["camex"]
    assert cam["finished_seeds"] == [0, 1, 2] and cam["missing_seeds"] == [3]
    assert cam["summary"]["val_bpb"]["mean"] == pytest.approx(np.mean(bpb["camex"]))
    assert cam["summary"]["val_bpb"]["std"] == pytest.approx(np.std(bpb["camex"], ddof=1))
    assert cam["seeds"]["1"]["val_bpb"] == pytest.approx(1.43)
    assert cam["summary"]["flops_per_token"]["mean"] == pytest.approx(2e9 / 64)
    assert set(cam["seeds"]["0"]) >= {"val_loss", "val_ppl", "val_bpb", "tokens_per_s", "flops_per_token"}
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    assert set(pairs) == {("camex", "euclid"), ("euclid", "dense"), ("camex", "dense")}
    twin = pairs[("camex", "euclid")]
    # equal FLOPs: camex spends twice dense's per token, so dense's last evaluation (step 10) meets camex's step 5
    vs_dense = pairs[("camex", "dense")]
    assert vs_dense["flops_ratio"] == pytest.approx(2.0) and twin["flops_ratio"] == pytest.approx(1.0)
    at = np.array(bpb["camex"]) + 0.5 - 1 / 3 - np.array(bpb["dense"])
    assert vs_dense["val_bpb_equal_flops"]["mean_diff"] == pytest.approx(at.mean())
    assert twin["val_bpb_equal_flops"] is None and twin["val_bpb_equal_steps"] is None
    diffs = np.array(bpb["camex"]) - np.array(bpb["euclid"])
    assert twin["relation"] == "twin" and twin["n"] == 3
    assert twin["val_bpb"]["mean_diff"] == pytest.approx(diffs.mean())
    assert twin["val_bpb"]["ci_low"] <= diffs.mean() <= twin["val_bpb"]["ci_high"]
    assert 0.0 < twin["val_bpb"]["p_value"] < 0.05
    assert twin["val_loss"]["mean_diff"] == pytest.approx(diffs.mean() * math.log(2))
    # curves: mean over seeds at each evaluation step, flops from the logged rows
    curve = res["curves"]["camex"]
    assert curve["step"] == [0, 5, 10] and curve["flops"] == [0.0, 1e10, 2e10]
    assert curve["mean"][-1] == pytest.approx(np.mean(bpb["camex"]))
    assert curve["min"][-1] == pytest.approx(1.40) and curve["max"][-1] == pytest.approx(1.43)

    md = (tmp_path / "results.md").read_text()
    assert "## Final validation metrics" in md and "## Paired comparisons" in md and "## Per-seed results" in md
    assert "| `camex` | `euclid` | twin | 3 |" in md
    assert "not finished" in md
    assert "## Equal compute" in md and "| `camex` | `dense` | 2.0000 |" in md
    assert "## Diagnostics" in md and "| `camex` | n/a | n/a | n/a |" in md


def test_report_handles_single_seed_and_no_runs(tmp_path):
    _write_fake_run(results.run_dir(tmp_path, "camex", 0), 1.4, 0)
    _write_fake_run(results.run_dir(tmp_path, "euclid", 0), 1.5, 0)
    report.write_report(tmp_path, ["euclid", "camex"], [0], n_resamples=100)
    res = json.loads((tmp_path / "results.json").read_text())
    pair = res["pairs"][0]["val_bpb"]
    assert pair["n"] == 1 and pair["p_value"] is None and pair["p_value_reason"] == stats.REASON_TOO_FEW
    assert res["methods"]["camex"]["summary"]["val_bpb"]["std"] is None
    assert "[1] " + stats.REASON_TOO_FEW in (tmp_path / "results.md").read_text()
    empty = tmp_path / "empty"
    report.write_report(empty, ["camex"], [0, 1], n_resamples=100)
    assert (empty / "curves.png").stat().st_size > 0


# =========================================================================== grid runner

FAKE_LAUNCHER = textwrap.dedent('''
    import argparse, json, math, os, sys
    p = argparse.ArgumentParser()
    for a in ("--model_config", "--data", "--output_dir", "--max_steps", "--seed", "--eval_interval",
              "--data_seed", "--deepspeed_config", "--init_from", "--val_data", "--eval_batches"):
        p.add_argument(a)
    p.add_argument("--resume", action="store_true")
    a, extra = p.parse_known_args()
    cfg = json.load(open(a.model_config or os.path.join(a.init_from, "config.json")))
    method = cfg["moe"]["method"] if cfg["moe"] else "dense"
    curved = method.startswith("camex")
    seed, steps, ev = int(a.seed), int(a.max_steps), int(a.eval_interval)
    with open(os.environ["FAKE_CALLS"], "a") as fh:
        fh.write(json.dumps({"method": method, "seed": seed, "resume": a.resume, "max_steps": steps,
                             "data_seed": a.data_seed, "cwd": os.getcwd(), "extra": extra,
                             "argv": sys.argv[1:]}) + "\\n")
    os.makedirs(a.output_dir, exist_ok=True)
    offset = {"dense": 0.3, "euclid": 0.1, "camex": 0.0}.get(method, 0.2)
    print("fake launcher starting", method, seed, flush=True)
    with open(os.path.join(a.output_dir, "metrics.jsonl"), "a") as m:
        for step in range(1, steps + 1):
            loss = 2.0 + offset + 1.0 / step + 0.01 * seed
            layers = {"curvature/layer1/dev_from_identity": 0.01 * step} if curved else {}
            if cfg["moe"]:
                layers.update({"router/layer1/entropy": 1.0, "router/layer3/entropy": 0.5})
            m.write(json.dumps({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 500.0,
                                "tokens": 100 * step, "train_flops": 1e6 * step, **layers}) + "\\n")
            print(f"step {step} loss {loss:.3f}", flush=True)
            if step % ev == 0 or step == steps:
                m.write(json.dumps({"step": step, "val_loss": loss, "val_ppl": math.exp(loss),
                                    "val_bpb": loss / math.log(2), "tokens": 100 * step,
                                    "train_flops": 1e6 * step}) + "\\n")
            m.flush()
            if os.environ.get("FAKE_FAIL") == f"{method}:{seed}" and step == 2:
                print("RuntimeError: simulated failure", flush=True)
                sys.exit(3)
    json.dump({"step": steps, "train_loss": loss, "val_loss": loss, "val_ppl": math.exp(loss),
               "val_bpb": loss / math.log(2), "tokens_per_s": 500.0, "flops_per_token": 1e4,
               **({"curvature_dev_from_identity": 0.5} if curved else {})},
              open(os.path.join(a.output_dir, "final_metrics.json"), "w"))
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_pretrain.py"
    script.write_text(FAKE_LAUNCHER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    data = tmp_path / "data.txt"
    data.write_text("hello world\n" * 10)
    out = tmp_path / "out"

    def run(*extra_args, methods="euclid,camex", seeds=2, max_steps=4):
        argv = ["--data", str(data), "--methods", methods, "--seeds", str(seeds), "--max_steps", str(max_steps),
                "--output", str(out), "--eval_interval", "2", "--launcher_script", str(script),
                "--no_progress", "--bootstrap_resamples", "200", *extra_args]
        return cm.main(argv, poll_interval=0.02)

    def read_calls():
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return types.SimpleNamespace(run=run, calls=read_calls, out=out, data=data, script=script)


def test_grid_runs_all_then_skips_finished(fake):
    assert fake.run() == 0
    calls = fake.calls()
    assert sorted((c["method"], c["seed"]) for c in calls) == [("camex", 0), ("camex", 1), ("euclid", 0), ("euclid", 1)]
    assert all(not c["resume"] and c["max_steps"] == 4 and c["data_seed"] == "1234" for c in calls)
    assert all(c["cwd"] == os.getcwd() for c in calls)  # the caller's folder, not the checkout
    for name in ("results.json", "results.md", "curves.png", "grid.json", "configs/camex.json"):
        assert (fake.out / name).exists(), name
    cfg = json.loads((fake.out / "configs" / "camex.json").read_text())
    assert cfg["moe"]["method"] == "camex" and cfg["moe"]["top_k"] is None
    log = (fake.out / "runs" / "camex" / "seed1" / "log.txt").read_text()
    assert "fake launcher starting camex 1" in log and "--output_dir" in log
    res = json.loads((fake.out / "results.json").read_text())
    assert res["pairs"][0]["a"] == "camex" and res["pairs"][0]["n"] == 2
    assert res["pairs"][0]["val_bpb"]["mean_diff"] == pytest.approx(-0.1 / math.log(2))

    # second invocation: everything finished -> no subprocess at all, report rewritten
    (fake.out / "results.md").unlink()
    assert fake.run() == 0
    assert len(fake.calls()) == 4
    assert (fake.out / "results.md").exists()


def test_grid_resumes_from_checkpoint_or_restarts(fake):
    assert fake.run() == 0
    with_ckpt = fake.out / "runs" / "camex" / "seed0"
    no_ckpt = fake.out / "runs" / "euclid" / "seed1"
    (with_ckpt / "final_metrics.json").unlink()
    (with_ckpt / "checkpoints" / "global_step2").mkdir(parents=True)
    (no_ckpt / "final_metrics.json").unlink()
    assert cgrid.has_checkpoint(with_ckpt) and not cgrid.has_checkpoint(no_ckpt)
    assert fake.run() == 0
    new = fake.calls()[4:]
    assert sorted((c["method"], c["seed"], c["resume"]) for c in new) == [("camex", 0, True), ("euclid", 1, False)]
    assert "--resume" in [c for c in new if c["resume"]][0]["argv"]
    # the stale metrics of the run restarted from scratch were moved aside
    assert (no_ckpt / "metrics.jsonl.prev").exists()
    assert len(results.read_metrics(no_ckpt)["train"]) == 4


def test_grid_failure_reports_log_and_command_and_keeps_finished(fake, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "camex:0")
    rc = fake.run()
    assert rc == 1
    err = capsys.readouterr().err
    assert "run camex/seed0 failed (exit code 3)" in err
    assert "RuntimeError: simulated failure" in err
    assert "command: " in err and str(fake.script) in err and "--seed 0" in err
    assert (fake.out / "runs" / "euclid" / "seed0" / "final_metrics.json").exists()
    assert (fake.out / "runs" / "euclid" / "seed1" / "final_metrics.json").exists()
    assert not (fake.out / "runs" / "camex" / "seed1").exists()  # the grid stopped at the failure
    # fixed -> rerun finishes only what is missing
    monkeypatch.delenv("FAKE_FAIL")
    assert fake.run() == 0
    assert sorted((c["method"], c["seed"]) for c in fake.calls()[3:]) == [("camex", 0), ("camex", 1)]


def test_grid_refuses_changed_settings_for_existing_runs(fake, capsys):
    assert fake.run() == 0
    capsys.readouterr()
    rc = fake.run(max_steps=6)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_steps: 4 -> 6" in err


def test_grid_flops_budget(fake, monkeypatch):
    fpt = {"dense": 1000.0, "euclid": 3000.0, "camex": 2000.0}
    seen = []

    def flops_per_token(cfg, seq_len, micro_batch_tokens, accumulation, vocab_size):
        seen.append((seq_len, micro_batch_tokens, accumulation, vocab_size))
        m = cfg["moe"]["method"] if cfg["moe"] else "dense"
        return {"train": fpt[m], "forward": fpt[m] / 3}

    # the tool imports camex_ds.analysis.flops lazily; substitute a fake module
    monkeypatch.setitem(sys.modules, "camex_ds.analysis.flops", types.SimpleNamespace(flops_per_token=flops_per_token))
    # the batch of the launcher's default DeepSpeed config: micro-batch 8, no accumulation, one rank
    assert fake.run("--budget", "flops", "--reference", "camex", methods="dense,euclid,camex", max_steps=9) == 0
    calls = fake.calls()
    assert calls[0]["method"] == "camex"  # the reference trains first
    steps = {c["method"]: c["max_steps"] for c in calls}
    assert steps == {"camex": 9, "dense": 18, "euclid": 6}  # floor(9 * 2000 / fpt)
    assert seen and all(s == (256, 8 * 256, 1, 4096) for s in seen)
    grid = json.loads((fake.out / "grid.json").read_text())
    assert grid["flops_budget"] == pytest.approx(9 * 8 * 256 * 2000.0)
    assert grid["step_batch"] == {"micro": 8, "accumulation": 1, "ranks": 1}
    res = json.loads((fake.out / "results.json").read_text())
    assert res["methods"]["dense"]["max_steps"] == 18


def test_flops_budget_steps_floor():
    cfgs = {m: cgrid.build_method_config(cm.DEFAULT_BASE_CONFIG, m) for m in ("dense", "camex", "smoe")}
    vals = {"dense": 3.0, "camex": 7.0, "smoe": 3.0}

    def fn(cfg, seq_len, micro_batch_tokens, accumulation, vocab_size):
        return {"train": vals[cfg["moe"]["method"] if cfg["moe"] else "dense"]}

    steps, fpt, budget = cgrid.flops_budget_steps(cfgs, "dense", 10, cgrid.StepBatch(1, 2, 1), fn)
    assert budget == 10 * 2 * 256 * 3.0
    assert steps == {"dense": 10, "camex": 4, "smoe": 10}  # floor(30/7) = 4; equal cost keeps 10 exactly


def test_build_method_config():
    base = cm.DEFAULT_BASE_CONFIG
    assert cgrid.build_method_config(base, "dense")["moe"] is None
    smoe = cgrid.build_method_config(base, "smoe")["moe"]
    assert smoe["method"] == "smoe" and smoe["top_k"] == 2 and smoe["num_experts"] == 4
    dense_base = dict(base, moe=None)
    ties = cgrid.build_method_config(dense_base, "camex-ties")
    assert ties["moe"]["method"] == "camex-ties" and ties["moe"]["top_k"] is None
    smoe_base = dict(base, moe=dict(base["moe"], method="smoe", top_k=1, num_experts=8))
    assert cgrid.build_method_config(smoe_base, "smoe")["moe"]["top_k"] == 1
    assert cgrid.build_method_config(smoe_base, "camex")["moe"] == dict(smoe_base["moe"], method="camex", top_k=None)
    assert base["moe"]["method"] == "camex"  # base not mutated
    # grid-wide MoE settings go over the base's MoE block; a top_k set there holds for every method
    set_k = cgrid.build_method_config(dense_base, "smoe", {"top_k": 1, "num_experts": 6})["moe"]
    assert set_k["top_k"] == 1 and set_k["num_experts"] == 6
    assert cgrid.build_method_config(base, "camex", {"curvature_rank": 8})["moe"]["curvature_rank"] == 8


@pytest.mark.parametrize("bad, needle", [
    (["--methods", "camex,foo"], "unknown method 'foo' in --methods; valid choices: dense, smoe, euclid"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--data", "/definitely/missing/data"], "--data path '/definitely/missing/data' does not exist"),
    (["--budget", "time"], "invalid choice: 'time'"),
    (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
    (["--budget", "flops", "--reference", "dense"], "--reference 'dense' is not in --methods; valid choices: euclid, camex"),
])
def test_bad_input_is_one_line_exit_2(fake, capsys, bad, needle):
    argv = ["--data", str(fake.data), "--methods", "euclid,camex", "--seeds", "2", "--max_steps", "3",
            "--output", str(fake.out), "--launcher_script", str(fake.script), "--no_progress"]
    for i in range(0, len(bad), 2):  # later value of an option overrides the earlier one
        argv += bad[i:i + 2]
    try:
        rc = cm.main(argv)
    except SystemExit as e:  # argparse-level errors (e.g. an invalid --budget choice)
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err
    assert fake.calls() == []


def test_dry_run_prints_commands(fake, capsys):
    assert fake.run("--dry_run") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and all(str(fake.script) in line and "--data_seed 1234" in line for line in out)
    assert fake.calls() == []


def test_extra_launcher_args_and_hub_data_in_dry_run(fake, capsys):
    argv = ["--data", "hf:some/dataset", "--methods", "dense", "--seeds", "1", "--max_steps", "2",
            "--output", str(fake.out), "--launcher_script", str(fake.script), "--dry_run", "--", "--foo", "bar"]
    assert cm.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "--data hf:some/dataset" in line and line.endswith("--foo bar")


def test_invalid_base_config_is_one_line_exit_2(fake, tmp_path, capsys):
    pytest.importorskip("camex_ds.config")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(cm.DEFAULT_BASE_CONFIG, n_heads=3)))
    rc = cm.main(["--data", str(fake.data), "--methods", "dense,camex", "--seeds", "1", "--max_steps", "2",
                  "--model_config", str(bad), "--output", str(fake.out), "--launcher_script", str(fake.script)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_heads=3" in err and "'dense'" in err


def test_cli_help_and_error_as_subprocess(tmp_path):
    import subprocess

    tool = str(REPO / "tools" / "compare_methods.py")
    h = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True, cwd=str(tmp_path))
    assert h.returncode == 0
    for needle in ("--budget", "--num_gpus", "resuming:", "results.json", "camex-ties", "exit codes"):
        assert needle in h.stdout
    e = subprocess.run([sys.executable, tool, "--data", str(tmp_path), "--methods", "camx", "--max_steps", "2",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=str(tmp_path))
    assert e.returncode == 2 and e.stdout == ""
    assert e.stderr.strip().splitlines() == [
        "compare_methods.py: error: unknown method 'camx' in --methods; valid choices: "
        "dense, smoe, euclid, ties, dare, camex, camex-ties, camex-dare"
    ]


def test_step_batch_from_deepspeed_config():
    assert cgrid.step_batch({"train_batch_size": 8}, 2, "ds") == cgrid.StepBatch(4, 1, 2)
    assert cgrid.step_batch({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 2, "ds") == \
        cgrid.StepBatch(4, 2, 2)
    assert cgrid.StepBatch(4, 2, 2).tokens(128) == 4 * 2 * 2 * 128
    with pytest.raises(cm.UsageError, match="ds.json: cannot read the batch"):
        cgrid.step_batch({"train_batch_size": "auto"}, 1, "ds.json")


def test_report_only_rewrites_report_without_training(fake):
    assert fake.run() == 0
    for name in ("results.json", "results.md", "curves.png"):
        (fake.out / name).unlink()
    argv = ["--data", str(fake.data), "--methods", "euclid,camex", "--seeds", "2", "--output", str(fake.out),
            "--report_only", "--bootstrap_resamples", "100"]
    assert cm.main(argv) == 0
    assert len(fake.calls()) == 4
    res = json.loads((fake.out / "results.json").read_text())
    assert res["methods"]["camex"]["max_steps"] == 4 and res["pairs"][0]["n"] == 2


def test_flops_budget_counts_the_curvature_per_rank_and_optimizer_step(fake, tmp_path):
    """`--budget flops` with 2 ranks, micro-batch 2 and 4 accumulation steps: each rank curves its experts once per
    optimizer step over its own 2·4 sequences, so camex's FLOPs per token are flops_per_token(cfg, seq_len,
    2·seq_len, accumulation=4), not the whole step's tokens (2·4·2 sequences) taken as one forward."""
    from camex_ds.analysis.flops import flops_per_token

    ds, model = tmp_path / "ds.json", tmp_path / "model.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}))
    model.write_text(json.dumps(dict(cm.DEFAULT_BASE_CONFIG, vocab_size=4096)))
    assert fake.run("--budget", "flops", "--reference", "euclid", "--deepspeed_config", str(ds), "--num_gpus", "2",
                    "--model_config", str(model), "--dry_run", methods="euclid,camex", max_steps=10) == 0
    grid = json.loads((fake.out / "grid.json").read_text())
    camex = cgrid.build_method_config(dict(cm.DEFAULT_BASE_CONFIG, vocab_size=4096), "camex")
    seq = camex["seq_len"]
    want = flops_per_token(camex, seq, 2 * seq, accumulation=4)["train"]
    assert grid["flops_per_token_train"]["camex"] == pytest.approx(want, rel=1e-12)
    assert grid["tokens_per_step"] == 2 * 4 * 2 * seq
