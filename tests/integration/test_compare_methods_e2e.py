"""End-to-end: tools/compare_methods.py drives the real launcher/pretrain.py over a
tiny grid (2 methods x 2 seeds x 3 steps) and writes the report; a second call
resumes (skips every finished run).

Slow (4 real training subprocesses); skipped until launcher/pretrain.py exists.
Set CAMEX_E2E_DATA to use a specific --data value instead of the small corpus
built from standard-library sources in tmp_path.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launcher" / "pretrain.py"
TOOL = REPO / "tools" / "compare_methods.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LAUNCHER.is_file(), reason="launcher/pretrain.py does not exist yet (written in parallel)"),
]

TINY_CONFIG = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "ffn_hidden_size": 64,
    "seq_len": 32,
    "activation": "gelu",
    "moe": {
        "method": "camex",
        "num_experts": 2,
        "top_k": None,
        "every": 1,
        "segment_len": 16,
        "routing": "causal",
        "curvature_rank": 1,
        "alpha": 1.0,
        "ep_size": 1,
        "dynamic": False,
    },
}


def _tiny_corpus(folder: Path, max_bytes: int = 400_000) -> Path:
    """A folder of a few hundred KB of stdlib .py files (enough text for a tokenizer)."""
    folder.mkdir(parents=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for src in sorted(root.glob("*.py")):
        size = src.stat().st_size
        if total + size > max_bytes:
            continue
        shutil.copy(src, folder / (src.stem + ".txt"))
        total += size
        if total > max_bytes * 0.9:
            break
    return folder


def _run(args, timeout=1800):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_grid_against_real_launcher(tmp_path):
    data = os.environ.get("CAMEX_E2E_DATA") or str(_tiny_corpus(tmp_path / "corpus"))
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "cmp"
    args = ["--data", data, "--methods", "euclid,camex", "--seeds", "2", "--max_steps", "3",
            "--eval_interval", "1", "--model_config", str(cfg), "--output", str(out),
            "--no_progress", "--bootstrap_resamples", "500",
            "--", "--peak_tflops", "1"]  # the launcher's: MFU is not read here, so no CPU matmul probe per run
    first = _run(args)
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"

    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    for m in ("euclid", "camex"):
        info = res["methods"][m]
        assert info["finished_seeds"] == [0, 1] and info["missing_seeds"] == []
        for s in ("0", "1"):
            row = info["seeds"][s]
            assert row["step"] == 3
            for key in ("val_loss", "val_ppl", "val_bpb"):
                assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (m, s, key)
        run = out / "runs" / m / "seed0"
        assert (run / "log.txt").exists() and (run / "metrics.jsonl").exists()
        assert res["curves"][m]["step"], f"no evaluation rows for {m}"
    pair = res["pairs"][0]
    assert (pair["a"], pair["b"], pair["relation"], pair["n"]) == ("camex", "euclid", "twin", 2)
    # different seeds must give different runs (init / routing noise)
    e = res["methods"]["euclid"]["seeds"]
    assert e["0"]["val_loss"] != e["1"]["val_loss"]

    # resuming a finished grid starts no training run and rewrites the report
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/final_metrics.json")}
    (out / "results.md").unlink()
    second = _run(args, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "finished " not in second.stderr  # no run was trained again
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert (out / "results.md").exists()
