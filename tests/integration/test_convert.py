"""Checkpoint conversion of a 2-rank job (expert parallelism 2, ZeRO-2): consolidate, evaluate, fold, reshard
round trips, a resharded checkpoint that resumes, and export to Hugging Face. The single-process conversion tests
and the helpers used here: tests/unit/ckpt/test_convert.py."""
import json
import math

import pytest
import torch

from camex_ds.ckpt.convert import consolidate, reshard
from camex_ds.ckpt.format import load_pretrained
from camex_ds.train.metrics import layer_means, layer_stats
from tests.unit.ckpt.test_convert import (LR_SCALE, _assert_same_checkpoint, _ds_config, _evaluate, _last_json,
                                          _logits, _rel, _tool, _train, _write_json, workspace)  # noqa: F401 (fixture)

# Odd width (27 = 3 heads x 9): some ZeRO flat groups then need padding, which resharding must reproduce.
EP_RUN = {
    "d_model": 27, "n_layers": 2, "n_heads": 3, "ffn_hidden_size": 36, "seq_len": 64, "activation": "gelu",
    "moe": {"method": "camex", "num_experts": 4, "every": 2, "segment_len": 16, "routing": "causal",
            "noisy_gating": False, "curvature_rank": 2, "curvature_lr_scale": LR_SCALE},
}


@pytest.fixture(scope="session")
def ep2_run(workspace):
    """2 ranks, ep_size 2, ZeRO-2, 8 steps: checkpoints at step 6 and at the end (final eval)."""
    root = workspace["root"]
    out = root / "ep2_run"
    cfg = _write_json(root / "ep_run.json", EP_RUN)
    ds = _ds_config(root / "z2.json", stage=2)
    _train(out, cfg, ds, workspace["corpus"], workspace["cache"], "--max_steps", "8", "--save_interval", "6",
           "--eval_interval", "2", "--eval_batches", "4", "--ep_size", "2", "--peak_tflops", "1", world=2)
    assert sorted(p.name for p in (out / "checkpoints").glob("global_step*")) == ["global_step6", "global_step8"]
    return out


