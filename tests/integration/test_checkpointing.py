"""Activation checkpointing through DeepSpeed under expert parallelism (the single-process model tests:
tests/unit/model/test_gpt_checkpointing.py): a 2-rank ep 2 step with every block recomputed has the loss, the
gradients and the parameters of the same step without it, under ZeRO 0, 1 and 2 at accumulation 4 (the merge plans'
gradient relay), for static and dynamic camex and for the token-routing `smoe`, whose recomputed forward repeats its
all-to-all in the backward (in the same order on every rank, since every rank recomputes the same blocks).
Recomputed compiled blocks (`--compile`) give eager's loss and gradients; the launcher's `--activation_checkpointing`
trains the losses of the run without it, and records the setting in train_args.json."""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from camex_ds.model import build_model
from tests import distributed
from tests.integration.test_compile import MODELS
from tests.unit.moe.test_plan import ACCUM

METHODS = "camex,camex-dynamic,smoe"


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    distributed.ranks_ok("tests.dist.ep_step", "--out", out, "--layouts", "ep2", "--methods", METHODS,
                         "--zero", "0,1,2", "--accum", ACCUM, "--checkpointing", "0,1")
    parts = [torch.load(out / f"ep2_accum{ACCUM}_rank{r}.pt") for r in range(2)]
    return {key: {field: {**parts[1][key][field], **parts[0][key][field]} for field in ("grads", "after")}
            | {"loss": [part[key]["loss"] for part in parts]} for key in parts[0]}


def _rel_err(got: dict, want: dict) -> tuple[float, str]:
    assert set(got) == set(want)
    return max((((got[n] - w).norm() / w.norm().clamp_min(1e-30)).item(), n) for n, w in want.items())


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2])
@pytest.mark.parametrize("method", METHODS.split(","))
def test_checkpointed_ep2_step_equals_the_step_without(ep2_runs, method, zero):
    plain, checkpointed = ep2_runs[f"{method}-zero{zero}"], ep2_runs[f"{method}-zero{zero}-ckpt1"]
    for want, got in zip(plain["loss"], checkpointed["loss"]):
        assert abs(got - want) <= 1e-5 * abs(want)
    for field in ("grads", "after"):
        err, name = _rel_err(checkpointed[field], plain[field])
        assert err < 1e-5, f"{method} {field} {name}: rel err {err:.2e}"


@pytest.mark.slow  # inductor compiles each model for a few seconds
@pytest.mark.parametrize("name", ["camex", "dynamic-camex"])
def test_recomputed_compiled_blocks_match_eager(name):
    torch.manual_seed(0)
    eager = build_model(MODELS[name]).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    compiled.set_activation_checkpointing(1)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))

    def step(model):
        torch.manual_seed(3)
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):  # router noise from eager's RNG stream
        (loss_e, grads_e), (loss_c, grads_c) = step(eager), step(compiled)
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e)
    err, name = _rel_err(grads_c, grads_e)
    assert err < 1e-5, f"{name}: rel err {err:.2e}"


def test_launcher_flag_trains_the_same_losses(tmp_path, text_files):
    """Through the launcher (accumulation 2, camex-dare: DARE masks and router noise), 2 steps with every other block
    recomputed give the losses of 2 plain steps; train_args.json records the setting."""
    import json

    from tests.launch import TINY, launch, tiny_ds_config, write_json

    model = write_json(tmp_path / "model.json", {**TINY, "moe": {**TINY["moe"], "method": "camex-dare"}})
    ds = tiny_ds_config(tmp_path / "ds.json", accum=2)

    def run(out, *extra):
        code, err, _ = launch(["--model_config", model, "--deepspeed_config", ds, "--data", text_files[0],
                               "--vocab_size", 512, "--cache_dir", tmp_path / "cache", "--output_dir", out,
                               "--max_steps", 2, "--log_interval", 1, "--eval_batches", 1, "--no_progress", *extra])
        assert code == 0, err[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}, json.loads((out / "train_args.json").read_text())

    plain, plain_args = run(tmp_path / "plain")
    checkpointed, args = run(tmp_path / "ckpt", "--activation_checkpointing", "--activation_checkpointing_interval", 2)
    assert sorted(plain) == [1, 2] and plain == pytest.approx(checkpointed, rel=1e-6)
    assert not plain_args["activation_checkpointing"]
    assert (args["activation_checkpointing"], args["activation_checkpointing_interval"]) == (True, 2)
