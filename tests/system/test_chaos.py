"""Issue 15, the chaos suite: damaged files, a full disk, NaN steps, killed and stopped ranks, plain text.

Fast cases run the launcher in this process (`launch.launch`) on a tiny model; the multi-process ones
(marked slow) start real rank processes. docs/reliability.md reports what they measure. In every case the
previous complete checkpoint must still verify and load, and the data cache must still verify.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import distributed
from tests.launch import LAUNCHER, TINY, launch, one_error, run_checked, tiny_ds_config, write_json
from camex_ds.data import PreparedDataset
from camex_ds.train import manifest

FAULTY = "tests.dist.faulty_pretrain"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_files):
    root = tmp_path_factory.mktemp("chaos")
    return {"root": root, "train": text_files[0], "valid": text_files[1], "cache": root / "cache",
            "model": write_json(root / "tiny.json", TINY), "ds": tiny_ds_config(root / "ds.json")}


def _args(s, out, *extra, ds=None, model=None) -> list:
    return ["--model_config", model or s["model"], "--deepspeed_config", ds or s["ds"], "--data", s["train"],
            "--vocab_size", 512, "--cache_dir", s["cache"], "--output_dir", out, "--log_interval", 1,
            "--eval_batches", 1, "--no_progress", *extra]


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _ok(result) -> None:
    code, err, _ = result
    assert code == 0, err[-3000:]


def _nothing_lost(run: Path, tag: str, s: dict) -> None:
    """The checkpoint `tag` verifies and every dataset in the cache verifies."""
    assert manifest.verify(run / "checkpoints" / tag) is None
    datasets = [p for p in s["cache"].iterdir() if (p / "index.json").is_file()]
    assert datasets
    for path in datasets:
        PreparedDataset.open(path).verify()


@pytest.fixture(scope="module")
def trained(setup):
    """4 steps, checkpoints at 2 and 4; and the same run carried on to 6 steps, the reference for resumes."""
    run, reference = setup["root"] / "trained", setup["root"] / "reference"
    _ok(launch(_args(setup, run, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 4)))
    _ok(launch(_args(setup, reference, "--max_steps", 6, "--save_interval", 2, "--eval_interval", 6)))
    return run, _losses(reference)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------- fast, in-process


def test_one_text_file_gives_both_splits_and_trains(setup, trained):
    """The issue's first failure: a single .txt was one document, all in one split."""
    run, _ = trained
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 4 and math.isfinite(final["val_loss"])
    prepared = PreparedDataset.open(json.loads((run / "train_args.json").read_text())["prepared_data"])
    splits = prepared.index["splits"]
    assert splits["train"]["documents"] > 10 and splits["validation"]["documents"] >= 1


@pytest.mark.parametrize("damage, file", [
    ("truncate", "mp_rank_00_model_states.pt"),  # model shard
    ("flip", "layer_1_expert_2_mp_rank_00_model_states.pt"),  # expert shard
    ("truncate", "expp_rank_0_mp_rank_00_optim_states.pt"),  # optimizer shard
    ("flip", "manifest.json"),  # the checkpoint's own JSON
    ("delete", "rng_state_rank0.pt"),
])
def test_damaged_checkpoint_file_is_named_and_resume_falls_back(setup, trained, tmp_path, damage, file):
    run = _copy(trained[0], tmp_path / "run")
    bad = run / "checkpoints" / "global_step4" / file
    {"truncate": _truncate, "flip": _flip, "delete": Path.unlink}[damage](bad)
    code, err, _ = launch(_args(setup, run, "--max_steps", 6, "--save_interval", 2, "--eval_interval", 6,
                                "--resume"))
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint global_step4")]
    assert len(warnings) == 1 and (str(bad) in warnings[0] or "manifest.json" in warnings[0]), err[-2000:]
    print(warnings[0].replace(str(run), "RUN"))
    assert "resuming from global_step2" in err
    reference, losses = trained[1], _losses(run)
    assert sorted(losses) == list(range(1, 7))
    for step in (3, 4, 5, 6):  # retrained from step 2: the same losses as the uninterrupted run
        assert abs(losses[step] - reference[step]) <= 1e-5 * abs(reference[step]), step
    _nothing_lost(run, "global_step6", setup)


