"""Run a grid's launcher processes one after another and watch them: each run in its own process group with
its output appended to the run's `log.txt`, its step read from `metrics.jsonl` (or the log) for the progress
bar, and it and its children stopped on failure or Ctrl-C. A failed run prints its command and log tail."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from tqdm import tqdm

from .grid import (Grid, check_spec, config_path, grid_meta, has_checkpoint, launcher_command, reference_variant,
                   resolve_flops_budget, run_path, run_spec, seeds_of_variant)
from .results import write_json
from .upcycled import ensure_upcycled

LOG_TAIL_LINES = 40
_STEP_RE = re.compile(r"\bstep\b\s*[=:]?\s*(\d+)", re.IGNORECASE)


class StepWatcher:
    """Latest training step of a running job: from metrics.jsonl, else from its log."""

    def __init__(self, metrics: Path, log: Path, log_offset: int):
        self.metrics, self.log = metrics, log
        self.m_off, self.l_off = 0, log_offset
        self.m_buf, self.l_buf = "", ""
        self.m_step: Optional[int] = None
        self.l_step: Optional[int] = None

    @staticmethod
    def _read(path: Path, off: int) -> Tuple[str, int]:
        try:
            with open(path, "rb") as fh:
                fh.seek(off)
                data = fh.read()
        except OSError:
            return "", off
        return data.decode("utf-8", errors="replace"), off + len(data)

    def poll(self) -> Optional[int]:
        text, self.m_off = self._read(self.metrics, self.m_off)
        if text:
            self.m_buf += text
            *lines, self.m_buf = self.m_buf.split("\n")
            for line in lines:
                try:
                    row = json.loads(line)
                    self.m_step = int(row["step"])
                except (ValueError, KeyError, TypeError):
                    continue
        if self.m_step is None:
            text, self.l_off = self._read(self.log, self.l_off)
            if text:
                self.l_buf = (self.l_buf + text)[-4096:]
                found = _STEP_RE.findall(self.l_buf)
                if found:
                    self.l_step = int(found[-1])
        return self.m_step if self.m_step is not None else self.l_step


def log_tail(path: Path, n: int) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return list(deque(fh, maxlen=n))
    except OSError:
        return []


def kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the subprocess we started and its children (own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def execute(cmd: List[str], rd: Path, log: Path, on_step: Callable[[Optional[int]], None],
             poll_interval: float) -> int:
    """Run `cmd` in its own process group, from this process's working directory (the grid passes its paths
    absolute; the trainer is the installed package's), its output appended to `log`, telling `on_step` the run's
    latest step every `poll_interval` seconds; its exit code. Interrupted, it stops the group."""
    rd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "a", encoding="utf-8") as fh:
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        fh.write(f"\n===== {stamp} cwd={os.getcwd()}\n===== {shlex.join(cmd)}\n")
        fh.flush()
        offset = fh.tell()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        watcher = StepWatcher(rd / "metrics.jsonl", log, offset)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_interval)
                    break
                except subprocess.TimeoutExpired:
                    on_step(watcher.poll())
        except BaseException:
            kill_group(proc)
            raise
    on_step(watcher.poll())
    return rc


def fmt_num(x) -> str:
    """A metric for the progress line: 4 decimals, or n/a."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def prepare_inits(grid: Grid, err, dry_run: bool = False) -> None:
    """Upcycle the dense model into every variant's starting model that is not there yet (a fine-tuning grid),
    from the variant's model config as written to `config_path`."""
    if grid.init_from is None:
        return
    for name, variant in grid.variants.items():
        target = grid.inits[name]
        if variant.method == "dense" or target.is_dir():
            continue
        if dry_run:
            print(f"# upcycle {grid.init_from} with {config_path(grid, name)} into {target}", file=err)
            continue
        t0 = time.time()
        write_json(config_path(grid, name), grid.configs[name])
        ensure_upcycled(grid.init_from, config_path(grid, name), target, grid.upcycle_seed)
        print(f"upcycled {name} into {target} in {time.time() - t0:.1f}s", file=err, flush=True)


