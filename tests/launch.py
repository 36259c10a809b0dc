"""Helpers for the robustness tests: the launcher run inside the test process (their text, the standard
library's docstrings, comes from `camex_ds.data.prose`).

`launch(argv)` runs `launcher/pretrain.py`'s `main(argv)` (camex_ds.cli.pretrain) in this process and returns
its exit code and what it printed: a job costs ~0.5 s instead of a new interpreter's ~5 s, which is what makes
hundreds of runs affordable. `run_main(name, argv)` does the same for any `camex_ds.cli` command (the tools'
and the launcher's tests call the real scripts once each, e.g. with `--help`). The process environment and
signal handlers are left as they were. `write_json` and `tiny_ds_config` write the configs such runs take.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launcher" / "pretrain.py"
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32,
        "moe": {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 16}}
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def write_json(path: Path, obj) -> Path:
    """`obj` written to `path` as JSON (a run's model or DeepSpeed config); returns `path`."""
    path.write_text(json.dumps(obj))
    return path


def tiny_ds_config(path: Path, stage=0, accum=1, micro=2) -> Path:
    """The DeepSpeed config of the tiny in-process runs, written to `path`: AdamW, ZeRO `stage`, no scheduler, fp32,
    no TensorBoard."""
    return write_json(path, {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                             "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                             "bf16": {"enabled": False},
                             "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
                             "tensorboard": {"enabled": False}})


def run_main(name: str, argv, threads: Optional[int] = 1) -> subprocess.CompletedProcess:
    """`camex_ds.cli.NAME`'s `main(ARGV)` (what `tools/*.py`, `launcher/pretrain.py` and the `camex-*` commands run)
    in this process, as a `CompletedProcess` with its exit code (`main`'s return value or `SystemExit`'s code, e.g.
    argparse's 2) and what it printed to stdout and stderr. A run saves a new interpreter's ~3.5 s of torch and
    DeepSpeed import. It runs with `threads` torch intra-op threads (restored afterwards; None: this process's),
    1 by default as the real processes it replaces (`distributed.env()`'s OMP_NUM_THREADS=1): on a shared
    2-core box a second spinning thread makes tiny runs slower. Still, compare it with a real process to a
    tolerance, and bit for bit only with another run in this process. The distributed variables a world of one
    fills in are restored afterwards; the rest of the environment and the signal handlers are left as they
    were."""
    module = importlib.import_module(f"camex_ds.cli.{name}")
    argv = [str(a) for a in argv]
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = module.main(argv)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        torch.set_num_threads(saved_threads)
        for k, v in saved.items():  # init_distributed fills these in for a world of one
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    code = 0 if code is None else code
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())


def run_checked(name: str, *argv) -> subprocess.CompletedProcess:
    """`run_main(name, argv)`, which must exit 0 (else an AssertionError with what it printed)."""
    proc = run_main(name, argv)
    if proc.returncode != 0:
        raise AssertionError(f"camex_ds.cli.{name} failed ({proc.returncode}): {' '.join(proc.args[1:])}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def launch(argv) -> tuple[int, str, str]:
    """`(exit code, stderr, stdout)` of `launcher/pretrain.py ARGV`, run in this process (`run_main`) with its
    torch threads as they are (the robustness tests' runs, measured and compared that way)."""
    proc = run_main("pretrain", argv, threads=None)
    return proc.returncode, proc.stderr, proc.stdout


def error_lines(stderr: str) -> list:
    """The lines of a run's stderr that report an error (ours start `error:`, argparse's `PROG: error:`)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line]


def one_error(result, code: int, *needles: str) -> str:
    """`launch`'s `result` failed with `code` and one error line containing every needle, and no traceback."""
    got, err, _ = result
    lines = error_lines(err)
    assert got == code and len(lines) == 1 and "Traceback" not in err, (got, err[-3000:])
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]
