"""Helpers for tests that start real multi-process DeepSpeed jobs (2 CPU ranks, gloo).

A program is a script file (a `Path`, e.g. launcher/pretrain.py) or a module name run from the repository root
(a dotted `str`, e.g. `tests.dist.ep_step`)."""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from camex_ds.parallel import free_port

ROOT = Path(__file__).resolve().parent.parent


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        e.pop(k, None)
    return e


def program(target) -> list:
    """The arguments after `python` (or DeepSpeed's launcher, whose flag is `--module`) that start `target`."""
    return ["-m", target] if isinstance(target, str) and not target.endswith(".py") else [str(target)]


def run(cmd, timeout=600, check=True, extra_env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(env(), **(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc


def deepspeed(script, *args, num_gpus=2, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
                str(free_port())]
    start = ["--module", script] if program(script)[0] == "-m" else [str(script)]
    return run(launcher + start + list(map(str, args)), **kw)


def python(script, *args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, *program(script), *map(str, args)], **kw)


def ranks(script, *args, world=2, extra_env=None, timeout=300, watch=None) -> list:
    """Run `script` as `world` rank processes of one job on this host, as a launcher would start them, but
    without one (no launcher start-up): when a rank fails, the others are killed, as DeepSpeed's launcher does;
    with `watch=R` (or a tuple of ranks), only once rank R (each of them) has ended by itself. Returns
    `(returncode, stdout + stderr, seconds to its end)` per rank."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world):
        e = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(extra_env or {}))
        logs.append(tempfile.TemporaryFile(mode="w+"))
        procs.append(subprocess.Popen([sys.executable, *program(script), *map(str, args)], cwd=ROOT, env=e,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    started = time.monotonic()
    ended = [None] * world

    def done() -> bool:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - started
        if watch is not None:
            return all(procs[r].returncode is not None for r in ((watch,) if isinstance(watch, int) else watch))
        return all(p.returncode is not None for p in procs) or any(p.returncode not in (None, 0) for p in procs)

    try:
        while not done() and time.monotonic() - started < timeout:
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        out.append((p.returncode, log.read(), ended[i] if ended[i] is not None else time.monotonic() - started))
        log.close()
    return out


def ranks_ok(script, *args, timeout=600, **kw) -> list:
    """`ranks(script, *args, **kw)`, every rank of which must exit 0 (else an AssertionError with their output's
    ends): for jobs whose tests are not about DeepSpeed's launcher, which `deepspeed(...)` would add ~5 s to.
    The time limit is `deepspeed(...)`'s (`run`'s), for the jobs that move here from it."""
    results = ranks(script, *args, timeout=timeout, **kw)
    if any(code != 0 for code, _, _ in results):
        raise AssertionError(f"job failed ({[code for code, _, _ in results]}): {script} {' '.join(map(str, args))}\n"
                             + "\n".join(f"--- rank {r} ---\n{log[-4000:]}" for r, (_, log, _) in enumerate(results)))
    return results
