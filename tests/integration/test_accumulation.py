"""Curvature once per optimizer step through DeepSpeed (the single-process layer tests: tests/unit/moe/test_plan.py):
one optimizer step with gradient_accumulation_steps=4 equals one step on the concatenated batch, under ZeRO 0-2 at
ep 1 and 2 (multi-process runs of tests/dist/ep_step.py), expert-parallel traffic once per step, and evaluation and
a checkpoint in the middle of a run through the launcher keep the losses."""
import pytest
import torch

from tests import distributed
from tests.unit.moe.test_plan import ACCUM

SCRIPT = "tests.dist.ep_step"
METHODS = "camex,camex-ties,camex-dynamic"


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    distributed.python(SCRIPT, "--out", out, "--layouts", "ref", "--methods", METHODS)
    distributed.python(SCRIPT, "--out", out, "--layouts", "ref", "--methods", METHODS, "--accum", ACCUM)
    distributed.ranks_ok(SCRIPT, "--out", out, "--layouts", "ep2", "--methods", METHODS, "--accum", ACCUM)

    def load(name, ranks):
        parts = [torch.load(out / f"{name}_rank{r}.pt") for r in range(ranks)]
        return {k: {"after": {**parts[-1][k]["after"], **parts[0][k]["after"]}, "ep_bytes": parts[0][k]["ep_bytes"]}
                for k in parts[0]}

    return {"ref": load("ref", 1), "ep1": load(f"ref_accum{ACCUM}", 1), "ep2": load(f"ep2_accum{ACCUM}", 2)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep1", "ep2"])
@pytest.mark.parametrize("method", METHODS.split(","))
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_accumulated_step_equals_one_step_on_the_whole_batch(deepspeed_runs, layout, method, zero):
    key = f"{method}-zero{zero}"
    want, got = deepspeed_runs["ref"][key]["after"], deepspeed_runs[layout][key]["after"]
    err = max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    assert err < 1e-5, f"{layout} {key}: rel err {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.split(","))
def test_expert_parallel_traffic_once_per_optimizer_step(deepspeed_runs, method):
    from camex_ds.config import ModelConfig
    from camex_ds.analysis.flops import ep_bytes_per_step
    from tests.dist.ep_step import model_config

    cfg = ModelConfig.from_dict(model_config(method, 2))
    assert deepspeed_runs["ep2"][f"{method}-zero0"]["ep_bytes"] == ep_bytes_per_step(cfg, gloo=True) > 0


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_eval_and_checkpoint_mid_run_keep_the_losses(tmp_path, text_files, dynamic):
    """Through the launcher, accumulation 4, camex-dare (per-step DARE mask and τ̃ reuse): three steps with an
    evaluation and a checkpoint save + load between steps 1 and 2 give the losses of three plain steps."""
    import json

    from tests.launch import TINY, launch

    model = {**TINY, "moe": {**TINY["moe"], "method": "camex-dare", "dynamic": dynamic}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
        "tensorboard": {"enabled": False}}))

    def run(out, *extra):
        code, err, _ = launch(["--model_config", tmp_path / "model.json", "--deepspeed_config", tmp_path / "ds.json",
                               "--data", text_files[0], "--vocab_size", 512, "--cache_dir", tmp_path / "cache",
                               "--output_dir", out, "--max_steps", 3, "--log_interval", 1, "--eval_batches", 1,
                               "--no_progress", *extra])
        assert code == 0, err[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    plain = run(tmp_path / "plain", "--eval_interval", 100, "--save_interval", 100)
    run(tmp_path / "split", "--eval_interval", 1, "--save_interval", 1, "--stop_at_step", 1)
    split = run(tmp_path / "split", "--eval_interval", 1, "--save_interval", 1, "--resume")
    assert sorted(plain) == [1, 2, 3] and sorted(split) == [1, 2, 3]
    assert all(abs(split[s] - plain[s]) <= 1e-6 * abs(plain[s]) for s in plain), (plain, split)