@pytest.mark.slow
def test_ep2_zero2_consolidate_evaluate_fold(ep2_run, workspace, tmp_path):
    final = json.loads((ep2_run / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["step"] == 8
    res = _last_json(_tool("convert_checkpoint.py", "consolidate", "--checkpoint", ep2_run, "--output",
                           tmp_path / "c"))
    assert (res["trained_ep_size"], res["world_size"], res["zero_stage"], res["tag"]) == (2, 2, 2, "global_step8")
    ev = _evaluate(tmp_path / "c", workspace["corpus"], workspace["cache"], batches=4, batch_size=8)
    assert _rel(ev["val_ppl"], final["val_ppl"]) < 1e-3
    assert _rel(ev["val_bpb"], final["val_bpb"]) < 1e-3
    # experts renumbered 0..3 from the two ranks' local 0..1
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["moe"]["ep_size"] == 1 and cfg["format_version"] == 1
    # the run's end-of-run diagnostics, each rank over its own experts and averaged over the ranks, are those of
    # the whole model
    whole = layer_means(layer_stats(load_pretrained(tmp_path / "c")))
    for key in ("curvature_dev_from_identity", "task_vector_rel_norm"):
        assert _rel(final[key], whole[key]) < 1e-5, (key, final[key], whole[key])

    res = _last_json(_tool("convert_checkpoint.py", "fold", "--input", tmp_path / "c", "--output", tmp_path / "f"))
    assert res["method"] == "euclid"
    folded = _evaluate(tmp_path / "f", workspace["corpus"], workspace["cache"], batches=4, batch_size=8)
    assert _rel(folded["val_ppl"], ev["val_ppl"]) < 1e-4
    assert (tmp_path / "f" / "model.safetensors").stat().st_size < (tmp_path / "c" / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_ep2_zero2_reshard_round_trip_reproduces_deepspeed_files(ep2_run, tmp_path):
    """2 -> 1 -> 2 rewrites every ZeRO partition, slice mapping and padding exactly as DeepSpeed wrote them."""
    reshard(ep2_run, 1, tmp_path / "ep1")
    reshard(tmp_path / "ep1", 2, tmp_path / "ep2", world_size=2)
    _assert_same_checkpoint(ep2_run / "checkpoints" / "global_step8", tmp_path / "ep2" / "global_step8")
    zero = torch.load(ep2_run / "checkpoints/global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                      weights_only=False)["optimizer_state_dict"]
    assert any(zero["group_paddings"]), "the odd-width config should make ZeRO pad some group"


@pytest.mark.slow
def test_ep2_zero2_reshard_to_ep1_resumes_and_trains_on(ep2_run, workspace, tmp_path):
    """Reshard the step-6 checkpoint to one rank; resuming with the same global batch reproduces the ep=2 run."""
    new = tmp_path / "ep1_run"
    new.mkdir()
    res = _last_json(_tool("convert_checkpoint.py", "reshard", "--checkpoint", ep2_run, "--tag", "global_step6",
                           "--ep_size", "1", "--output", new / "checkpoints"))
    assert (res["from_ep_size"], res["ep_size"], res["world_size"]) == (2, 1, 1)
    zero = torch.load(new / "checkpoints/global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    groups = zero["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [g.get("lr_scale") for g in groups] == [None, None, None, LR_SCALE]  # the factors' own (expert) group
    ds = _ds_config(tmp_path / "z2_mb16.json", stage=2, micro=16)  # 1 rank x 16 = the 2 x 8 of the run
    _train(new, _write_json(tmp_path / "cfg.json", EP_RUN), ds, workspace["corpus"], workspace["cache"],
           "--max_steps", "8", "--save_interval", "100", "--eval_interval", "2", "--eval_batches", "4",
           "--ep_size", "1", "--resume")
    rows = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(train) == [7, 8] and all(math.isfinite(v) for v in train.values())
    original = {r["step"]: r["loss"] for r in
                (json.loads(line) for line in (ep2_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    for step in (7, 8):  # same samples, same optimizer state: same losses to fp32 rounding
        assert _rel(train[step], original[step]) < 1e-5, (step, train[step], original[step])
    consolidate(new, tmp_path / "a")
    consolidate(ep2_run, tmp_path / "b")
    a, b = load_pretrained(tmp_path / "a").state_dict(), load_pretrained(tmp_path / "b").state_dict()
    for name in a:  # Adam normalises tiny gradient differences; a lost optimizer state would be far off
        assert (a[name] - b[name]).abs().max() <= 1e-3 * b[name].abs().max() + 1e-7, name


@pytest.mark.slow
def test_ep2_zero2_consolidate_export_hf_same_logits_and_tokens(ep2_run, tmp_path):
    """Issue 25: a model trained at ep_size 2 on 2 ranks, consolidated and exported with its own modeling code,
    computes our logits and greedy tokens (2 x segment_len + 3 new ones, through the cache)."""
    transformers = pytest.importorskip("transformers")
    from camex_ds.ckpt.hf import export_hf
    from camex_ds.cli.generate import next_token_logits, padding_plan

    consolidate(ep2_run, tmp_path / "c")
    assert export_hf(tmp_path / "c", tmp_path / "hf")["architecture"] == "CamexForCausalLM"
    ours = load_pretrained(tmp_path / "c")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max() < 1e-5
    multiple, _ = padding_plan(ours.config)
    prompt, new = ids[0, :5].tolist(), 2 * ours.config.moe.segment_len + 3
    want = list(prompt)
    for _ in range(new):
        want.append(int(next_token_logits(ours, want, 0, multiple, "cpu").argmax()))
    with torch.no_grad():
        prompt_ids = torch.tensor([prompt])
        got = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert got[0].tolist() == want
