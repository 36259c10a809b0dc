"""`camex-study` (issue 24): the plan it prints, its bad input, and `--quick` end to end (17 launcher runs, in this
process): every stage and every arm runs and is reported, and a rerun trains nothing again."""
import json
import shlex
import sys

import pytest

from camex_ds.analysis import supervise
from camex_ds.analysis.arms import parse_sweeps
from camex_ds.analysis.grid import TRAINER_MODULE
from camex_ds.analysis.study import STAGE_TITLES, STUDY_METHODS, StudySettings, make_plan
from camex_ds.cli import study

from tests.launch import launch


def test_full_plan_fits_two_hours_and_prints_runs_steps_and_time(tmp_path, capsys):
    plan = make_plan(StudySettings(output=str(tmp_path / "s")))
    assert sum(plan.estimate_s.values()) < 2.2 * 3600
    assert plan.moe["num_experts"] == 7 and plan.moe["curvature_rank"] == 8
    assert plan.moe["segment_len"] * 4 == plan.model["seq_len"]  # GPT-2's 4 segments of 256 in 1024
    assert study.main(["--plan", "--output", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    for needle in ("pretrain", "finetune", "scratch", "runs x 200 steps", "estimated total"):
        assert needle in out
    assert not (tmp_path / "s" / "pretrain").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "0"], "--seeds must be > 0, got 0"),
    (["--data", "train.txt"], "--data and --val_data go together"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    assert study.main([*argv, "--output", str(tmp_path / "s"), "--plan"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def _in_process(cmd, rd, log, on_step, poll_interval):
    """`supervise.execute` with the grid's launcher command run by `launch` in this process: a run costs ~0.5 s
    instead of a new interpreter's ~5 s. The grid's own subprocess path is tested by test_compare_methods_e2e."""
    assert cmd[:3] == [sys.executable, "-m", TRAINER_MODULE], cmd
    rd.mkdir(parents=True, exist_ok=True)
    code, err, out = launch(cmd[3:])
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n===== in-process\n===== {shlex.join(cmd)}\n{out}{err}")
    on_step(None)
    return code


def _launches(folder):
    return {str(p): p.read_text().count("\n===== ") for p in folder.rglob("log.txt")}


@pytest.mark.slow
def test_quick_study_runs_and_reports_every_arm(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMEX_DS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(supervise, "execute", _in_process)
    out = tmp_path / "study"
    argv = ["--quick", "--output", str(out), "--no_progress"]
    assert study.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert res["pretrain"]["methods"]["dense"]["finished_seeds"] == [0]
    assert (out / "dense_model" / "model.safetensors").is_file()
    labels = [arm.label for arm in parse_sweeps(make_plan(StudySettings(output=str(out), quick=True)).sweeps)]
    assert len(labels) >= 2 and res["finetune"]["arms_order"] == labels
    for label in labels:
        arm = res["finetune"]["arms"][label]
        assert all(arm["methods"][m]["finished_seeds"] == [0] for m in STUDY_METHODS), label
        assert {(p["a"], p["b"]) for p in arm["pairs"]} >= {("camex", "euclid"), ("camex-ties", "ties"),
                                                            ("camex", "dense")}
        assert f"Arm `{label}`" in report
    assert all(res["scratch"]["methods"][m]["finished_seeds"] == [0] for m in STUDY_METHODS)
    scaled = res["scratch_scaled"]
    assert scaled["meta"]["moe_settings"] == {"curvature_lr_scale": 100}
    assert {(p["a"], p["b"]) for p in scaled["pairs"] if p["relation"] == "twin"} == {("camex", "euclid"),
                                                                                      ("camex-ties", "ties")}
    for title in STAGE_TITLES.values():
        assert title in report
    assert "Measured:" in report and (out / "study.log").stat().st_size > 0
    # the trainer's per-layer values reach the report: the curvature factors' distance from identity, per arm
    camex = res["finetune"]["arms"][labels[0]]["diagnostics"]["camex"]
    assert camex["end"]["curvature_dev_from_identity"]["n"] == 1
    assert camex["curves"]["router_entropy"]["step"]

    launches = _launches(out)
    assert study.main(argv) == 0  # a rerun resumes: every run is finished, nothing is trained again
    assert _launches(out) == launches
