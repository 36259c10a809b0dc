"""Process-group set-up: under a DeepSpeed launcher, or as a single local rank for plain `python`."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .netif import choose_socket_interface


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
    waits longer than `timeout_s` for a peer raises instead of hanging, so one lost rank ends the job. Across
    machines whose hostname resolves to loopback, gloo/NCCL use the interface that routes to the master.
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    from .deepspeed_adapter import forget_groups

    forget_groups()  # DeepSpeed's groups of an earlier process group in this process, if any
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    choose_socket_interface()  # before the group exists: gloo reads GLOO_SOCKET_IFNAME when it is created
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups made later without a timeout (DeepSpeed's expert and expert-data-parallel groups) take torch's
    # default, 30 minutes, not the world group's: make the default ours, or a stopped rank holds them that long.
    dist.distributed_c10d.default_pg_timeout = timeout
    with _fail_together():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    if backend == "nccl":  # as deepspeed.initialize will: a collective before it (train.run_dir's) needs the device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        _unlink_shm_workspace()


SETUP_FAILED = "camex_ds/setup_failed"  # the rendezvous-store key a rank whose set-up failed writes


def _store_client(timeout_s: float = 5.0) -> dist.TCPStore:
    """A second connection to the launcher's rendezvous store (the master's), counted as no worker."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def _listening(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _fail_together():
    """While the process group is built: a rank whose set-up fails says so in the rendezvous store, and every
    other rank, watching the store, exits at once.

    Gloo waits about five timeouts for a peer that will never connect (25 minutes at the default), so without
    this one host's failed set-up (say, an unreachable advertised address) holds every other host's ranks that
    long. A master that vanishes after it was reached ends the others the same way.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store, reached = None, False
        while not done.wait(0.5 if reached else 0.05):  # reach the master as soon as it is up: it may not stay up
            if not _listening(addr, port):  # a bare connect: TCPStore would log every refused attempt
                failed = reached  # gone after it was up: the master's own set-up failed
            else:
                reached = True
                try:
                    store = store or _store_client()
                    failed = store.check([SETUP_FAILED])
                except dist.DistError:  # a slow master, not a lost one: try again next round
                    store, failed = None, False
            if failed and not done.is_set():
                print(f"camex_ds: rank {os.environ.get('RANK')}: another rank failed while the process group was set "
                      "up (its error is above); exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="camex-setup-watch").start()
    try:
        yield
    except BaseException:
        done.set()
        with contextlib.suppress(OSError, dist.DistError):
            _store_client().set(SETUP_FAILED, os.environ.get("RANK", "?"))
        raise
    finally:
        done.set()


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


def expert_parallel_rank(ep_size: int, rank: Optional[int] = None) -> int:
    """The place of `rank` (default: this process's) in its expert-parallel group. DeepSpeed's default groups are
    consecutive ranks, so it is `rank % ep_size`: the one home of that rule (layers, checkpoint readers and writers
    all ask here; converters pass the rank of a saved job)."""
    if rank is None:
        if ep_size == 1:
            return 0
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"ep_size={ep_size} needs torch.distributed initialised (launch with `deepspeed`); "
                               "use ep_size=1 in a single process")
        if dist.get_world_size() % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the world size {dist.get_world_size()}")
        rank = dist.get_rank()
    return rank % ep_size


def global_expert(ep_rank: int, local_count: int, local: int) -> int:
    """The model-wide id of the `local`-th of the `local_count` experts an EP rank holds."""
    return ep_rank * local_count + local


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
    """`obj` from every rank, in rank order (pickled: for small things). On GPUs NCCL gathers through each
    rank's device, which `init_distributed` sets."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
