"""Process-group set-up across ranks: when one rank's set-up fails, the other ends at once. The single-rank set-up
(no /dev/shm workspace left behind): tests/unit/test_parallel.py."""
import subprocess
import sys
import time

import pytest

from tests.distributed import ROOT, env, free_port


@pytest.mark.slow
@pytest.mark.parametrize("failing", [0, 1], ids=["master_fails", "worker_fails"])
def test_a_failed_setup_ends_the_other_rank_at_once(failing):
    """One rank's gloo set-up fails (an interface that does not exist); the other must exit within seconds, not
    after gloo's ~5 x timeout (25 minutes at 300 s). A failed worker tells the waiting master through the store;
    a failed master takes the store with it, which ends the worker's wait for its address."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        e = dict(env(), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        if rank == failing:
            e["GLOO_SOCKET_IFNAME"] = "camexnone0"
        code = "from camex_ds import parallel; parallel.init_distributed()"
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    logs = [p.communicate(timeout=120)[0] for p in procs]
    took = time.monotonic() - start
    assert all(p.returncode != 0 for p in procs), logs
    assert "camexnone0" in logs[failing]
    said = "another rank failed while the process group was set up" in logs[1 - failing]
    assert said or (failing == 0 and "Connection was likely closed" in logs[1]), logs[1 - failing][-2000:]
    assert took < 60, took