def test_no_checkpoint_verifies_is_one_line(setup, trained, tmp_path):
    run = _copy(trained[0], tmp_path / "run")
    for tag in ("global_step2", "global_step4"):
        _truncate(run / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    one_error(launch(_args(setup, run, "--max_steps", 6, "--resume")), 2, "none verifies", "global_step4")


def test_garbage_latest_resumes_from_the_newest_checkpoint_that_verifies(setup, trained, tmp_path):
    run = _copy(trained[0], tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("\x00garbage")
    _ok(launch(_args(setup, run, "--max_steps", 5, "--eval_interval", 5, "--resume")))
    assert sorted(_losses(run)) == list(range(1, 6)) and abs(_losses(run)[5] - trained[1][5]) <= 1e-5 * trained[1][5]


def test_damaged_data_cache_is_rebuilt_and_resume_continues(setup, trained, tmp_path):
    run = _copy(trained[0], tmp_path / "run")
    cache = tmp_path / "cache"
    shutil.copytree(setup["cache"], cache)
    prepared = Path(json.loads((run / "train_args.json").read_text())["prepared_data"]).name
    for name in ("train.bin", "tokenizer.model"):
        _flip(cache / prepared / name)
        code, err, _ = launch([*_args(setup, run, "--max_steps", 5, "--eval_interval", 5, "--resume"),
                               "--cache_dir", cache])
        assert code == 0 and "warning: the cached dataset is damaged" in err and name in err, err[-3000:]
        PreparedDataset.open(cache / prepared).verify()  # rebuilt, identical (the resume accepted its checksums)
        (run / "final_metrics.json").unlink()


@pytest.mark.parametrize("damage", ["token shard", "tokenizer", "index", "model config"])
def test_damaged_input_without_a_fallback_is_one_line_naming_it(setup, trained, tmp_path, damage):
    """A preprocessed folder or config the user gave has no source to rebuild from: one line, exit 2."""
    prepared = tmp_path / "prepared"
    shutil.copytree(json.loads((trained[0] / "train_args.json").read_text())["prepared_data"], prepared)
    model = tmp_path / "tiny.json"
    shutil.copy(setup["model"], model)
    bad = {"token shard": prepared / "validation.bin", "tokenizer": prepared / "tokenizer.model",
           "index": prepared / "index.json", "model config": model}[damage]
    _truncate(bad)
    argv = [*_args(setup, tmp_path / "out", "--max_steps", 1, model=model), "--data", prepared]
    one_error(launch(argv), 2, str(bad))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_with_another_model_or_data_lists_the_differences(setup, trained, tmp_path):
    run = _copy(trained[0], tmp_path / "run")
    wider = write_json(tmp_path / "wider.json", {**TINY, "d_model": 48, "moe": {**TINY["moe"], "num_experts": 2}})
    line = one_error(launch(_args(setup, run, "--max_steps", 6, "--resume", model=wider)), 2,
                     "model_config.d_model (32 -> 48)", "model_config.moe.num_experts (4 -> 2)")
    assert "data." not in line
    line = one_error(launch([*_args(setup, run, "--max_steps", 6, "--resume"), "--data_seed", 7]), 2,
                     "data.data_seed (1234 -> 7)")
    one_error(launch([*_args(setup, run, "--max_steps", 6, "--resume"), "--val_data", setup["valid"]]), 2,
              "data.train.tokens", "data.validation.sha256")
    _nothing_lost(run, "global_step4", setup)


def test_checks_before_the_first_step(setup, tmp_path):
    """Each is one line, exit 2, and nothing was trained (no metrics, no checkpoint)."""
    out = tmp_path / "out"
    tiny_valid = tmp_path / "tiny_valid.txt"
    tiny_valid.write_text("A validation text far shorter than one window of thirty-three tokens.\n")
    cases = [
        (["--ep_size", 2], "moe.ep_size=2 does not divide the world size 1"),
        (["--val_data", tiny_valid], "fewer than --eval_batches 1 x micro batch 2"),
        (["--eval_batches", 1000], "lower --eval_batches to"),
        (["--output_dir", setup["model"] / "sub"], "is not writable"),
        (["--vocab_size", 100], "vocab_size 100 is too small"),
        (["--max_steps", 0], "--max_steps=0 is invalid"),
    ]
    for extra, needle in cases:
        one_error(launch([*_args(setup, out, "--max_steps", 2), *extra]), 2, needle)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists(), extra
    small_vocab = write_json(tmp_path / "v.json", {**TINY, "vocab_size": 300})
    one_error(launch(_args(setup, out, "--max_steps", 2, model=small_vocab)), 2,
              "vocab_size=300 is smaller than the tokenizer's 512")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """A small real disk, when this process may mount one (root, with the capability); else False."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_disk_full_during_a_save(setup, trained, tmp_path, monkeypatch):
    """A real full disk (a 2.5 MB tmpfs: one 1.6 MB checkpoint fits, two do not) where root may mount one,
    else an injected ENOSPC; the failed save leaves nothing behind and the run continues elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "2500k")
    try:
        run = disk / "run"
        if not mounted:
            real_save = torch.save

            def full_after_first_checkpoint(obj, f, *a, **kw):
                if "global_step4" in str(f):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
                return real_save(obj, f, *a, **kw)

            monkeypatch.setattr(torch, "save", full_after_first_checkpoint)
        result = launch(_args(setup, run, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 4))
        monkeypatch.undo()
        line = one_error(result, 2, f"cannot save checkpoint '{run / 'checkpoints' / 'global_step4'}'",
                         "the disk is full", "bytes)", "'latest' still names global_step2")
        needed = int(line.split("MB (")[1].split(" bytes")[0])
        assert abs(needed - manifest.total_bytes(run / "checkpoints" / "global_step2")) == 0
        assert not (run / "checkpoints" / "global_step4").exists()
        assert (run / "checkpoints" / "latest").read_text() == "global_step2"
        moved = shutil.copytree(run, tmp_path / "moved")  # free space: the same run on a bigger disk
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    _nothing_lost(moved, "global_step2", setup)
    _ok(launch(_args(setup, moved, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 4, "--resume")))
    assert abs(_losses(moved)[4] - trained[1][4]) <= 1e-5 * trained[1][4]
    print(f"disk full ({'a real 2.5 MB tmpfs' if mounted else 'injected ENOSPC'}): {line}")


def test_keep_checkpoints(setup, tmp_path):
    run = tmp_path / "run"
    _ok(launch(_args(setup, run, "--max_steps", 5, "--save_interval", 1, "--eval_interval", 5,
                     "--keep_checkpoints", 2)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["global_step4", "global_step5"]
    _nothing_lost(run, "global_step4", setup)


# ----------------------------------------------------------------------------------------------- NaN / Inf steps


def _poison(monkeypatch, at_call: int) -> None:
    """Make the loss of the `at_call`-th training forward (1-based, micro-batches) NaN: injected from here."""
    from camex_ds.model import GPT

    real, calls = GPT.forward, [0]

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == at_call:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint structure, by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _state(tag_dir: Path) -> dict:
    """Weights and optimizer state of a checkpoint (what a skipped step must not change)."""
    out = {}
    for f in sorted(tag_dir.glob("*.pt")):
        if f.name.startswith("rng_state"):
            continue
        content = torch.load(f, weights_only=False)
        if f.name == "mp_rank_00_model_states.pt":
            content = {"module": content["module"], "optimizer": content.get("optimizer")}
        out.update({f"{f.name}{k}": v for k, v in _tensors(content)})
    return out


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nan_loss_stops_with_the_step_and_saves_no_bad_weights(setup, tmp_path, monkeypatch, stage):
    run = tmp_path / "run"
    _poison(monkeypatch, at_call=3)
    result = launch(_args(setup, run, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 4,
                          ds=tiny_ds_config(tmp_path / "ds.json", stage)))
    one_error(result, 1, "step 3: the loss or gradient norm is not finite", "newest checkpoint: global_step2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["global_step2"]
    _nothing_lost(run, "global_step2", setup)


@pytest.mark.parametrize("stage, accum", [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)])
def test_skipped_nan_step_changes_nothing(setup, tmp_path, monkeypatch, stage, accum):
    """--skip_nonfinite: the bad step (its first micro-batch poisoned) leaves weights and optimizer state
    exactly as they were, is counted, and training goes on with DeepSpeed's step counters in order."""
    run = tmp_path / "run"
    _poison(monkeypatch, at_call=3 * accum + 1)  # the first micro-batch of step 4
    _ok(launch(_args(setup, run, "--max_steps", 5, "--save_interval", 1, "--eval_interval", 5, "--skip_nonfinite", 1,
                     ds=tiny_ds_config(tmp_path / "ds.json", stage, accum))))
    before, after, later = (_state(run / "checkpoints" / f"global_step{s}") for s in (3, 4, 5))
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(after[n], later[n]) for n in after)  # step 5 trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 0, 1, 1]
    assert math.isnan([r for r in rows if r.get("step") == 4][0]["loss"])  # no good step in that window
    assert math.isfinite([r for r in rows if r.get("step") == 5][0]["loss"])
    states = torch.load(run / "checkpoints" / "global_step5" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["global_steps"] == 5 and states["global_samples"] == 5 * 2 * accum


# ----------------------------------------------------------------------------------------------- slow, multi-process


def _two_rank_args(s, out, steps, *extra) -> list:
    """2 ranks, expert parallel 2, ZeRO 2, a checkpoint every step; `--peak_tflops 1`: no test here reads MFU, so
    rank 0 skips its CPU matmul probe (~0.5 s per run)."""
    return [*_args(s, out, "--max_steps", steps, "--save_interval", 1, "--eval_interval", steps, "--ep_size", 2,
                   "--peak_tflops", 1, *extra, ds=s["root"] / "zero2.json")]


def _events_per_save(log: Path, saves: int) -> dict:
    """Save events per rank and checkpoint, from a fault-free run's event log."""
    counts = {0: 0, 1: 0}
    for line in log.read_text().splitlines():
        counts[int(line.split()[0])] += 1
    return {r: c // saves for r, c in counts.items()}


@pytest.mark.slow
def test_sigkill_at_random_moments_of_checkpoint_saves(setup, tmp_path):
    """2 ranks (expert parallel 2, ZeRO 2), a checkpoint every step. One rank is SIGKILLed during a save at 20
    seeded random moments (before a file, in the middle of one, before a hash, before a rename) and at the
    three renames that publish a checkpoint (manifest, zero_to_fp32.py, `latest`), each time restarting with
    --resume. After every kill `latest` names a checkpoint that verifies, and the finished run's losses are
    those of the uninterrupted run."""
    tiny_ds_config(setup["root"] / "zero2.json", stage=2)
    steps, seed = 30, 2015
    reference, run, log = tmp_path / "reference", tmp_path / "run", tmp_path / "events.log"
    assert all(code == 0 for code, *_ in distributed.ranks(FAULTY, *_two_rank_args(setup, reference, steps),
                                                           extra_env={"CAMEX_FAULT_LOG": str(log)}))
    per_save = _events_per_save(log, steps)  # rank 0: 7 files written (2 events each), 7 hashed, 3 renames
    assert per_save[0] > 10 and per_save[1] > 5, per_save
    rng = random.Random(seed)
    moments = [(r, rng.randint(1, 2 * per_save[r])) for r in (rng.randrange(2) for _ in range(20))]
    for i, last in enumerate((3, 2, 1)):  # the renames: the last three events of rank 0's first save
        moments.insert(5 * (i + 1), (0, per_save[0] + 1 - last))
    started = time.perf_counter()
    for rank, event in moments:
        # killed before its first checkpoint, the run left metrics and a partial folder: start it afresh
        resume = ["--resume"] if (run / "checkpoints" / "latest").is_file() else ["--overwrite_output_dir"]
        results = distributed.ranks(FAULTY, *_two_rank_args(setup, run, steps, *resume),
                                    extra_env={"CAMEX_FAULT": f"{rank}:KILL:save:{event}"})
        assert results[rank][0] == -signal.SIGKILL, (rank, event, results[rank][1][-2000:])
        ckpt = run / "checkpoints"
        latest = (ckpt / "latest").read_text() if (ckpt / "latest").is_file() else None
        assert latest is None or manifest.verify(ckpt / latest) is None, (rank, event, latest)
    results = distributed.ranks(FAULTY, *_two_rank_args(setup, run, steps, "--resume"))
    assert all(code == 0 for code, *_ in results), [(code, out[-1500:]) for code, out, _ in results]
    elapsed = time.perf_counter() - started
    expected, losses = _losses(reference), _losses(run)
    assert sorted(losses) == list(range(1, steps + 1))
    worst = max(abs(losses[step] - expected[step]) / abs(expected[step]) for step in losses)
    assert worst <= 1e-6, worst
    _nothing_lost(run, f"global_step{steps}", setup)
    print(f"sigkill during saves: {len(moments)} kills (rank, event) {moments}, {elapsed:.0f} s; events per save "
          f"{per_save}; largest relative loss difference {worst:.1e}")


def _launcher_with_fault(args, fault: str, log: Path, num_gpus=2):
    """The real DeepSpeed launcher on the fault-injecting launcher; `(returncode, output, seconds from the
    fault to the launcher's exit)`."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
           str(distributed.free_port()), "--module", FAULTY, *map(str, args)]
    proc = subprocess.run(cmd, cwd=distributed.ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(distributed.env(), CAMEX_FAULT=fault, CAMEX_FAULT_LOG=str(log)))
    ended = time.time()
    fired = [float(line.split()[-1]) for line in log.read_text().splitlines() if " fired " in line]
    assert fired, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, proc.stdout + proc.stderr, ended - fired[0]


@pytest.mark.slow
@pytest.mark.parametrize("fault, launcher", [("1:KILL:step:3", "deepspeed"), ("1:STOP:save:30", "deepspeed"),
                                             ("1:STOP:step:3", "ranks"), ("1:KILL:save:30", "ranks")])
def test_a_lost_rank_ends_the_job_in_bounded_time_naming_it(setup, tmp_path, fault, launcher):
    """A rank SIGKILLed or SIGSTOPped mid-step or mid-save: the job exits non-zero, the surviving rank says in
    one line which rank is dead or stopped, within --dist_timeout (5 s) plus, under DeepSpeed's launcher, its
    30 s grace before it SIGKILLs a stopped process; the previous checkpoint is intact."""
    tiny_ds_config(setup["root"] / "zero2.json", stage=2)
    run, log = tmp_path / "run", tmp_path / "events.log"
    args = [*_two_rank_args(setup, run, 8), "--dist_timeout", 5]
    if launcher == "deepspeed":
        code, output, seconds = _launcher_with_fault(args, fault, log)
    else:  # rank 0's own exit, without a launcher's help
        started = time.time()
        code, output, ended = distributed.ranks(FAULTY, *args, extra_env={"CAMEX_FAULT": fault,
                                                                          "CAMEX_FAULT_LOG": str(log)},
                                                timeout=120, watch=0)[0]
        fired = [float(line.split()[-1]) for line in log.read_text().splitlines() if " fired " in line]
        seconds = started + ended - fired[0]
    state = "dead" if ":KILL:" in fault else "stopped"
    lines = [line for line in output.splitlines() if line.startswith("error: rank 0 of 2: a collective failed")]
    assert code != 0 and len(lines) == 1 and "rank 1 (pid " in lines[0] and f") is {state}" in lines[0], \
        output[-4000:]
    assert seconds < (45 if launcher == "deepspeed" else 20), seconds
    ckpt = run / "checkpoints"
    _nothing_lost(run, (ckpt / "latest").read_text(), setup)  # each fault comes after the step-1 checkpoint
    print(f"{fault} under {launcher}: exit {code} after {seconds:.1f} s: {lines[0]}")


@pytest.mark.slow
def test_plain_text_and_val_data_through_launcher_compare_methods_and_evaluate(setup, tmp_path):
    """The issue's new-user path: a train.txt and a valid.txt, 2 ranks under DeepSpeed's launcher (expert
    parallel 2, ZeRO 2); DeepSpeed's habit `python checkpoints/zero_to_fp32.py checkpoints/ out/`;
    compare_methods and evaluate with --val_data."""
    tiny_ds_config(setup["root"] / "zero2.json", stage=2)
    run = tmp_path / "run"
    args = [*_two_rank_args(setup, run, 4, "--val_data", setup["valid"]), "--eval_batches", 4]
    distributed.deepspeed(LAUNCHER, *args)
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["step"] == 4 and math.isfinite(final["val_loss"])
    assert manifest.verify(run / "checkpoints" / "global_step4") is None

    proc = subprocess.run([sys.executable, "checkpoints/zero_to_fp32.py", "checkpoints/", "out/"], cwd=run,
                          env=distributed.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(run / "out" / "pytorch_model.bin", weights_only=True)
    model = tmp_path / "model"
    # the tools' commands in this process (tests/unit/ckpt/test_convert.py runs each real script once)
    run_checked("convert", "consolidate", "--checkpoint", run, "--output", model)
    from camex_ds.ckpt.format import read_weights

    consolidated = read_weights(model)
    assert weights.keys() == consolidated.keys() and all(torch.equal(weights[k], consolidated[k]) for k in weights)

    proc = run_checked("evaluate", "--model", model, "--val_data", setup["valid"], "--cache_dir", setup["cache"],
                       "--batch_size", 2, "--max_batches", 4)
    evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(evaluated["val_loss"] - final["val_loss"]) <= 1e-4 * final["val_loss"], (evaluated, final)

    out = tmp_path / "compare"
    run_checked("compare", "--data", setup["train"], "--val_data", setup["valid"], "--methods", "camex", "--seeds", 1,
                "--max_steps", 2, "--eval_interval", 2, "--model_config", setup["model"], "--deepspeed_config",
                setup["ds"], "--output", out, "--no_progress", "--bootstrap_resamples", 10, "--", "--vocab_size", 512,
                "--cache_dir", setup["cache"], "--eval_batches", 2, "--peak_tflops", 1)
    result = json.loads((out / "results.json").read_text())["methods"]["camex"]["seeds"]["0"]
    assert result["step"] == 2 and math.isfinite(result["val_loss"])
    assert "--val_data" in (out / "runs" / "camex" / "seed0" / "log.txt").read_text()
