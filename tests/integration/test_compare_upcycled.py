"""Fine-tuning grids of `camex-compare` (issue 24): `--init_from` a dense model upcycled once per variant, grid-wide
MoE settings (`--moe`, `--moe_set`), swept arms (`--sweep`), and the exactness of the upcycle every method starts
from. The grid runs test_stats' fake training script; the models are tiny and built in-process."""

import json
import types

import pytest
import torch

from camex_ds.analysis.options import GridOptions, make_grid
from camex_ds.analysis.supervise import prepare_inits
from camex_ds.ckpt.format import load_pretrained, save_pretrained
from camex_ds.cli import compare as cm
from camex_ds.config import MERGE_METHODS, ModelConfig
from camex_ds.model import GPT
from tests.unit.analysis.test_stats import FAKE_LAUNCHER

DENSE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32, "activation": "gelu",
         "vocab_size": 64, "moe": None}
#: the paper's GPT-2 protocol at this size: 7 experts, curvature rank 8, 4 segments per sequence
REFERENCE_MOE = ["--moe_set", "num_experts=7", "--moe_set", "curvature_rank=8", "--moe_set", "segment_len=8",
                 "--moe_set", "every=1"]


@pytest.fixture
def dense_model(tmp_path):
    torch.manual_seed(3)
    model = GPT(ModelConfig.from_dict(DENSE))
    folder = tmp_path / "dense"
    folder.mkdir()
    with torch.no_grad():
        save_pretrained(folder, model.state_dict(), model.config)
    return folder


