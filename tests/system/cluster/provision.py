"""What the cluster tests need from the machine: root, network namespaces, and Debian packages.

Missing packages are installed with apt-get when the tests run as root (as in CI); without root, apt-get or
network namespaces the tests are skipped, and say why.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .hosts import Cluster

# what each group of tests runs -> the Debian package that provides it
TOOLS = {
    "netns": {"ip": "iproute2"},
    "ssh": {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh",
            "ip": "iproute2"},
    "slurm": {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
              "ip": "iproute2"},
    "podman": {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "ssh-keygen": "openssh-client",
               "ip": "iproute2"},
}
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
_checked: dict[str, str | None] = {}  # group -> why it cannot run (None: it can)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def _missing(group: str) -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS[group].items() if _which(tool) is None})


def _netns_ok() -> bool:
    try:
        with Cluster(1, Path("/nonexistent"), sshd=False):
            return True
    except subprocess.CalledProcessError:
        return False


def _why_not(group: str) -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces, daemons, apt-get)"
    missing = _missing(group)
    if missing:
        if _which("apt-get") is None:
            return f"needs the Debian packages {' '.join(missing)} (no apt-get to install them)"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        log = []
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            log.append(proc.stdout[-1000:] + proc.stderr[-1000:])
            if proc.returncode != 0:
                return f"apt-get could not install {' '.join(missing)}: {log[-1].strip()[-300:]}"
        if _missing(group):
            return f"still missing after apt-get install: {' '.join(_missing(group))}"
    if _which("ip") and not _netns_ok():
        return "cannot create network namespaces here (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    return None


def require(group: str) -> None:
    """Skip (with the reason) unless the tools of `group` are there or could be installed."""
    if group not in _checked:
        _checked[group] = _why_not(group)
    if _checked[group]:
        pytest.skip(f"cluster tests ({group}): {_checked[group]}")
