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


# How long a collective (or the set-up's rendezvous) waits for a peer before failing. torch's default is
# 30 minutes: a rank that died or stopped would hold every other rank, and the job's GPUs, that long.
DEFAULT_TIMEOUT_S = 300.0


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise `torch.distributed` through DeepSpeed (gloo on CPU, nccl on CUDA).

    Without a launcher's environment, becomes rank 0 of a world of one, so DeepSpeed's MoE layers,
    `deepspeed.initialize` and checkpointing work the same in a plain `python` process. A collective that
    waits longer than `timeout_s` for a peer raises instead of hanging, so one lost rank ends the job.
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    _forget_deepspeed_groups()  # of an earlier process group in this process, if any
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups made later without a timeout (DeepSpeed's expert and expert-data-parallel groups) take torch's
    # default, 30 minutes, not the world group's: make the default ours, or a stopped rank holds them that long.
    dist.distributed_c10d.default_pg_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
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


_retired: list = []  # DeepSpeed's groups of destroyed process groups, kept referenced (see below)


def _forget_deepspeed_groups() -> None:
    """Start DeepSpeed's group registries empty.

    DeepSpeed keeps the groups it made (expert, expert-data, world) in module globals. Once a process group
    is destroyed they name dead groups, which a second job in the same process (a notebook, the in-process
    fuzz test) would be handed. The old groups stay referenced here: freeing them can abort the process in
    gloo's destructors (3 of 10 two-rank runs, when done right after `destroy_process_group`).
    """
    from deepspeed.utils import groups

    registries = ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                  "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP")
    singletons = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP")
    _retired.append([getattr(groups, name) for name in registries + singletons])
    for name in registries:
        setattr(groups, name, {})
    for name in singletons:
        setattr(groups, name, None)


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


def all_gather_object(obj) -> list:
    """`obj` from every rank, in rank order (pickled: for small things). On GPUs call it after
    `deepspeed.initialize`, which sets each rank's device (NCCL gathers through it)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
