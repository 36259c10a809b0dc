"""Process-group set-up: under a DeepSpeed launcher, or as a single local rank for plain `python`."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that is free now (for a local master address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from .config import DEFAULT_TIMEOUT_S


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise `torch.distributed` through DeepSpeed (gloo on CPU, nccl on CUDA).

    Without a launcher's environment, becomes rank 0 of a world of one, so DeepSpeed's MoE layers,
    `deepspeed.initialize` and checkpointing work the same in a plain `python` process. A collective that
    waits longer than `timeout_s` for a peer raises instead of hanging, so one lost rank ends the job.
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "gloo":
        _unlink_shm_workspace()


def _unlink_shm_workspace() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce workspace from /dev/shm.

    DeepSpeed's shared-memory all-reduce (CPU accelerator) creates a ~70 MB /dev/shm file per rank and master
    port and never unlinks it. Repeated CPU runs, each on a fresh port, therefore fill /dev/shm, which is RAM,
    until the OOM killer stops a run. During `init_distributed` every local rank maps all its peers'
    workspaces. After the barrier the names are no longer needed, and the mappings outlive the unlink, so
    nothing is left behind even if the run is killed.
    """
    barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown() -> None:
    """Tear the process group down. A rank that exits with it still alive can abort in gloo's or NCCL's
    destructors (`terminate called without an active exception`), turning a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean of each value over all ranks (float64 on CPU, small)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / world_size()).tolist()