@pytest.fixture
def fake(tmp_path, monkeypatch, dense_model):
    script = tmp_path / "fake_pretrain.py"
    script.write_text(FAKE_LAUNCHER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    data = tmp_path / "data.txt"
    data.write_text("hello world\n" * 10)
    out = tmp_path / "out"

    def run(*extra, methods="dense,euclid,camex", seeds=2, max_steps=4):
        argv = ["--init_from", str(dense_model), "--data", str(data), "--val_data", str(data), "--methods", methods,
                "--seeds", str(seeds), "--max_steps", str(max_steps), "--output", str(out), "--eval_interval", "2",
                "--eval_batches", "3", "--launcher_script", str(script), "--no_progress",
                "--bootstrap_resamples", "200", *extra]
        return cm.main(argv, poll_interval=0.02)

    def read_calls():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return types.SimpleNamespace(run=run, calls=read_calls, out=out, dense=dense_model, data=data)


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_sweep_upcycles_once_per_variant_shares_runs_and_reports_each_arm(fake):
    assert fake.run(*REFERENCE_MOE, "--sweep", "curvature_rank=1,8", "--seed_data_order") == 0
    calls = fake.calls()
    # euclid does not depend on the curvature rank: 1 dense + 1 euclid + 2 camex variants, 2 seeds each
    assert len(calls) == 8
    inits = {(c["method"], _flag(c["argv"], "--init_from")) for c in calls}
    assert ("dense", str(fake.dense)) in inits
    upcycled = sorted(p.name for p in (fake.out / "upcycled").iterdir())
    assert len(upcycled) == 3 and sum(n.startswith("camex-") for n in upcycled) == 2
    assert all("--model_config" not in c["argv"] and _flag(c["argv"], "--eval_batches") == "3" for c in calls)
    assert {(c["seed"], c["data_seed"]) for c in calls} == {(0, "1234"), (1, "1235")}  # one order per seed
    up = load_pretrained(fake.out / "upcycled" / next(n for n in upcycled if n.startswith("euclid-")))
    assert up.config.moe.num_experts == 7 and up.config.moe.segment_len == 8
    for rank in (1, 8):
        assert (fake.out / "runs" / "camex" / f"curvature_rank={rank}" / "seed1" / "final_metrics.json").exists()
    assert (fake.out / "runs" / "euclid" / "seed1" / "final_metrics.json").exists()

    res = json.loads((fake.out / "results.json").read_text())
    assert res["arms_order"] == ["curvature_rank=1", "curvature_rank=8"]
    for label, arm in res["arms"].items():
        assert arm["variants"] == {"dense": "dense", "euclid": "euclid", "camex": f"camex/{label}"}
        pairs = {(p["a"], p["b"], p["relation"]) for p in arm["pairs"]}
        assert pairs == {("camex", "euclid", "twin"), ("euclid", "dense", "vs-dense"), ("camex", "dense", "vs-dense")}
        assert all(arm["methods"][m]["finished_seeds"] == [0, 1] for m in ("dense", "euclid", "camex"))
        diag = arm["diagnostics"]
        assert diag["camex"]["end"]["curvature_dev_from_identity"]["mean"] == 0.5
        assert diag["euclid"]["end"]["curvature_dev_from_identity"]["mean"] is None  # reported as n/a
        assert diag["euclid"]["end"]["router_entropy"]["mean"] == pytest.approx(0.75)  # last row, layer mean
        assert diag["camex"]["curves"]["curvature_dev_from_identity"]["step"] == [1, 2, 3, 4]
    md = (fake.out / "results.md").read_text()
    assert "## Arm `curvature_rank=8`" in md and "### Diagnostics" in md
    for name in ("curves-curvature_rank=1.png", "diagnostics-curvature_rank=8.png"):
        assert (fake.out / name).stat().st_size > 0 and name in md

    # a rerun finds every run finished and every upcycled model made: nothing is trained or upcycled again
    stamps = {p: p.stat().st_mtime_ns for p in (fake.out / "upcycled").iterdir()}
    assert fake.run(*REFERENCE_MOE, "--sweep", "curvature_rank=1,8", "--seed_data_order") == 0
    assert len(fake.calls()) == 8
    assert {p: p.stat().st_mtime_ns for p in (fake.out / "upcycled").iterdir()} == stamps


def test_arm_seeds_give_the_sweep_fewer_seeds_than_the_reference_arm(fake):
    """The first arm (the reference settings) trains every seed, the others the first --arm_seeds; a method the
    sweep does not change trains the seeds of every arm, and each arm's pairs use its own seeds."""
    assert fake.run(*REFERENCE_MOE, "--sweep", "curvature_rank=8,1", "--arm_seeds", "1", seeds=3) == 0
    runs = {}
    for c in fake.calls():
        runs.setdefault(c["method"], []).append(c["seed"])
    assert sorted(runs["dense"]) == sorted(runs["euclid"]) == [0, 1, 2]
    assert sorted(runs["camex"]) == [0, 0, 1, 2]  # rank 8 (the reference arm): 3 seeds, rank 1: 1 seed
    res = json.loads((fake.out / "results.json").read_text())
    assert res["meta"]["arm_seeds"] == 1
    assert res["arms"]["curvature_rank=8"]["seeds"] == [0, 1, 2]
    arm = res["arms"]["curvature_rank=1"]
    assert arm["seeds"] == [0] and arm["methods"]["camex"]["missing_seeds"] == []
    assert {p["n"] for p in arm["pairs"]} == {1}


@pytest.mark.parametrize("bad, needle", [
    (["--arm_seeds", "3"], "--arm_seeds 3 is more than --seeds 2"),
    (["--eval_windows", "0"], "--eval_windows must be >= 1, got 0"),
    (["--eval_windows", "8"], "--eval_batches and --eval_windows exclude each other"),
])
def test_bad_seed_and_window_counts_are_one_line_exit_2(fake, capsys, bad, needle):
    assert fake.run(*bad) == 2
    assert needle in capsys.readouterr().err


def test_eval_windows_reach_every_run(tmp_path, capsys):
    argv = ["--methods", "dense,camex", "--seeds", "1", "--max_steps", "2", "--output", str(tmp_path / "o"),
            "--eval_windows", "40", "--dry_run"]
    assert cm.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("--eval_windows 40" in line and "--eval_batches" not in line for line in lines)


def test_a_changed_moe_setting_is_a_new_upcycle_and_a_refused_rerun(fake, capsys):
    assert fake.run("--moe_set", "segment_len=8", methods="euclid", seeds=1) == 0
    capsys.readouterr()
    assert fake.run("--moe_set", "segment_len=16", methods="euclid", seeds=1) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init_from" in err and "use a new --output" in err


@pytest.mark.parametrize("bad, needle", [
    (["--moe_set", "foo=1"], "--moe_set: unknown MoE key 'foo'; valid keys: num_experts, top_k, every"),
    (["--moe_set", "curvature_rank"], "--moe_set 'curvature_rank' is invalid: expected KEY=VALUE"),
    (["--moe_set", "curvature_rank=0"], "moe.curvature_rank=0 is invalid: expected an integer >= 1"),
    (["--moe_set", "method=ties"], "'method' is chosen per run by --methods"),
    (["--sweep", "alpha=1,1"], "--sweep 'alpha=1,1' repeats a value"),
    (["--sweep", "alpha=1", "--sweep", "alpha=2"], "--sweep alpha is given twice"),
    (["--sweep", "routing=causal,sideways"], "moe.routing='sideways' is invalid: expected one of causal"),
    (["--model_config", "x.json"], "--model_config and --init_from exclude each other"),
])
def test_bad_moe_settings_are_one_line_exit_2(fake, capsys, bad, needle):
    assert fake.run("--moe_set", "segment_len=8", *bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert fake.calls() == []


def test_init_from_must_be_a_dense_model(fake, tmp_path, capsys):
    grid = make_grid(GridOptions(output=str(tmp_path / "g"), max_steps=1, methods="camex", init_from=str(fake.dense),
                                 moe_set=["segment_len=8"]))
    prepare_inits(grid, None)
    moe_model = grid.inits["camex"]
    assert cm.main(["--init_from", str(moe_model), "--max_steps", "1", "--output", str(tmp_path / "o")]) == 2
    assert "is a camex model: a grid upcycles a dense model" in capsys.readouterr().err


def test_from_scratch_grid_takes_moe_settings_and_sweeps(tmp_path, capsys):
    argv = ["--methods", "dense,euclid,camex", "--seeds", "1", "--max_steps", "2", "--output", str(tmp_path / "o"),
            "--moe_set", "num_experts=3", "--sweep", "alpha=0.5,1", "--dry_run"]
    assert cm.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # alpha acts on both merging methods: 1 dense + 2 euclid + 2 camex runs
    assert len(lines) == 5 and all("--model_config" in line and "--init_from" not in line for line in lines)
    cfg = json.loads((tmp_path / "o" / "configs" / "euclid" / "alpha=0.5.json").read_text())
    assert cfg["moe"]["num_experts"] == 3 and cfg["moe"]["alpha"] == 0.5 and cfg["moe"]["method"] == "euclid"


@pytest.mark.parametrize("settings", [
    ["num_experts=7", "curvature_rank=8", "segment_len=8", "every=1"],
    ["num_experts=3", "segment_len=16", "top_k=2", "routing=segment"],
])
def test_upcycled_models_start_at_the_dense_models_loss(dense_model, tmp_path, settings):
    """Step 0 of a fine-tuning grid: every merge method's upcycled model has the dense model's loss on the same
    batch (eval mode: no router noise, no DARE mask), so the runs differ only in how they train."""
    grid = make_grid(GridOptions(output=str(tmp_path / "g"), max_steps=1, methods=",".join(("dense",) + MERGE_METHODS),
                                 init_from=str(dense_model), moe_set=settings))
    dyn = make_grid(GridOptions(output=str(tmp_path / "g"), max_steps=1, methods="camex,camex-ties", sweep=[
        "dynamic=true"], init_from=str(dense_model), moe_set=settings[:2] + ["segment_len=8", "every=1"]))
    for g in (grid, dyn):
        prepare_inits(g, None)
    ids = torch.randint(0, DENSE["vocab_size"], (4, DENSE["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]

    def loss(folder):
        with torch.no_grad():
            return float(load_pretrained(folder)(x, labels=y).loss)

    want = loss(dense_model)
    inits = {**grid.inits, **dyn.inits}
    assert len(inits) == 1 + len(MERGE_METHODS) + 2
    for name, folder in inits.items():
        assert abs(loss(folder) - want) / want < 1e-5, name
