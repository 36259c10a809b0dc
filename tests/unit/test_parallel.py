"""Process-group set-up leaves nothing behind: DeepSpeed's CPU shared-memory all-reduce creates a ~70 MB
/dev/shm workspace per rank and master port that it never removes; `init_distributed` drops its name."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT, env, free_port

SHM = Path("/dev/shm")


def _workspaces(port: int) -> list[str]:
    return [p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")
@pytest.mark.parametrize("ours", [False, True])
def test_init_distributed_leaves_no_shm_workspace(ours):
    """DeepSpeed alone leaves its workspace (the leak this guards against); our set-up removes it."""
    port = free_port()
    init = ("from camex_ds import parallel; parallel.init_distributed()" if ours else
            "import deepspeed; deepspeed.init_distributed(dist_backend='gloo', verbose=False)")
    e = dict(env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(port))
    subprocess.run([sys.executable, "-c", init], cwd=ROOT, env=e, check=True, capture_output=True, timeout=300)
    left = _workspaces(port)
    for name in left:
        os.unlink(SHM / name)
    if ours:
        assert left == []
    elif not left:
        pytest.skip("this DeepSpeed build made no shared-memory workspace (the shm op is unavailable)")
