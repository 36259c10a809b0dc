"""Machines for real multi-node runs on one computer: Linux network namespaces on a private bridge.

Each host is a network namespace with one interface, `eth0` (10.213.0.<i+1>/24), plugged into a bridge that
lives in a namespace of its own: nothing is routed to or from this computer's own network. `ip netns exec`
gives every process of a host that host's /etc/hosts and /etc/ssh (bind-mounted from /etc/netns/<ns>/), which
carry the cluster's names, keys and ssh settings, so root's ~/.ssh and the system's ssh configuration are left
alone. With `sshd=True` each host runs its own sshd, reachable with the cluster's key from every host.
`close()` kills every process in the namespaces, deletes them and their /etc/netns files, also after a failure.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.0"
ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")  # `ip netns add` makes it, and makes it a mount point, on first use
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it (the openssh-server service creates it)
_serial = iter(range(1_000_000))
_live: set = set()  # clusters of this process not yet closed
_before: dict[Path, tuple[bool, bool]] = {}  # shared paths: (existed, was a mount point) before the first of them


def _is_mount(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _ip(*args) -> None:
    subprocess.run(["ip", *map(str, args)], check=True, capture_output=True, text=True)


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Host:
    """One machine: a network namespace, its address, and the name the other hosts know it by."""

    def __init__(self, ns: str, name: str, addr: str):
        self.ns, self.name, self.addr = ns, name, addr
        self.etc = ETC_NETNS / ns  # bind-mounted over /etc/<entry> in every process of this host

    def argv(self, *cmd) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, cmd)]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def processes(self, needle: str) -> list[int]:
        """Processes of this host whose command line contains `needle`."""
        found = []
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # exited meanwhile
                continue
            if needle in cmdline:
                found.append(pid)
        return found


class Cluster:
    """`n` hosts on one bridge, optionally each with sshd; use as a context manager.

    `host_env[i]` is extra environment that host i's sshd gives every session (sshd's SetEnv): a way to
    misconfigure one machine on purpose.
    """

    def __init__(self, n: int, workdir: Path, sshd: bool = True, host_env: dict[int, dict] | None = None):
        tag = f"cx{os.getpid()}-{next(_serial)}"
        self.workdir = Path(workdir)
        self.switch = f"{tag}-sw"
        self.hosts = [Host(f"{tag}-h{i}", f"node{i}", f"{SUBNET}.{i + 1}") for i in range(n)]
        self.sshd, self.host_env = sshd, host_env or {}
        self._procs: list[subprocess.Popen] = []
        self._made: list[Path] = []  # this cluster's directories in /etc/netns
        self._namespaces: list[str] = []

    def __enter__(self) -> "Cluster":
        if not _live:
            _remove_stale()
            _before.update({p: (p.exists(), _is_mount(p)) for p in (ETC_NETNS, RUN_NETNS, PRIVSEP_DIR)})
        _live.add(self)
        atexit.register(self.close)
        try:
            self._network()
            if self.sshd:
                self._start_sshd()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- set-up -------------------------------------------------------------------------------------------------

    def _mkdir(self, path: Path) -> Path:
        path.mkdir()
        self._made.append(path)
        return path

    def _network(self) -> None:
        ETC_NETNS.mkdir(exist_ok=True)
        _ip("netns", "add", self.switch)
        self._namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        names = "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for i, h in enumerate(self.hosts):
            _ip("netns", "add", h.ns)
            self._namespaces.append(h.ns)
            _ip("link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            self._mkdir(h.etc)
            # the system's own lines first: this machine's hostname still resolves as it does outside
            (h.etc / "hosts").write_text(Path("/etc/hosts").read_text() + "\n" + names)

    def _start_sshd(self) -> None:
        PRIVSEP_DIR.mkdir(exist_ok=True)
        keys = self.keys = self._mkdir(ETC_NETNS / self.switch)  # the cluster's key pair, gone with it
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "camex-cluster", "-f",
                        keys / "id_ed25519"], check=True)
        for i, h in enumerate(self.hosts):
            ssh = h.etc / "ssh"
            ssh.mkdir()
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / "ssh_host_ed25519_key"],
                           check=True)
            shutil.copy(keys / "id_ed25519", ssh / "id_ed25519")
            shutil.copy(keys / "id_ed25519.pub", ssh / "authorized_keys")
            set_env = "".join(f"SetEnv {k}={v}\n" for k, v in self.host_env.get(i, {}).items())
            (ssh / "sshd_config").write_text(
                f"ListenAddress {h.addr}\nHostKey /etc/ssh/ssh_host_ed25519_key\nPidFile none\n"
                "AuthorizedKeysFile /etc/ssh/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\n" + set_env)
            # host keys are made per run: trust them on first use, remember nothing
            (ssh / "ssh_config").write_text(
                "Host *\n    IdentityFile /etc/ssh/id_ed25519\n    StrictHostKeyChecking no\n"
                "    UserKnownHostsFile /dev/null\n    GlobalKnownHostsFile /dev/null\n    BatchMode yes\n"
                "    LogLevel ERROR\n")
            log = open(self.workdir / f"sshd-{h.ns}.log", "w")
            self._procs.append(subprocess.Popen(h.argv("/usr/sbin/sshd", "-D", "-e"), stdout=log,
                                                stderr=subprocess.STDOUT))
        for h in self.hosts:
            wait_for(lambda: "Server listening" in (self.workdir / f"sshd-{h.ns}.log").read_text(), 30,
                     f"sshd on {h.name}")

    # -- use --------------------------------------------------------------------------------------------------

    def popen(self, i: int, cmd, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(self.hosts[i].argv(*cmd), **kw)
        self._procs.append(proc)
        return proc

    def run(self, i: int, cmd, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.hosts[i].argv(*cmd), timeout=timeout, capture_output=True, text=True, **kw)

    def hostfile(self, path: Path, slots: int) -> Path:
        """A DeepSpeed hostfile naming every host by address, `slots` ranks each."""
        path.write_text("".join(f"{h.addr} slots={slots}\n" for h in self.hosts))
        return path

    # -- tear-down --------------------------------------------------------------------------------------------

    def close(self) -> None:
        for ns in self._namespaces:  # whatever runs there: sshd, launchers, ranks, daemons
            _kill_all(ns)
        for proc in self._procs:
            proc.kill()
            proc.wait()
        self._procs.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        for path in self._made:
            shutil.rmtree(path, ignore_errors=True)
        self._made.clear()
        _live.discard(self)
        if not _live:
            _restore(_before)
        atexit.unregister(self.close)


def _kill_all(ns: str) -> None:
    host = Host(ns, "", "")
    for _ in range(50):
        pids = host.pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove_stale() -> None:
    """The namespaces of a test process that was killed before it could clean up (its pid is gone)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns, pid in re.findall(r"^(cx(\d+)-\d+-(?:sw|h\d+))\b", listed, re.M):
        if not Path(f"/proc/{pid}").exists():
            _kill_all(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def _restore(before: dict[Path, tuple[bool, bool]]) -> None:
    """Once the last cluster is gone: remove the shared directories the clusters made (/etc/netns, /run/sshd),
    and undo what `ip netns add` did to /run/netns, each only if nothing of anyone else's is left in it."""
    for path, (existed, was_mount) in before.items():
        if not path.exists() or any(path.iterdir()):
            continue
        while not was_mount and _is_mount(path):
            subprocess.run(["umount", path], check=True)
        if not existed:
            path.rmdir()
    before.clear()
