"""Issue 15: fuzzed launcher inputs (tests/fuzz_inputs.py). Every case trains its step, or exits 2 with one
`error:` line and no traceback.

The cases run through `launcher/pretrain.py`'s `main(argv)` in this process (a new interpreter per case
would cost ~5 s); a few also run as real command lines, which must end the same way.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests import distributed
from tests.fuzz_inputs import cases
from tests.launch import LAUNCHER, error_lines, launch

SEED, N_CASES = 15, 320


def _argv(case, folder, train_txt):
    folder.mkdir()
    paths = {"MISSING": str(folder / "missing.txt"), "VALID_TEXT": str(train_txt)}
    (folder / "model.json").write_text(json.dumps(case.model))
    (folder / "ds.json").write_text(json.dumps(case.deepspeed))
    argv = ["--model_config", folder / "model.json", "--deepspeed_config", folder / "ds.json", "--data", train_txt,
            "--vocab_size", 512, "--cache_dir", folder.parent / "cache", "--output_dir", folder / "out", "--no_progress"]
    for flag, value in case.flags.items():
        argv += [flag] if value is None else [flag, paths.get(value, value) if isinstance(value, str) else value]
    return [str(a) for a in argv]


def _outcome(code, err) -> str:
    """'trained', 'error' (exit 2, one error line, no traceback), or what went wrong."""
    lines = error_lines(err)
    if code == 0:
        return "trained"
    if code == 2 and len(lines) == 1 and "Traceback" not in err:
        return "error"
    return f"exit {code}, {len(lines)} error lines: {err.strip()[-600:]}"


def test_fuzzed_inputs_train_or_fail_in_one_line(tmp_path, text_files):
    outcomes, problems, started = Counter(), [], time.perf_counter()
    for i, case in enumerate(cases(SEED, N_CASES)):
        folder = tmp_path / f"case{i}"
        argv = _argv(case, folder, text_files[0])
        try:
            code, err, _ = launch(argv)
        except Exception as e:  # escaped main(): a traceback for the user
            problems.append(f"{case.name}: traceback {type(e).__name__}: {e}")
            continue
        outcome = _outcome(code, err)
        if outcome == "trained" and not (folder / "out" / "metrics.jsonl").is_file():
            outcome = "exit 0 without training"
        outcomes[outcome if outcome in ("trained", "error") else "bad"] += 1
        if outcome not in ("trained", "error"):
            problems.append(f"{case.name}: {outcome}")
        shutil.rmtree(folder)
    seconds = time.perf_counter() - started
    print(f"fuzz: {N_CASES} cases in {seconds:.1f} s: {dict(outcomes)}")
    assert not problems, "\n".join(problems[:15])
    assert outcomes["trained"] >= N_CASES // 5 and outcomes["error"] >= N_CASES // 3, outcomes


@pytest.mark.slow
def test_fuzzed_cases_end_the_same_on_the_command_line(tmp_path, text_files):
    """Real subprocesses, one case of each ending (trained, our error, argparse's): the same exit code and line."""
    picked = {}
    for i, case in enumerate(cases(SEED, 60)):
        folder = tmp_path / f"in{i}"
        code, err, _ = launch(_argv(case, folder, text_files[0]))
        kind = "trained" if code == 0 else ("argparse" if ": error:" in err else "error")
        picked.setdefault(kind, (case, code, [line.replace(str(folder), "CASE") for line in error_lines(err)]))
    assert set(picked) == {"trained", "error", "argparse"}, picked.keys()
    for kind, (case, code, lines) in picked.items():
        folder = tmp_path / f"sub_{kind}"
        argv = _argv(case, folder, text_files[0])
        proc = subprocess.run([sys.executable, str(LAUNCHER), *argv], cwd=distributed.ROOT, env=distributed.env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code and "Traceback" not in proc.stderr, (case.name, proc.stderr[-2000:])
        assert [line.replace(str(folder), "CASE") for line in error_lines(proc.stderr)] == lines, case.name
