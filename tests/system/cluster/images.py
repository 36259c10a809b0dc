"""The camex_ds CPU image, built here with podman and cached by content hash.

No registry is reachable, so the base comes from Debian packages (docker/debian_base.sh), and the CPU torch wheel
from this machine's pip configuration, offered to the build as a one-package index (TORCH_INDEX_URL). Podman runs
with settings and storage of its own under the cache directory: runc, cgroupfs and no default ulimits (crun and
the default ulimits fail on these machines), images kept between runs. An image whose inputs are unchanged is
reused as is; after a source change podman's layer cache rebuilds only the layers from `COPY . /opt/camex_ds` on.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from importlib import metadata
from pathlib import Path

from tests.distributed import ROOT
from ..test_docker import is_ignored, load_dockerignore

CACHE = Path(os.environ.get("CAMEX_CLUSTER_CACHE", "/var/cache/camex_ds/cluster"))
RUNROOT = Path("/run/camex_ds_podman")  # podman's transient state (tmpfs)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def context_digest() -> str:
    """Every file of the build context (the repository less .dockerignore), by path and content."""
    rules = load_dockerignore(ROOT / ".dockerignore")
    parts = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored((rel / d).as_posix(), rules))
        for name in sorted(filenames):
            path = (rel / name).as_posix()
            if not is_ignored(path, rules) and not os.path.islink(ROOT / path):
                parts += [path, (ROOT / path).read_bytes(), os.access(ROOT / path, os.X_OK)]
    return _digest(*parts)


class Podman:
    """`podman` with this module's settings and storage; removes the containers it named at `close()`."""

    def __init__(self, cache: Path = CACHE):
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n')
        (cache / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{cache / "storage"}"\nrunroot = "{RUNROOT}"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(cache / "containers.conf"),
                        CONTAINERS_STORAGE_CONF=str(cache / "storage.conf"))
        self.containers: list[str] = []
        # those of a test process killed before it could remove them
        names = self("ps", "--all", "--format", "{{.Names}}", check=False).stdout.split()
        for name in names:
            pid = re.match(r"cx(\d+)-", name)
            if pid and not Path(f"/proc/{pid.group(1)}").exists():
                self("rm", "--force", "--time", "0", name, check=False, timeout=120)

    def __call__(self, *args, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(["podman", *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def name(self, what: str) -> str:
        """A container name to run with, removed at close()."""
        self.containers.append(f"cx{os.getpid()}-{len(self.containers)}-{what}")
        return self.containers[-1]

    def remove_containers(self) -> None:
        for name in self.containers:
            self("rm", "--force", "--time", "0", name, check=False, timeout=120)
        self.containers.clear()

    def close(self) -> None:
        """No container left, nor podman's transient state; the images stay in the cache."""
        self.remove_containers()
        shutil.rmtree(RUNROOT, ignore_errors=True)


def base_image(podman: Podman) -> str:
    """docker/debian_base.sh's image, tagged by the script's and the CA bundle's content."""
    script = ROOT / "docker" / "debian_base.sh"
    tag = "localhost/camex-base:" + _digest(script.read_bytes(), Path("/etc/ssl/certs/ca-certificates.crt")
                                            .read_bytes(), os.environ.get("SUITE", "bookworm"))
    if not podman.exists(tag):
        proc = subprocess.run([script, tag, "podman"], env=podman.env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tag


def torch_index(cache: Path) -> Path:
    """A PEP 503 index holding only the CPU torch wheel this machine's pip finds for the installed version,
    for Debian bookworm's Python 3.11 (no multi-GB CUDA wheel from PyPI)."""
    version = metadata.version("torch")
    wheels = cache / "wheels"
    found = sorted(wheels.glob(f"torch-{version}-cp311-*.whl"))
    if not found:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--dest", wheels,
                               f"torch=={version}"], capture_output=True, text=True, timeout=1200)
        found = sorted(wheels.glob(f"torch-{version}-cp311-*.whl"))
        if not found:
            raise LookupError(f"pip finds no torch=={version} wheel for Python 3.11: {proc.stderr.strip()[-300:]}")
    page = wheels / "simple" / "torch" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(f'<a href="../../{urllib.parse.quote(found[0].name)}">{found[0].name}</a>\n')
    return wheels


def cpu_image(podman: Podman) -> str:
    """docker/Dockerfile.cpu built on base_image() with the local torch wheel, tagged by all of its inputs."""
    base, wheels = base_image(podman), torch_index(podman.cache)
    tag = "localhost/camex_ds:cpu-" + _digest(base, context_digest(), sorted(p.name for p in wheels.glob("*.whl")))
    if not podman.exists(tag):
        # --network host: the RUN steps reach the Debian mirror and PyPI as this machine does, and podman makes
        # no bridge or firewall rules for the build
        podman("build", "--network", "host", "--file", ROOT / "docker" / "Dockerfile.cpu",
               "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "TORCH_INDEX_URL=file:///wheels/simple",
               "--volume", f"{wheels}:/wheels:ro", "--tag", tag, ROOT, timeout=3000)
    return tag
