"""Issue 24 through the training job: a checkpoint whose curvature rank terms are all equal (saved before they
started apart, spec §3) resumes with one warning. Runs use the launcher in this process (`launch.launch`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch import TINY, launch
from camex_ds.ckpt.format import EXPERT_RE
from camex_ds.moe.layer import factor_shapes
from camex_ds.train import manifest

MODEL = {**TINY, "moe": {**TINY["moe"], "curvature_rank": 2}}


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _ds(path: Path, stage: int = 0) -> Path:
    return _json(path, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                        "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": False},
                        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
                        "tensorboard": {"enabled": False}})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_files):
    root = tmp_path_factory.mktemp("curvature")
    return {"root": root, "train": text_files[0], "cache": root / "cache", "ds": _ds(root / "ds.json")}


def _args(s, out, model: dict, *extra, ds=None) -> list:
    return ["--model_config", _json(out.parent / f"{out.name}.json", model), "--deepspeed_config", ds or s["ds"],
            "--data", s["train"], "--vocab_size", 512, "--cache_dir", s["cache"], "--output_dir", out,
            "--log_interval", 1, "--eval_batches", 1, "--no_progress", *extra]


def _ok(result) -> str:
    code, err, _ = result
    assert code == 0, err[-3000:]
    return err


def _warnings(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _make_old(tag: Path) -> None:
    """Rewrite a checkpoint as this code wrote it before issue 24: every rank term of every curvature factor the
    identity, and a recorded model config without the options added since."""
    for file in tag.glob("layer_*_expert_*_model_states.pt"):
        state = torch.load(file, weights_only=False)
        for key in [k for k in state if k.endswith(".flat")]:
            m = EXPERT_RE.match(key)
            matrix = state[f"{m['layer']}.deepspeed_moe.experts.deepspeed_experts.{m['id']}.{m['rest'].split('.')[1]}"]
            shapes = factor_shapes(2, *matrix.shape)
            state[key] = torch.cat([torch.eye(k).expand(r, k, k).flatten() for r, k, _ in shapes])
        torch.save(state, file)
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    states["model_config"]["moe"].pop("curvature_init_std")
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    run = manifest.read(tag)["run"]
    run["model_config"]["moe"].pop("curvature_init_std")
    manifest.write(tag, run)


def test_a_checkpoint_with_equal_rank_terms_resumes_with_one_warning(setup):
    """`--resume` of a checkpoint saved before §3's start: its recorded config lacks the new option (read with its
    default) and its rank terms are equal, which one warning line says; training goes on."""
    run = setup["root"] / "old"
    err = _ok(launch(_args(setup, run, MODEL, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2)))
    assert _warnings(err) == []
    _make_old(run / "checkpoints" / "global_step2")
    err = _ok(launch(_args(setup, run, MODEL, "--max_steps", 3, "--save_interval", 3, "--eval_interval", 3,
                           "--resume")))
    warnings = _warnings(err)
    assert len(warnings) == 1 and "curvature_rank is 2" in warnings[0], warnings
    assert "rank 2 then equals rank 1" in warnings[0]
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3
