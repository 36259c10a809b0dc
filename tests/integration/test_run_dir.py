"""One run per output folder, against a real two-rank job: both ranks refuse a locked folder in one line, before
either writes anything. The in-process cases and the fixtures used here: tests/unit/train/test_run_dir.py."""
from __future__ import annotations

import os

import pytest

from camex_ds.train import run_dir
from tests import distributed
from tests.launch import LAUNCHER, error_lines
from tests.unit.train.test_run_dir import _args, _copy, _hashes, earlier, setup  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_two_ranks_against_a_locked_folder_both_refuse_naming_the_holder(setup, earlier, tmp_path):
    """A real two-rank job: rank 0 finds the folder locked by a live process (this one) and both ranks exit 2 with
    the same one line, before either wrote anything."""
    run = _copy(earlier, tmp_path / "run")
    lock = run_dir.Lock.take(run)
    try:
        before = _hashes(run)
        results = distributed.ranks(LAUNCHER, *_args(setup, run, "--resume", "--max_steps", 3), watch=(0, 1))
        assert _hashes(run) == before
    finally:
        lock.release()
    lines = [error_lines(output) for _, output, _ in results]
    assert [code for code, *_ in results] == [2, 2] and all(len(found) == 1 for found in lines), \
        [(code, output[-2000:]) for code, output, _ in results]
    assert lines[0] == lines[1] and f"is in use by another run (pid {os.getpid()} on host " in lines[0][0]
    print(lines[0][0].replace(str(run), "RUN"), f"({max(seconds for *_, seconds in results):.1f} s)")