def run_grid(grid: Grid, prog: str, progress: bool = True, dry_run: bool = False,
             flops_fn: Optional[Callable] = None, poll_interval: float = 1.0, out=None, err=None) -> int:
    """Train every unfinished run of ``grid``; returns 0, or 1 when a run failed (reported as `prog`'s)."""
    out = out or sys.stdout
    err = err or sys.stderr
    order = list(grid.variants)
    if grid.budget == "flops":
        order.remove(reference_variant(grid))
        order.insert(0, reference_variant(grid))
    runs = [(m, s) for m in order for s in seeds_of_variant(grid, m)]
    resolve_flops_budget(grid, flops_fn)

    for m in grid.variants:
        write_json(config_path(grid, m), grid.configs[m])
    # fail fast on settings clashes of runs whose max_steps is already known
    for m, s in runs:
        if grid.method_steps[m] is not None:
            check_spec(run_path(grid, m, s), run_spec(grid, m, s), f"{m}/seed{s}")
    write_json(grid.output / "grid.json", grid_meta(grid))
    prepare_inits(grid, out if dry_run else err, dry_run)

    if dry_run:
        for m, s in runs:
            rp = run_path(grid, m, s)
            if (rp / "final_metrics.json").exists():
                print(f"# {m}/seed{s}: finished, skipped", file=out)
            elif grid.method_steps[m] is None:
                print(f"# {m}/seed{s}: max_steps is set by the FLOPs budget once {grid.reference} has run", file=out)
            else:
                print(shlex.join(launcher_command(grid, m, s, has_checkpoint(rp))), file=out)
        return 0

    n_done = sum((run_path(grid, m, s) / "final_metrics.json").exists() for m, s in runs)
    interactive = bool(getattr(err, "isatty", lambda: False)())
    bar = tqdm(total=len(runs), initial=n_done, unit="run", dynamic_ncols=True, disable=not progress,
               smoothing=0.1, file=err, mininterval=0.5 if interactive else 30.0,
               bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total} runs "
                          "[{elapsed}<{remaining}{postfix}]")
    bar.set_description_str("grid ")
    try:
        for m, s in runs:
            rp = run_path(grid, m, s)
            label = f"{m}/seed{s}"
            if (rp / "final_metrics.json").exists():
                continue
            spec = run_spec(grid, m, s)
            check_spec(rp, spec, label)
            rp.mkdir(parents=True, exist_ok=True)
            resume = has_checkpoint(rp)
            if not resume and (rp / "metrics.jsonl").exists():
                os.replace(rp / "metrics.jsonl", rp / "metrics.jsonl.prev")
            write_json(rp / "run_spec.json", spec)
            cmd = launcher_command(grid, m, s, resume)
            max_steps = grid.method_steps[m]
            state = {"frac": 0.0}

            def on_step(step: Optional[int], _label=label, _max=max_steps, _state=state, _resume=resume) -> None:
                txt = f"{_label}{' (resumed)' if _resume else ''} step {step if step is not None else '?'}/{_max}"
                if txt != _state.get("txt"):
                    bar.set_postfix_str(txt, refresh=False)
                    _state["txt"] = txt
                delta = 0.0
                if step is not None and _max:
                    frac = min(max(step / _max, 0.0), 0.999)
                    if frac > _state["frac"]:
                        delta = frac - _state["frac"]
                        _state["frac"] = frac
                bar.update(delta)  # redraws at most every `mininterval` seconds

            on_step(None)
            t0 = time.time()
            rc = execute(cmd, rp, rp / "log.txt", on_step, poll_interval)
            final = rp / "final_metrics.json"
            if rc != 0 or not final.exists():
                bar.close()
                why = f"exit code {rc}" if rc != 0 else "exit code 0 but no final_metrics.json was written"
                tail = log_tail(rp / "log.txt", LOG_TAIL_LINES)
                msg = [
                    f"{prog}: run {label} failed ({why}).",
                    f"command: {shlex.join(cmd)}",
                    f"working directory: {os.getcwd()}",
                    f"log: {rp / 'log.txt'}",
                    f"--- last {len(tail)} lines of the log ---",
                    "".join(tail).rstrip("\n"),
                    "--- end of log ---",
                    "Finished runs are kept; rerun the same command to resume the grid.",
                ]
                print("\n".join(msg), file=err)
                return 1
            n_done += 1
            bar.update(n_done - bar.n)  # land exactly on an integer (no float drift)
            try:
                fm = json.loads(final.read_text())
            except ValueError:
                fm = {}
            bar.write(f"finished {label}: val_bpb={fmt_num(fm.get('val_bpb'))} "
                      f"val_loss={fmt_num(fm.get('val_loss'))} in {time.time() - t0:.0f}s", file=err)
        resolve_flops_budget(grid, flops_fn)
    finally:
        bar.close()
    write_json(grid.output / "grid.json", grid_meta(grid))
    return 0
