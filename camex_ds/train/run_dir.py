"""One run per output folder: the folder's lock, the check for an earlier run's files, moving an earlier run aside
(`--overwrite_output_dir`), and, on `--resume`, the check that the checkpoints there belong to one run (each
manifest's run record carries a run id, made at a fresh start and kept across resumes).

Two runs writing one folder at once (a double submission, a requeued job whose first copy still runs) interleave
their metrics and overwrite each other's checkpoints; a fresh run into a used folder truncates the earlier run's
metrics and replaces its checkpoints. Each is refused in one line, exit 2, before any rank writes to the folder
(but for `configs.check_writable`'s probe file), so the earlier run's files stay byte for byte as they were.

The lock is `OUTPUT_DIR/run.lock`: the holder's host, pid and start time, made by hard-linking a complete
temporary file to that name. A link is created atomically on NFS and other storage shared by several nodes,
where fcntl/flock locks are not reliable, and nobody ever reads a half-written lock. A lock whose process is
gone (this host; its pid not running, or now another process, or the host restarted) is taken over with a
warning; one from another host never is, since this host cannot see that process: the message says how to
remove it.

Who checks, and when: `configs.validate` runs on every rank before any process group exists, so it cannot tell
the ranks of one job from another job's. The lock is therefore taken by global rank 0 alone, right after
`init_distributed` and before anything else happens in the folder (DeepSpeed's TensorBoard writer, the configs,
metrics, checkpoints); rank 0's verdict (and a fresh run id) reaches every rank through one collective, so that
every rank fails alike, with the same line.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Iterator, Optional

from .. import parallel
from ..config import ConfigError
from ..run_args import TrainArgs
from . import checkpoint, manifest
from .checkpoint import CheckpointError
from .peers import process_state

LOCK = "run.lock"
RUN_ID = "run_id"  # the key of a manifest's run record naming its run: made at a fresh start, kept across resumes
# What a run writes into its folder (README: What a run writes): what --overwrite_output_dir moves aside
RUN_FILES = ("metrics.jsonl", "final_metrics.json", "checkpoints", "tensorboard", "model_config.json",
             "train_args.json", "deepspeed_config.json")
NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)  # storage without hard links


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """When `pid` started (clock ticks since boot), which tells a reused pid apart; None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _listed(names: list, most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _create(path: Path, text: str) -> bool:
    """Make `path` hold `text` unless it exists (False), atomically, also on NFS."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except OSError as e:
        if tmp.stat().st_nlink == 2:  # linked after all: NFS answered a resent request whose first reply was lost
            return True
        if e.errno not in NO_LINKS:
            if isinstance(e, FileExistsError):
                return False
            raise
        try:
            with open(path, "x") as f:  # O_CREAT | O_EXCL, atomic on NFSv3 and later
                f.write(text)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _gone(holder: dict) -> Optional[str]:
    """Why the process of a lock taken on this host is gone, or None when it may still run."""
    pid = holder["pid"]
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return "this host has restarted since"
    if process_state(pid) == "dead":
        return f"pid {pid} is not running"
    start = holder.get("process_start")
    if start is not None and _process_start(pid) not in (None, start):
        return f"pid {pid} is now another process"
    return None


class Lock:
    """`OUTPUT_DIR/run.lock`, held by this process from `take` to `release`."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    @classmethod
    def take(cls, out_dir: Path) -> "Lock":
        """Lock `out_dir`; raises ConfigError naming the holder if another run holds it."""
        path = Path(out_dir) / LOCK
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "boot_id": _boot_id(), "process_start": _process_start(os.getpid())}
        text = json.dumps(me)
        taken_over = None
        for _ in range(3):  # a lock released or taken over between our create and our read: try again
            if _create(path, text):
                if taken_over:
                    print(f"warning: took over the lock '{path}' of an earlier run that is gone ({taken_over})",
                          file=sys.stderr, flush=True)
                return cls(path, text)
            try:
                held = path.read_text()
            except FileNotFoundError:
                continue
            holder = cls._holder(path, held)
            if holder["host"] != me["host"]:
                raise ConfigError(f"--output_dir '{out_dir}' is in use by another run ({_describe(holder)}): use "
                                  f"another --output_dir, or, if that run has ended (this host cannot see it), "
                                  f"remove '{path}' and start again")
            why = _gone(holder)
            if why is None:
                raise ConfigError(f"--output_dir '{out_dir}' is in use by another run ({_describe(holder)}): wait "
                                  "for it to end, or use another --output_dir")
            cls._take_over(path, held)
            taken_over = f"{_describe(holder)}: {why}"
        raise ConfigError(f"--output_dir '{out_dir}': other runs keep taking its lock '{path}': use another "
                          "--output_dir")

    @staticmethod
    def _holder(path: Path, text: str) -> dict:
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if not (isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder["pid"] > 0
                and isinstance(holder.get("host"), str)):
            raise ConfigError(f"--output_dir '{path.parent}' is locked by '{path}', which does not say by whom "
                              f"({text[:60]!r}): if no run uses this folder, remove that file and start again")
        return holder

    @staticmethod
    def _take_over(path: Path, stale: str) -> None:
        """Remove a stale lock, unless another run took it over and locked the folder meanwhile."""
        aside = path.with_name(f".{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.rename(path, aside)  # only one of several runs taking over at once moves it
        except FileNotFoundError:
            return
        if aside.read_text() != stale:  # moved a lock taken meanwhile: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        aside.unlink()

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.text:
                self.path.unlink()


def earlier_run(out_dir: Path) -> list:
    """What an earlier run left in `out_dir`: its metrics files and checkpoints, by name."""
    found = [name for name in ("metrics.jsonl", "final_metrics.json") if (out_dir / name).is_file()]
    tags = checkpoint.tags(out_dir / "checkpoints")
    if tags:
        found.append(f"checkpoints {_listed(tags)}")
    elif (out_dir / "checkpoints" / "latest").is_file():
        found.append("checkpoints/latest")
    return found


def move_aside(out_dir: Path) -> Path:
    """Move an earlier run's files into a new `OUTPUT_DIR/replaced-<local time>/`; nothing is deleted."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest, n = out_dir / f"replaced-{stamp}", 1
    while True:  # a second overwrite within the same second gets its own folder
        try:
            dest.mkdir()
            break
        except FileExistsError:
            dest, n = out_dir / f"replaced-{stamp}-{n}", n + 1
    for name in RUN_FILES:
        if os.path.lexists(out_dir / name):
            os.rename(out_dir / name, dest / name)
    return dest


def _claim(args: TrainArgs, out_dir: Path) -> Lock:
    """Rank 0: lock the folder; then, on a resume, check its checkpoints are one run's, else refuse or move
    aside an earlier run's files."""
    lock = Lock.take(out_dir)
    try:
        if args.resume:
            check_one_run(out_dir / "checkpoints")
        elif found := earlier_run(out_dir):
            if not args.overwrite_output_dir:
                raise ConfigError(f"--output_dir '{out_dir}' holds an earlier run ({', '.join(found)}): continue it "
                                  "with --resume, choose another --output_dir, or start afresh with "
                                  "--overwrite_output_dir, which moves its files into OUTPUT_DIR/replaced-<time>/")
            dest = move_aside(out_dir)
            print(f"note: --overwrite_output_dir: moved the earlier run's files ({', '.join(found)}) into '{dest}'",
                  file=sys.stderr, flush=True)
    except BaseException:
        lock.release()
        raise
    return lock


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@contextlib.contextmanager
def claimed(args: TrainArgs) -> Iterator[str]:
    """Every rank, once the process group exists: hold `--output_dir` for the run, however it ends; yields a new
    run id, the same on every rank. Outside the step loop (whose `guard.StopFlag` saves a checkpoint first)
    SIGTERM interrupts like Ctrl-C, so that the lock is released then too."""
    out_dir = Path(args.output_dir)
    lock, failure = None, None
    if parallel.rank() == 0:
        try:
            lock = _claim(args, out_dir)
        except Exception as e:  # reported to the other ranks below, raised here as it is
            failure = e
    problem, run_id = parallel.all_gather_object((failure and str(failure), uuid.uuid4().hex))[0]
    if failure is not None:
        raise failure
    if problem:
        raise ConfigError(problem)
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        yield run_id
    finally:
        signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def _run_id(tag_dir: Path) -> Optional[str]:
    try:
        run = manifest.read(tag_dir).get("run")
    except ValueError:
        return None
    return run.get(RUN_ID) if isinstance(run, dict) else None


def check_one_run(ckpt_dir: Path) -> None:
    """On --resume: raise CheckpointError naming the checkpoints of another run than the newest one's (a checkpoint
    without a run id, saved before there were any, may belong to any run)."""
    ids = [(tag, _run_id(ckpt_dir / tag)) for tag in checkpoint.tags(ckpt_dir)]
    newest = next(((tag, run_id) for tag, run_id in ids if run_id is not None), None)
    foreign = [tag for tag, run_id in ids if newest and run_id not in (None, newest[1])]
    if foreign:
        raise CheckpointError(f"--resume: '{ckpt_dir}' mixes two runs: {newest[0]}'s, the newest, and another "
                              f"run's {_listed(foreign)}: move the checkpoints of the run not to resume out of that "
                              "folder, then resume; or start afresh in another --output_dir")


def continued(recorded: Optional[dict], fresh_id: str) -> tuple:
    """`(run id, run record without it)` of the checkpoint a resume loads: its own id, or `fresh_id` for one saved
    before run ids (the run record is None for one saved before manifests)."""
    if recorded is None:
        return fresh_id, None
    recorded = dict(recorded)
    return recorded.pop(RUN_ID, None) or fresh_id, recorded
