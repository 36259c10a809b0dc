"""Issue 18: multi-node over ssh, for real. Two hosts (network namespaces, each with its own sshd); the README's
multi-node command, run as written from host 0, reaches both through DeepSpeed's default pdsh runner.

Shown: 2 hosts x 1 rank and 2 hosts x 2 ranks with the experts spread over both hosts train exactly as one host
with the same number of ranks; `--resume` across hosts is exact; SIGKILL of host 1's ranks ends the job on host 0
within seconds with a failing exit; a set-up that fails on one host ends every host's ranks within seconds.
No GLOO_SOCKET_IFNAME anywhere: the hostname resolves to loopback on these hosts, and the launcher picks eth0.
"""
import os
import signal
import subprocess
import time

import pytest

from tests import distributed
from .provision import require
from .hosts import Cluster, wait_for
from .runs import final, launch_dir, losses, readme_launcher, train_args

pytestmark = pytest.mark.slow

RANKS = "launcher/pretrain.py --local_rank"  # in a rank's command line, not in its node launcher's


def readme_command(cluster: Cluster, workdir, args, timeout=600) -> subprocess.CompletedProcess:
    """The README's multi-node command with `args` for pretrain.py, run on host 0 in `workdir`."""
    return cluster.run(0, readme_launcher() + args, cwd=workdir, env=distributed.env(), timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _no_training_left(cluster: Cluster) -> bool:
    return not any(h.processes("launcher/pretrain.py") for h in cluster.hosts)


def test_readme_command_is_the_plain_hostfile_launch():
    assert readme_launcher() == ["deepspeed", "--hostfile", "hostfile", "launcher/pretrain.py"]


@pytest.mark.parametrize("slots", [1, 2], ids=["2hosts_x_1rank", "2hosts_x_2ranks"])
def test_two_hosts_train_exactly_like_one_host(ssh_cluster, one_host, tmp_path, data_cache, model, slots):
    world = 2 * slots
    reference = one_host(world)
    out = tmp_path / "run"
    log = _ok(readme_command(ssh_cluster, launch_dir(tmp_path / "launch", ssh_cluster, slots),
                             train_args(out, data_cache, model, extra=["--ep_size", world])))
    for i, host in enumerate(ssh_cluster.hosts):  # each host ran its ranks, chose its interface and said so
        said = "\n".join(line for line in log.splitlines() if line.startswith(f"{host.addr}: "))
        assert f"nnodes=2, num_local_procs={slots}, node_rank={i}" in said
        assert "no address other hosts reach; GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0" in said
    assert final(out)["world_size"] == world
    got, want = losses(out), losses(reference)
    print(f"2 hosts x {slots} rank(s), --ep_size {world}: losses {got}; one host, {world} ranks: {want}")
    assert sorted(got) == [1, 2, 3, 4]
    assert got == want, {s: got[s] - want[s] for s in got}  # bit for bit
    assert final(out)["val_loss"] == final(reference)["val_loss"]
    # the experts are split over all ranks, so over both hosts: each rank saved its own share
    ckpt = out / "checkpoints" / "global_step4"
    assert len(list(ckpt.glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers x 4 experts
    assert _no_training_left(ssh_cluster)


def test_resume_across_hosts_is_exact(ssh_cluster, one_host, tmp_path, data_cache, model):
    reference = one_host(2)
    workdir, out = launch_dir(tmp_path / "launch", ssh_cluster, 1), tmp_path / "run"
    _ok(readme_command(ssh_cluster, workdir, train_args(out, data_cache, model, extra=["--ep_size", 2,
                                                                                        "--stop_at_step", 2])))
    assert sorted(losses(out)) == [1, 2] and (out / "checkpoints" / "latest").read_text() == "global_step2"
    _ok(readme_command(ssh_cluster, workdir, train_args(out, data_cache, model, extra=["--ep_size", 2, "--resume"])))
    print(f"stopped at step 2 and resumed across hosts: losses {losses(out)}")
    assert losses(out) == losses(reference)
    assert final(out)["val_loss"] == final(reference)["val_loss"]


def test_killing_host1_ranks_ends_the_job_on_host0(ssh_cluster, one_host, tmp_path, data_cache, model):
    one_host(2)  # the data cache is ready, so both hosts reach training together
    out = tmp_path / "run"
    log = (tmp_path / "launcher.log").open("w")
    job = ssh_cluster.popen(0, readme_launcher() + train_args(out, data_cache, model, steps=10_000,
                                                                extra=["--ep_size", 2]),
                            cwd=launch_dir(tmp_path / "launch", ssh_cluster, 1), env=distributed.env(), stdout=log,
                            stderr=subprocess.STDOUT)
    wait_for(lambda: (out / "metrics.jsonl").exists() and losses(out), 300, "the first training step")
    victims = ssh_cluster.hosts[1].processes(RANKS)
    assert victims
    killed = time.monotonic()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    returncode = job.wait(timeout=300)
    took = time.monotonic() - killed
    print(f"host 1's ranks SIGKILLed: the job on host 0 ended {took:.1f} s later with exit code {returncode}")
    assert returncode != 0
    assert took < 120, took
    assert max(losses(out)) < 10_000
    wait_for(lambda: _no_training_left(ssh_cluster), 10, "no training process left on either host")


def test_a_failed_setup_on_one_host_ends_every_host(tmp_path, data_cache, model, one_host):
    """Both hosts pinned to loopback (GLOO_SOCKET_IFNAME=lo in their sshd): what happened before the launcher
    chose interfaces. Host 1's rank fails at once (it is told to connect to 127.0.0.1); host 0's rank, waiting for
    a connection that will never come, ends seconds later, not after gloo's ~5 x --dist_timeout (300 s)."""
    require("ssh")
    one_host(2)
    pinned = {i: {"GLOO_SOCKET_IFNAME": "lo"} for i in (0, 1)}
    with Cluster(2, tmp_path, host_env=pinned) as cluster:
        start = time.monotonic()
        proc = readme_command(cluster, launch_dir(tmp_path / "launch", cluster, 1),
                              train_args(tmp_path / "run", data_cache, model, extra=["--ep_size", 2]), timeout=300)
        took = time.monotonic() - start
        log = proc.stdout + proc.stderr
        print(f"set-up failure on both hosts: the job ended after {took:.1f} s with exit code {proc.returncode}")
        assert proc.returncode != 0
        assert "Gloo connectFullMesh failed" in log and "remote=[127.0.0.1]" in log
        assert "another rank failed while the process group was set up" in log
        assert took < 120, took
        assert _no_training_left(cluster)
