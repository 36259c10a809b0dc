"""Issue 23, item 4: one run per output folder. A fresh run into a used folder, a second run while the first still
runs, and a resume from a folder where two runs left checkpoints are each refused in one line (exit 2), and in
every refusal every file already in the folder is byte-identical afterwards; `--overwrite_output_dir` moves the
earlier run aside, deleting nothing; a lock whose process is gone is taken over; the lock goes when the run ends.

The runs are the in-process launcher's (`launch.launch`) on a tiny model; the two-rank job:
tests/integration/test_run_dir.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import TINY, launch, one_error
from camex_ds.train import manifest, run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_files):
    root = tmp_path_factory.mktemp("run_dir")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
        "tensorboard": {"enabled": True, "output_path": "auto", "job_name": "camex"}}))
    return {"root": root, "train": text_files[0]}


def _args(s, out, *extra) -> list:
    return ["--model_config", s["root"] / "tiny.json", "--deepspeed_config", s["root"] / "ds.json", "--data",
            s["train"], "--vocab_size", 512, "--cache_dir", s["root"] / "cache", "--output_dir", out, "--max_steps", 2,
            "--save_interval", 1, "--eval_interval", 2, "--eval_batches", 1, "--log_interval", 1, "--no_progress",
            *extra]


def _ok(result) -> str:
    code, err, _ = result
    assert code == 0, err[-3000:]
    return err


def _hashes(folder: Path) -> dict:
    """Every file under `folder`, by relative path, with its sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_ids(run: Path) -> dict:
    ckpt = run / "checkpoints"
    return {t: manifest.read(ckpt / t)["run"].get(run_dir.RUN_ID) for t in sorted(os.listdir(ckpt))
            if (ckpt / t / manifest.MANIFEST).is_file()}


