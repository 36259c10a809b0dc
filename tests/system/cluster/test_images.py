"""Issue 18: the CPU image built and run. The base image comes from Debian packages (debootstrap, podman import);
docker/Dockerfile.cpu is built on it through its BASE_IMAGE build-arg, running the install steps it shares with the
GPU image (docker/install.sh); then `python launcher/pretrain.py --max_steps 5` runs in a container, and two
containers train as two hosts: one in the entrypoint's sshd worker mode, the other launching over a network the
test makes (two namespace hosts on a private bridge)."""
import json
import os
import subprocess
import time

import pytest

from .hosts import Cluster, wait_for
from .images import Podman, cpu_image
from .provision import require
from .runs import final, losses, train_args, write_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def podman():
    require("podman")
    runner = Podman()
    info = runner("info", check=False)
    if info.returncode != 0:
        pytest.skip(f"cluster tests (podman): podman cannot run here: {info.stderr.strip()[-300:]}")
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def image(podman):
    start = time.monotonic()
    try:
        tag = cpu_image(podman)
    except LookupError as e:
        pytest.skip(f"cluster tests (podman): {e}")
    print(f"\nCPU image {tag}: ready after {time.monotonic() - start:.0f} s")
    return tag


def test_the_image_is_built_from_the_debian_base_with_the_shared_steps(podman, image):
    script = ("python -c 'import sys, torch, deepspeed, camex_ds; print(sys.version.split()[0], torch.__version__, "
              "deepspeed.__version__)' | tail -1 && cat /etc/pip/constraints.txt && command -v sshd pdsh ssh && id -u")
    out = podman("run", "--rm", "--name", podman.name("inspect"), "--network", "none", image, "bash", "-c",
                 script).stdout.split()
    assert out[:3] == ["3.11.2", "2.13.0+cpu", "0.19.8"]  # Debian bookworm's Python; the local CPU wheel
    assert "torch==2.13.0+cpu" in out  # install.sh pin-torch
    assert out[-4:] == ["/usr/sbin/sshd", "/usr/bin/pdsh", "/usr/bin/ssh", "1000"]  # install.sh system, user
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert "/opt/venv/bin" in " ".join(config["Env"])  # docker/debian_base.sh's Python first on PATH


def test_pretrain_runs_in_a_container(podman, image):
    start = time.monotonic()
    proc = podman("run", "--rm", "--name", podman.name("pretrain"), "--network", "none", "--shm-size", "1g", image,
                  "python", "launcher/pretrain.py", "--max_steps", "5")
    print(f"python launcher/pretrain.py --max_steps 5 in the container: {time.monotonic() - start:.0f} s")
    assert "done: step 5" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_two_containers_train_as_two_hosts(podman, image, tmp_path):
    keys, shared = tmp_path / "keys", tmp_path / "shared"
    keys.mkdir(mode=0o700)
    shared.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys / "id_ed25519"], check=True)
    write_model(shared / "tiny.json")
    with Cluster(2, tmp_path / "net", sshd=False) as net:
        net.hostfile(shared / "hostfile", slots=1)
        for path in (keys, shared, *keys.iterdir(), *shared.iterdir()):
            os.chown(path, 1000, 1000)  # the image's user
        common = ["--shm-size", "1g", "--env", "OMP_NUM_THREADS=1", "--volume", f"{keys}:/run/secrets/camex_ssh:ro",
                  "--volume", f"{shared}:/shared"]
        try:
            worker = podman.name("worker")
            podman("run", "--detach", "--name", worker, "--network", f"ns:/run/netns/{net.hosts[1].ns}", *common,
                   image, "sshd")
            wait_for(lambda: "Server listening" in podman("logs", worker).stderr, 60, "the worker's sshd")
            args = train_args("/shared/run", "/shared/cache", "/shared/tiny.json", extra=["--ep_size", 2])
            start = time.monotonic()
            proc = podman("run", "--rm", "--name", podman.name("launcher"), "--network",
                          f"ns:/run/netns/{net.hosts[0].ns}", *common, image, "--hostfile", "/shared/hostfile", "--",
                          *args, check=False)
            took = time.monotonic() - start
        finally:
            podman.remove_containers()  # before the network goes
    log, out = proc.stdout + proc.stderr, shared / "run"
    assert proc.returncode == 0, log[-5000:]
    print(f"two containers as two hosts: trained in {took:.0f} s, losses {losses(out)}")
    for rank, host in enumerate(net.hosts):
        assert f"{host.addr}: " in log and f"nnodes=2, num_local_procs=1, node_rank={rank}" in log
    assert sorted(losses(out)) == [1, 2, 3, 4] and final(out)["world_size"] == 2
