"""Naming the rank that failed when a collective fails.

A rank that dies (SIGKILL, the OOM killer) or stops (SIGSTOP) cannot say so; its peers only see a
collective that breaks (connection reset) or times out (`--dist_timeout`). `record()` gathers every rank's
host and pid at start-up, so that `describe()` can tell which ranks on this host are dead or stopped.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from .. import parallel

_peers: list = []  # (host, pid) of every rank, in rank order


def record() -> None:
    """Every rank calls this once its process group (and, on GPUs, its device) is set up."""
    global _peers
    _peers = parallel.all_gather_object((socket.gethostname(), os.getpid()))


def is_communication_error(e: BaseException) -> bool:
    """A failed or timed-out collective (gloo reports them as plain RuntimeErrors)."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def describe(e: BaseException) -> str:
    """One line: which rank saw the failure, what failed, and which peers on this host are dead or stopped."""
    host, rank = socket.gethostname(), parallel.rank()
    lost = [f"rank {r} (pid {pid}) is {state}" for r, (peer_host, pid) in enumerate(_peers)
            if r != rank and peer_host == host and (state := process_state(pid)) is not None]
    who = "; ".join(lost) or "a peer rank is gone or hung (on another host, or already cleaned up)"
    detail = (str(e).strip().splitlines() or [type(e).__name__])[-1].rsplit("] ", 1)[-1].split(". ")[0]
    return f"rank {rank} of {len(_peers) or parallel.world_size()}: a collective failed ({detail}): {who}"


def process_state(pid: int) -> Optional[str]:
    """'dead', 'stopped', or None for a process of this host that runs (or cannot be inspected)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): alive is all we know
        return None
    code = stat.rsplit(")", 1)[-1].split()[0]  # the field after the command name, which may hold spaces
    return {"Z": "dead", "X": "dead", "T": "stopped", "t": "stopped"}.get(code)
