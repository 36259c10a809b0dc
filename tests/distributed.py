"""Helpers for tests that start real multi-process DeepSpeed jobs (2 CPU ranks, gloo)."""
import os
import subprocess
import sys
from pathlib import Path

from camex_ds.parallel import free_port

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        e.pop(k, None)
    return e


def run(cmd, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def deepspeed(script, *args, num_gpus=2, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return run(launcher + ["--num_gpus", str(num_gpus), "--master_port", str(free_port()), str(script), *map(str, args)],
               **kw)


def python(script, *args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, str(script), *map(str, args)], **kw)