@pytest.fixture(scope="module")
def earlier(setup):
    """A finished 2-step run, checkpoints at steps 1 and 2, that each test copies into its own folder."""
    run = setup["root"] / "earlier"
    _ok(launch(_args(setup, run)))
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(setup, earlier, tmp_path):
    run = _copy(earlier, tmp_path / "run")
    before = _hashes(run)
    line = one_error(launch(_args(setup, run)), 2, f"--output_dir '{run}' holds an earlier run (metrics.jsonl, "
                     "final_metrics.json, checkpoints global_step2, global_step1)", "--resume",
                     "another --output_dir", "--overwrite_output_dir")
    assert _hashes(run) == before
    print(line.replace(str(run), "RUN"))
    one_error(launch(_args(setup, run, "--resume", "--overwrite_output_dir")), 2, "contradict each other")
    assert _hashes(run) == before

    err = _ok(launch(_args(setup, run, "--overwrite_output_dir", "--seed", 7)))
    notes = [line for line in err.splitlines() if line.startswith("note: --overwrite_output_dir: moved")]
    assert len(notes) == 1, err[-2000:]
    aside = Path(notes[0].rsplit(" into ", 1)[1].strip("'"))
    assert aside.parent == run and aside.name.startswith("replaced-")
    assert _hashes(aside) == before  # every file of the earlier run, byte for byte, nothing else
    print(notes[0].replace(str(run), "RUN"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert set(_run_ids(run).values()).isdisjoint(_run_ids(aside).values())
    assert not (run / run_dir.LOCK).exists()


def test_a_live_run_s_lock_is_refused_naming_its_holder(setup, earlier, tmp_path):
    """A lock this process holds, as a live run's rank 0 would: the run, even with --overwrite_output_dir, refuses."""
    run = _copy(earlier, tmp_path / "run")
    lock = run_dir.Lock.take(run)
    try:
        before = _hashes(run)
        holder = f"(pid {os.getpid()} on host {socket.gethostname()}, started "
        for extra in (["--resume", "--max_steps", 3], ["--overwrite_output_dir"]):
            line = one_error(launch(_args(setup, run, *extra)), 2, f"--output_dir '{run}' is in use by another "
                             f"run {holder}", "wait for it to end, or use another --output_dir")
            assert _hashes(run) == before
    finally:
        lock.release()
    print(line.replace(str(run), "RUN"))
    assert not (run / run_dir.LOCK).exists()
    _ok(launch(_args(setup, run, "--resume", "--max_steps", 3)))  # once the holder has gone


def test_another_host_s_lock_is_never_taken_over(setup, earlier, tmp_path):
    run = _copy(earlier, tmp_path / "run")
    holder = {"host": "node-17", "pid": 4242, "started": "2026-01-01T09:00:00+00:00"}
    (run / run_dir.LOCK).write_text(json.dumps(holder))
    before = _hashes(run)
    line = one_error(launch(_args(setup, run, "--resume", "--max_steps", 3)), 2,
                     "is in use by another run (pid 4242 on host node-17, started 2026-01-01T09:00:00+00:00)",
                     f"if that run has ended (this host cannot see it), remove '{run / run_dir.LOCK}'")
    assert _hashes(run) == before
    print(line.replace(str(run), "RUN"))
    (run / run_dir.LOCK).write_text("")
    one_error(launch(_args(setup, run, "--resume", "--max_steps", 3)), 2, "which does not say by whom")


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("gone", ["not running", "another process", "restarted"])
def test_a_lock_whose_process_is_gone_is_taken_over(setup, earlier, tmp_path, gone):
    run = _copy(earlier, tmp_path / "run")
    mine = run_dir.Lock.take(tmp_path)
    mine.release()
    holder = json.loads(mine.text)  # what a lock of this process says
    holder["started"] = "2026-01-01T09:00:00+00:00"
    if gone == "not running":
        holder["pid"] = _dead_pid()
    elif gone == "another process":  # the pid now names another process (a restarted container)
        holder["process_start"] = "1"
    else:
        holder["boot_id"] = "a-boot-before-this-one"
    (run / run_dir.LOCK).write_text(json.dumps(holder))
    err = _ok(launch(_args(setup, run, "--resume", "--max_steps", 3)))
    warnings = [line for line in err.splitlines() if line.startswith("warning: took over the lock")]
    assert len(warnings) == 1 and f"'{run / run_dir.LOCK}' of an earlier run that is gone (pid {holder['pid']} " \
        f"on host {socket.gethostname()}, started 2026-01-01T09:00:00+00:00: " in warnings[0] and gone in warnings[0]
    print(warnings[0].replace(str(run), "RUN"))
    assert not (run / run_dir.LOCK).exists()


def test_the_lock_is_released_however_the_run_ends(setup, tmp_path, monkeypatch):
    """An error after the lock was taken, SIGTERM before the step loop and SIGTERM in it (a checkpoint first)."""
    from camex_ds.model import GPT
    from camex_ds.train import loop

    run = tmp_path / "run"
    one_error(launch(_args(setup, run, "--eval_batches", 100_000)), 2, "lower --eval_batches")
    assert not (run / run_dir.LOCK).exists() and not (run / "checkpoints").exists()

    real_splits, real_forward = loop.prepare_splits, GPT.forward

    def term(*args, **kwargs):  # the lock is held here: SIGTERM interrupts like Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
        return real_splits(*args, **kwargs)

    monkeypatch.setattr(loop, "prepare_splits", term)
    code, err, _ = launch(_args(setup, run))
    assert code == 130 and not (run / run_dir.LOCK).exists(), err[-2000:]
    monkeypatch.undo()

    def term_once(self, *args, **kwargs):
        monkeypatch.setattr(GPT, "forward", real_forward)
        os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", term_once)
    code, err, _ = launch(_args(setup, run, "--max_steps", 3))
    assert code == 130 and (run / "checkpoints" / "latest").read_text() == "global_step1", err[-2000:]
    assert not (run / run_dir.LOCK).exists()


def test_a_resume_from_a_folder_mixing_two_runs_is_refused_naming_the_other_run_s_checkpoints(setup, earlier,
                                                                                           tmp_path):
    """What a second run into the folder left before this check: its global_step1 over the first run's, and
    `latest` pointing at it, beside the first run's global_step2."""
    run, other = _copy(earlier, tmp_path / "run"), tmp_path / "other"
    _ok(launch(_args(setup, other, "--max_steps", 1)))
    shutil.rmtree(run / "checkpoints" / "global_step1")
    shutil.copytree(other / "checkpoints" / "global_step1", run / "checkpoints" / "global_step1")
    (run / "checkpoints" / "latest").write_text("global_step1")
    before = _hashes(run)
    line = one_error(launch(_args(setup, run, "--resume", "--max_steps", 3)), 2,
                     f"--resume: '{run / 'checkpoints'}' mixes two runs: global_step2's, the newest, and another "
                     "run's global_step1:", "move the checkpoints of the run not to resume out of that folder")
    assert _hashes(run) == before
    print(line.replace(str(run), "RUN"))


def test_a_run_keeps_its_id_across_resumes_and_checkpoints_without_one_still_resume(setup, earlier, tmp_path):
    run = _copy(earlier, tmp_path / "run")
    _ok(launch(_args(setup, run, "--resume", "--max_steps", 3)))
    ids = _run_ids(run)
    assert len(set(ids.values())) == 1 and None not in ids.values(), ids

    old = _copy(earlier, tmp_path / "old")  # as saved before run ids
    for tag in ("global_step1", "global_step2"):
        path = old / "checkpoints" / tag / manifest.MANIFEST
        saved = json.loads(path.read_text())
        del saved["run"][run_dir.RUN_ID]
        path.write_text(json.dumps(saved))
    _ok(launch(_args(setup, old, "--resume", "--max_steps", 3)))
    ids = _run_ids(old)
    assert ids["global_step1"] is None and ids["global_step2"] is None and ids["global_step3"] is not None
