"""The training runs the cluster tests launch and compare: the tiny model of tests/integration/test_pretrain.py, a
few steps."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.distributed import ROOT
from tests.integration.test_pretrain import TINY
from .hosts import Cluster


def write_model(path: Path) -> Path:
    path.write_text(json.dumps(TINY))
    return path


def train_args(out: Path, cache: Path, model: Path, steps: int = 4, extra=()) -> list[str]:
    """pretrain.py flags for a short run that logs every step's loss and evaluates once, at the end; MFU is not
    read, so `--peak_tflops 1` spares rank 0 its CPU matmul probe (~0.5 s per run)."""
    return [str(a) for a in ("--model_config", model, "--cache_dir", cache, "--output_dir", out, "--max_steps",
                             steps, "--eval_interval", steps, "--eval_batches", 2, "--save_interval", steps,
                             "--log_interval", 1, "--no_progress", "--peak_tflops", 1, *extra)]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


def readme_launcher() -> list[str]:
    """The launcher part of README's multi-node command (`deepspeed ... launcher/pretrain.py`), as written.

    Its training flags are the README's example for GPU nodes; the tests put their own tiny CPU run after it."""
    block = re.search(r"```bash\n(deepspeed --hostfile .*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    return argv[: argv.index("launcher/pretrain.py") + 1]


def launch_dir(path: Path, cluster: Cluster, slots: int) -> Path:
    """A directory to run the README's command in: `hostfile` naming the hosts by address, the repository's
    `launcher/`, and a `.deepspeed_env` that DeepSpeed's runner exports to every node: one OpenMP thread per
    rank, as the one-host reference runs have (tests/distributed.py), so both do the same arithmetic."""
    path.mkdir(parents=True)
    cluster.hostfile(path / "hostfile", slots)
    (path / "launcher").symlink_to(ROOT / "launcher")
    (path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    return path
