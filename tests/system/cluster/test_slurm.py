"""Issue 18: `sbatch launcher/slurm_pretrain.sbatch` under a real Slurm: munge, slurmctld and a slurmd on each of two
namespace hosts (Debian's packages, a generated configuration). The script's `srun` starts one `deepspeed --no_ssh`
launcher per node; the job trains across both nodes, exactly as one host with two ranks does."""
import re

import pytest

from tests import distributed
from .hosts import Cluster
from .provision import require
from .runs import final, losses, train_args
from .slurm import Slurm

pytestmark = pytest.mark.slow


def test_sbatch_script_trains_across_two_nodes(tmp_path, data_cache, model, one_host):
    require("slurm")
    reference = one_host(2)
    out = tmp_path / "run"
    args = [a for a in train_args(out, data_cache, model, extra=["--ep_size", 2]) if a != "--no_progress"]
    with Cluster(2, tmp_path, sshd=False) as cluster, Slurm(cluster, tmp_path / "slurm") as slurm:
        # as a user submits it, from the repository (the job's CAMEX_HOME); TMPDIR keeps its hostfiles here
        job = slurm.sbatch([f"--output={tmp_path}/job-%j.out", "launcher/slurm_pretrain.sbatch", *args],
                           cwd=distributed.ROOT, env=dict(distributed.env(), TMPDIR=str(tmp_path)))
        state = slurm.wait(job, timeout=600)
        output = (tmp_path / f"job-{job}.out").read_text()
        assert state == "COMPLETED", output[-5000:]
        assert "camex: 2 nodes x 1 processes, master node0:29500" in output
        for node in (0, 1):  # one launcher per node, no ssh
            assert f"nnodes=2, num_local_procs=1, node_rank={node}" in output
        bar = re.findall(r"train: .*?\| *(\d)/4 .*?(?:loss=([\d.]+))?", output)  # tqdm redraws at most 10/s
        assert len({step for step, _ in bar}) >= 2 and re.search(r"\| 4/4 .*loss=8\.\d+", output), output[-3000:]
        assert "done: step 4" in output
        print(f"Slurm job {job}: {state}; losses {losses(out)}")
        assert losses(out) == losses(reference)
        assert final(out)["world_size"] == 2 and final(out)["val_loss"] == final(reference)["val_loss"]
