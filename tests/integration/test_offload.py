"""Issue 27: the optimizer offloaded to the CPU (ZeRO-Offload) trains as the same run without it, with our MoE
parameter groups (expert, non-expert, decay, no-decay, curvature with its own lr scale), saves, resumes and
reshards; combinations that cannot work are refused in one line before the first step."""
from __future__ import annotations

import json

import pytest

from camex_ds.config import ConfigError
from camex_ds.train.offload import check_offload

from tests import distributed
from tests.launch import LAUNCHER, TINY, launch, one_error, run_checked, write_json

MODEL = {**TINY, "moe": {**TINY["moe"], "curvature_lr_scale": 2.0, "noisy_gating": False}}  # ranks draw no noise
STEPS = 10
# DeepSpeed's CPU Adam against torch's AdamW over 10 steps of this model: measured 2.3e-6 relative (fp32 rounding of
# a differently ordered update); the bound leaves room for other CPUs' vector widths.
CPU_ADAM_RTOL = 1e-5


def _ds(stage: int, offload: bool, torch_adam: bool = False, micro: int = 2, optimizer: str = "AdamW") -> dict:
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    params = {"lr": 2e-3, **({"torch_adam": True} if torch_adam else {})}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "zero_optimization": zero, "bf16": {"enabled": False}, "optimizer": {"type": optimizer, "params": params},
            "tensorboard": {"enabled": False}}


def _args(tmp_path, out, ds: dict, *extra) -> list:
    name = f"{out.name}_ds.json"
    return ["--model_config", write_json(tmp_path / "model.json", MODEL),
            "--deepspeed_config", write_json(tmp_path / name, ds), "--cache_dir", tmp_path / "cache",
            "--output_dir", out, "--max_steps", STEPS, "--eval_interval", STEPS, "--save_interval", 5,
            "--log_interval", 1, "--no_progress", *extra]


def _losses(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


@pytest.mark.parametrize("zero, message", [
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "needs ZeRO stage 1 or 2, got stage 0"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "device='nvme' is not supported"),
    ({"stage": 2, "offload_optimizer": "cpu"}, "expected a JSON object"),
])
def test_impossible_offloads_are_refused(zero, message):
    with pytest.raises(ConfigError, match=message):
        check_offload({"zero_optimization": zero, "optimizer": {"type": "AdamW"}})


def test_offload_needs_a_cpu_optimizer_and_none_is_fine():
    zero = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(ConfigError, match="optimizer DeepSpeed can step on the CPU .* got 'Lamb'"):
        check_offload({"zero_optimization": zero, "optimizer": {"type": "Lamb"}})
    check_offload({"zero_optimization": zero, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})
    check_offload({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "none"}}})


def test_an_unbuildable_cpu_adam_is_refused_with_the_way_out(monkeypatch):
    from camex_ds.train import offload

    monkeypatch.setattr(offload, "cpu_adam_ready", lambda: False)
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "optimizer": {"type": "Adam"}}
    with pytest.raises(ConfigError, match="DS_BUILD_CPU_ADAM=1, or set optimizer.params.torch_adam=true"):
        check_offload(ds)
    ds["optimizer"]["params"] = {"torch_adam": True}  # torch's Adam needs no build
    check_offload(ds)


def test_launcher_refuses_zero0_offload_in_one_line(tmp_path):
    result = launch(_args(tmp_path, tmp_path / "run", _ds(0, offload=True)))
    one_error(result, 2, "offload_optimizer needs ZeRO stage 1 or 2")


def test_zero2_offload_matches_the_run_without_it(tmp_path):
    """CPU Adam on the CPU-held fp32 master equals the run without offload: bit for bit against DeepSpeed's own
    Adam (the same kernel on a CPU), to fp32 rounding against torch's AdamW (what a GPU run's FusedAdam computes)."""
    runs = {name: tmp_path / name for name in ("offload", "device", "torch")}
    run_checked("pretrain", *_args(tmp_path, runs["offload"], _ds(2, offload=True)))
    run_checked("pretrain", *_args(tmp_path, runs["device"], _ds(2, offload=False)))
    run_checked("pretrain", *_args(tmp_path, runs["torch"], _ds(2, offload=False, torch_adam=True)))
    losses = {name: _losses(out) for name, out in runs.items()}
    assert sorted(losses["offload"]) == list(range(1, STEPS + 1))
    assert losses["offload"] == losses["device"]
    assert _max_rel(losses["offload"], losses["torch"]) < CPU_ADAM_RTOL


@pytest.mark.slow
def test_zero1_offload_resume_equals_the_uninterrupted_run(tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_checked("pretrain", *_args(tmp_path, full, _ds(1, offload=True)))
    run_checked("pretrain", *_args(tmp_path, stopped, _ds(1, offload=True), "--stop_at_step", 5))
    run_checked("pretrain", *_args(tmp_path, stopped, _ds(1, offload=True), "--resume"))
    reference, resumed = _losses(full), _losses(stopped)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # the tolerance of tests/test_pretrain.py's resume test: a resumed run repeats the steps to fp32 rounding
    assert _max_rel({s: resumed[s] for s in range(6, STEPS + 1)}, {s: reference[s] for s in range(6, STEPS + 1)}) \
        < 1e-4


@pytest.mark.slow
def test_ep2_zero2_offload_reshards_to_ep1_and_resumes(tmp_path):
    """Two ranks at ep 2 with the optimizer offloaded; the step-5 checkpoint resharded to one rank resumes with the
    same global batch and reproduces the ep 2 run's losses."""
    ep2 = tmp_path / "ep2"
    distributed.ranks_ok(LAUNCHER, *_args(tmp_path, ep2, _ds(2, offload=True), "--ep_size", 2), world=2, timeout=900)
    ep1 = tmp_path / "ep1"
    ep1.mkdir()
    run_checked("convert", "reshard", "--checkpoint", ep2, "--tag", "global_step5", "--ep_size", 1,
                "--output", ep1 / "checkpoints")
    run_checked("pretrain", *_args(tmp_path, ep1, _ds(2, offload=True, micro=4), "--ep_size", 1, "--resume"))
    resumed, original = _losses(ep1), _losses(ep2)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    assert _max_rel(resumed, {s: original[s] for s in resumed}) < 1e-5
