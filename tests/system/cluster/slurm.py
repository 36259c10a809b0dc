"""A Slurm cluster on the namespace hosts: munged and slurmctld on host 0, one slurmd per host (Debian packages).

The configuration is generated (`slurm.conf`, a fresh munge key) and reaches every host the way /etc does there:
through /etc/netns/<ns>/slurm and /etc/netns/<ns>/munge, so `sbatch`, `srun` and `scontrol` run on a host find
it where they look on a real node, and the machine's own /etc/slurm and munge key are left alone. The daemons run
inside the hosts' namespaces, so the cluster's `close()` stops them.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

from .hosts import Cluster, wait_for

SLURM_CONF = """\
ClusterName=camex
SlurmctldHost={head}({head_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={work}/state
SlurmdSpoolDir={work}/spool/%n
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd-%n.pid
SlurmctldLogFile={work}/slurmctld.log
SlurmdLogFile={work}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=30
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """Slurm over `cluster`'s hosts (host 0 is also the controller); use as a context manager inside it."""

    def __init__(self, cluster: Cluster, workdir: Path):
        self.cluster, self.work = cluster, Path(workdir)
        self.munge_socket = self.work / "munge" / "munge.socket"

    def __enter__(self) -> "Slurm":
        hosts = self.cluster.hosts
        cpus = os.cpu_count()
        nodes = "".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs={cpus} State=UNKNOWN\n" for h in hosts)
        conf = SLURM_CONF.format(head=socket.gethostname(), head_addr=hosts[0].addr, work=self.work, nodes=nodes,
                                 munge_socket=self.munge_socket)
        (self.work / "munge").mkdir(parents=True)
        (self.work / "state").mkdir()
        key = os.urandom(1024)
        for h in hosts:
            (h.etc / "slurm").mkdir()
            (h.etc / "slurm" / "slurm.conf").write_text(conf)
            (h.etc / "slurm" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
            (h.etc / "munge").mkdir(mode=0o700)
            (h.etc / "munge" / "munge.key").write_bytes(key)
            os.chmod(h.etc / "munge" / "munge.key", 0o400)
            (self.work / "spool" / h.name).mkdir(parents=True)
        m = self.work / "munge"
        self._daemon(0, ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                         "--key-file=/etc/munge/munge.key", f"--pid-file={m}/munged.pid",
                         f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], "munged")
        wait_for(self.munge_socket.exists, 30, "munged's socket")
        self._daemon(0, ["slurmctld", "-D", "-i"], "slurmctld")
        for i, h in enumerate(hosts):
            self._daemon(i, ["slurmd", "-D", "-N", h.name], f"slurmd-{h.name}")
        wait_for(lambda: self.node_states() == ["idle"] * len(hosts), 60, "every slurmd to register as idle")
        return self

    def __exit__(self, *exc) -> None:
        pass  # the daemons live in the cluster's namespaces: its close() ends them

    def _daemon(self, host: int, cmd: list[str], name: str) -> None:
        log = open(self.work / f"{name}.out", "w")
        self.cluster.popen(host, cmd, stdout=log, stderr=subprocess.STDOUT)

    def command(self, cmd, host: int = 0, **kw) -> subprocess.CompletedProcess:
        return self.cluster.run(host, cmd, **kw)

    def node_states(self) -> list[str]:
        out = self.command(["sinfo", "-h", "-N", "-o", "%t"], timeout=30).stdout
        return sorted(out.split())

    def sbatch(self, args: list, cwd: Path, env: dict) -> int:
        proc = self.command(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def wait(self, job: int, timeout: float) -> str:
        """The job's final state (COMPLETED, FAILED, ...), once it has left the queue."""
        def done():
            out = self.command(["scontrol", "show", "job", str(job)], timeout=30).stdout
            state = re.search(r"JobState=(\S+)", out)
            return state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") and \
                state.group(1)
        return wait_for(done, timeout, f"job {job} to finish", every=0.5)
