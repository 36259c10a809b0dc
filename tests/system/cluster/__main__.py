"""A cluster on this machine, for trying multi-node commands by hand (as root, from the repository root):

    python -m tests.system.cluster -- deepspeed --hostfile hostfile launcher/pretrain.py --ep_size 2 --max_steps 20
    python -m tests.system.cluster --hosts 2 --slots 2                # an interactive shell on host 0
    python -m tests.system.cluster --slurm -- sbatch --wait --output=/tmp/job.out launcher/slurm_pretrain.sbatch ...

Makes HOSTS network namespaces on a private bridge (10.213.0.1, .2, ...), each with its own sshd (and, with
--slurm, munged, slurmctld and a slurmd per host), then runs COMMAND on host 0 in a directory holding `hostfile`
(SLOTS ranks per host), the repository's `launcher/` and a `.deepspeed_env` with OMP_NUM_THREADS=1; with --slurm,
in the repository itself. Everything is torn down when COMMAND exits, whose exit code this returns.
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.distributed import ROOT, env
from .hosts import Cluster
from .runs import launch_dir
from .slurm import Slurm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.system.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=2, help="machines (%(default)s)")
    ap.add_argument("--slots", type=int, default=1, help="ranks per machine in the hostfile (%(default)s)")
    ap.add_argument("--slurm", action="store_true", help="run Slurm on the machines too")
    ap.add_argument("command", nargs="*", default=["bash"], help="what to run on host 0 (default: a shell)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("must run as root: it creates network namespaces and starts sshd")
    if args.hosts < 1 or args.slots < 1:
        ap.error(f"--hosts={args.hosts} --slots={args.slots}: both must be at least 1")
    with tempfile.TemporaryDirectory(prefix="camex_cluster_") as tmp, Cluster(args.hosts, Path(tmp)) as cluster:
        workdir = launch_dir(Path(tmp) / "launch", cluster, args.slots)
        print("hosts: " + ", ".join(f"{h.name}={h.addr}" for h in cluster.hosts), file=sys.stderr)
        if args.slurm:
            with Slurm(cluster, Path(tmp) / "slurm"):
                return subprocess.run(cluster.hosts[0].argv(*args.command), cwd=ROOT, env=env()).returncode
        print(f"on host 0, in {workdir}: {' '.join(args.command)}", file=sys.stderr)
        return subprocess.run(cluster.hosts[0].argv(*args.command), cwd=workdir, env=env()).returncode


if __name__ == "__main__":
    sys.exit(main())
