"""Checkpoint conversion and evaluation tools (issue 6): consolidate, reshard, upcycle, fold, evaluate, generate.

Fast tests build tiny models in-process or train 2-3 steps in this process (the tools too: their commands'
`main` in-process, one real `tools/*.py` run each). The 2-rank job (expert parallelism 2, ZeRO-2) and the resume
of its resharded checkpoint: tests/integration/test_convert.py, with the helpers below.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from camex_ds.ckpt.convert import consolidate, reshard
from camex_ds.ckpt.format import (ConvertError, PretrainedError, global_expert_name, load_pretrained, load_state_into,
                                  save_pretrained)
from camex_ds.ckpt.upcycle import fold, upcycle
from camex_ds.config import ModelConfig
from camex_ds.model import GPT

from tests import distributed
from tests.launch import run_checked, run_main

ROOT = Path(__file__).resolve().parents[3]
LAUNCHER = ROOT / "launcher" / "pretrain.py"
TOOLS = ROOT / "tools"

TINY_MOE = {
    "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 64, "activation": "gelu",
    "moe": {"method": "camex", "num_experts": 4, "every": 2, "segment_len": 16, "routing": "causal"},
}
TINY_DENSE = {**TINY_MOE, "moe": None}
# The trained runs' curvature factors step with a scaled lr in groups of their own, which resharding keeps.
LR_SCALE = 2.0


# ------------------------------------------------------------------------------------------------ helpers


def _script(name, *args) -> subprocess.CompletedProcess:
    """`python tools/NAME ARGS` in a new interpreter: each wrapper's one real run (the others run in-process)."""
    return distributed.python(TOOLS / name, *args, check=False, timeout=900)


def _tool(name, *args, check=True) -> subprocess.CompletedProcess:
    """`tools/NAME ARGS`'s command (`camex_ds.cli`) run in this process."""
    cli = {"convert_checkpoint.py": "convert", "evaluate.py": "evaluate", "generate.py": "generate"}[name]
    return run_checked(cli, *args) if check else run_main(cli, args)


def _last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train(out, model_cfg, ds_cfg, corpus, cache, *args, world=None):
    """One rank in this process; `world=N`: N rank processes (`distributed.ranks`)."""
    common = ["--model_config", model_cfg, "--deepspeed_config", ds_cfg, "--data", corpus, "--vocab_size", "512",
              "--cache_dir", cache, "--output_dir", out, "--log_interval", "1", "--no_progress", *args]
    if world is None:
        return run_checked("pretrain", *common)
    return distributed.ranks_ok(LAUNCHER, *common, world=world, timeout=900)


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _ds_config(path: Path, stage: int = 0, micro: int = 8, bf16: bool = False) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    ds["zero_optimization"] = {"stage": stage}
    ds["bf16"] = {"enabled": bf16}
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["tensorboard"] = {"enabled": False}
    return _write_json(path, ds)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _evaluate(model_dir, corpus, cache, batches=4, batch_size=8) -> dict:
    proc = _tool("evaluate.py", "--model", model_dir, "--data", corpus, "--cache_dir", cache,
                 "--batch_size", batch_size, "--max_batches", batches)
    return _last_json(proc)


def _no_partials(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A small corpus (stdlib sources) and a dataset cache shared by the tests of this module."""
    root = tmp_path_factory.mktemp("convert")
    corpus = root / "corpus"
    corpus.mkdir()
    total = 0
    for src in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total + src.stat().st_size > 300_000:
            continue
        shutil.copy(src, corpus / (src.stem + ".txt"))
        total += src.stat().st_size
        if total > 270_000:
            break
    return {"root": root, "corpus": corpus, "cache": root / "cache"}


@pytest.fixture(scope="session")
def moe_run(workspace):
    """One-process camex run (rank 2, scaled curvature lr), ZeRO 0, 3 steps, checkpoints at 2 and 3."""
    root = workspace["root"]
    out = root / "moe_run"
    scaled = {**TINY_MOE, "moe": {**TINY_MOE["moe"], "curvature_rank": 2, "curvature_lr_scale": LR_SCALE}}
    _train(out, _write_json(root / "tiny_moe.json", scaled), _ds_config(root / "z0.json"), workspace["corpus"],
           workspace["cache"], "--max_steps", "3", "--save_interval", "2", "--eval_interval", "3",
           "--eval_batches", "2")
    return out


@pytest.fixture(scope="session")
def dense_run(workspace):
    root = workspace["root"]
    out = root / "dense_run"
    _train(out, _write_json(root / "tiny_dense.json", TINY_DENSE), _ds_config(root / "z0.json"),
           workspace["corpus"], workspace["cache"], "--max_steps", "4", "--save_interval", "4",
           "--eval_interval", "4", "--eval_batches", "4")
    return out


def _tiny_model(raw: dict, vocab: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_dict({**raw, "vocab_size": vocab})).eval()


def _perturb(model: GPT, scale: float = 0.3, seed: int = 1) -> GPT:
    """Make experts differ from each other and the curvature factors far from identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".curvature." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
            elif "deepspeed_experts" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _save(model: GPT, folder: Path, tokenizer=None) -> Path:
    folder.mkdir(parents=True)
    with torch.no_grad():
        save_pretrained(folder, model.state_dict(), model.config, tokenizer)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


# ------------------------------------------------------------------------------------------------ fold


@pytest.mark.parametrize("method,activation", [("camex", "gelu"), ("camex-ties", "gelu"), ("camex-dare", "gelu"),
                                               ("camex", "swiglu")])
def test_fold_is_exact_with_trained_like_curvature(tmp_path, method, activation):
    raw = {**TINY_MOE, "activation": activation, "moe": {**TINY_MOE["moe"], "method": method, "curvature_rank": 2}}
    model = _perturb(_tiny_model(raw))
    src = _save(model, tmp_path / "src")
    result = fold(src, tmp_path / "folded")
    folded = load_pretrained(tmp_path / "folded")
    assert folded.config.moe.method == result["method"] == {"camex": "euclid", "camex-ties": "euclid",
                                                            "camex-dare": "dare"}[method]
    assert not any(".curvature." in n for n, _ in folded.named_parameters())
    ids = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(5))
    want, got = _logits(load_pretrained(src), ids), _logits(folded, ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    # the curvature is far from identity: without it the outputs would differ
    unfolded = load_pretrained(src)
    for _, layer in unfolded.moe_layers():
        layer.args = dataclasses.replace(layer.args, method={"camex": "euclid", "camex-ties": "ties",
                                                              "camex-dare": "dare"}[method])
    assert (_logits(unfolded, ids) - want).abs().max() / want.abs().max() > 1e-4
    assert (tmp_path / "folded" / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size


def test_fold_refuses_what_it_cannot_fold(tmp_path):
    dyn = {**TINY_MOE, "n_layers": 3, "moe": {**TINY_MOE["moe"], "every": 1, "dynamic": True}}
    _save(_tiny_model(dyn), tmp_path / "dyn")
    with pytest.raises(ConvertError, match="dynamic chain"):
        fold(tmp_path / "dyn", tmp_path / "out")
    _save(_tiny_model({**TINY_MOE, "moe": {**TINY_MOE["moe"], "method": "ties"}}), tmp_path / "ties")
    with pytest.raises(ConvertError, match="only camex"):
        fold(tmp_path / "ties", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_partials(tmp_path)


# ------------------------------------------------------------------------------------------------ upcycle


@pytest.mark.parametrize("moe", [
    {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 16},
    {"method": "camex-ties", "num_experts": 3, "every": 2, "segment_len": 16, "top_k": 2},
    {"method": "camex", "num_experts": 3, "every": 1, "segment_len": 16, "dynamic": True, "curvature_rank": 2},
    {"method": "dare", "num_experts": 2, "every": 1, "segment_len": 32, "routing": "segment"},
])
def test_upcycle_reproduces_the_dense_model(tmp_path, moe):
    dense = _tiny_model({**TINY_DENSE, "n_layers": 3}, seed=3)
    src = _save(dense, tmp_path / "dense")
    cfg = _write_json(tmp_path / "moe.json", moe)
    result = upcycle(src, cfg, tmp_path / "up")
    up = load_pretrained(tmp_path / "up")
    assert up.config.moe.method == moe["method"] and result["moe_layers"] == up.config.moe_layers
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(7))
    want, got = _logits(dense, ids), _logits(up, ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    # routers are live (random gates), so the exactness is not an accident of uniform gates
    assert all(layer.router.w_gate.abs().sum() > 0 for _, layer in up.moe_layers())
    # the curvature factors start as the layer starts them (§3: rank terms apart), from the model upcycle builds
    torch.manual_seed(result["seed"])
    built = GPT(up.config).state_dict()
    factors = [k for k in built if ".curvature." in k]
    assert all(torch.equal(up.state_dict()[k], built[k]) for k in factors)
    assert not any(layer.rank_is_degenerate() for _, layer in up.moe_layers())
    # noise breaks the symmetry
    upcycle(src, cfg, tmp_path / "noisy", noise=0.02)
    assert (_logits(load_pretrained(tmp_path / "noisy"), ids) - want).abs().max() > 1e-4


def test_upcycle_rejects_bad_inputs(tmp_path):
    dense = _save(_tiny_model(TINY_DENSE), tmp_path / "dense")
    moe_model = _save(_tiny_model(TINY_MOE), tmp_path / "moe")
    good = _write_json(tmp_path / "moe.json", TINY_MOE["moe"])
    with pytest.raises(ConvertError, match="starts from a dense model"):
        upcycle(moe_model, good, tmp_path / "o")
    with pytest.raises(ConvertError, match="does not exist"):
        upcycle(dense, tmp_path / "nope.json", tmp_path / "o")
    with pytest.raises(ConvertError, match="num_experts"):
        upcycle(dense, _write_json(tmp_path / "bad.json", {"method": "camex", "num_experts": 0}), tmp_path / "o")
    with pytest.raises(ConvertError, match="d_model"):
        upcycle(dense, _write_json(tmp_path / "full.json", {**TINY_MOE, "d_model": 64}), tmp_path / "o")
    with pytest.raises(ConvertError, match="alpha"):
        upcycle(dense, _write_json(tmp_path / "a.json", {"method": "camex", "num_experts": 3, "every": 1,
                                                          "segment_len": 16, "dynamic": True, "alpha": 0.5}),
                tmp_path / "o")
    assert not (tmp_path / "o").exists()
    _no_partials(tmp_path)


# ------------------------------------------------------------------------------------------------ consolidated format


def test_consolidated_format_checks_what_it_reads(tmp_path):
    src = _save(_tiny_model(TINY_MOE), tmp_path / "m")
    assert load_pretrained(src).training is False
    # truncated tensor file
    bad = tmp_path / "trunc"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedError, match="unreadable or truncated"):
        load_pretrained(bad)
    # a config that does not match the tensors
    bad = tmp_path / "mismatch"
    shutil.copytree(src, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["ffn_hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PretrainedError, match=r"ffn.*has shape \[64, 32\] but the config implies \[128, 32\]"):
        load_pretrained(bad)
    raw["ffn_hidden_size"], raw["moe"]["num_experts"] = 64, 2
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(PretrainedError, match=r"router.w_gate' has shape \[32, 4\] but the config implies \[32, 2\]"):
        load_pretrained(bad)
    # missing pieces
    (bad / "config.json").unlink()
    with pytest.raises(PretrainedError, match="config.json is missing"):
        load_pretrained(bad)
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    # the CLI: one line, exit 2, no traceback, nothing written
    proc = _tool("convert_checkpoint.py", "fold", "--input", tmp_path / "trunc", "--output", tmp_path / "f",
                 check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "truncated" in proc.stderr
    assert not (tmp_path / "f").exists()
    _no_partials(tmp_path)


def test_output_is_never_overwritten(tmp_path):
    src = _save(_tiny_model(TINY_MOE), tmp_path / "m")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    with pytest.raises(PretrainedError, match="already exists"):
        fold(src, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "x"


def test_load_state_into_and_global_expert_names(tmp_path):
    model = _perturb(_tiny_model(TINY_MOE, seed=4))
    src = _save(model, tmp_path / "m")
    other = _tiny_model(TINY_MOE, seed=9)
    load_state_into(other, src)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    name = "blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.1.curvature.w_in.flat"
    assert global_expert_name(name, ep_rank=1, local_count=2) == name.replace("experts.1.", "experts.3.")
    assert global_expert_name("blocks.1.ffn.base.w_in", 1, 2) == "blocks.1.ffn.base.w_in"


# ------------------------------------------------------------------------------------------------ generate


def test_padded_forward_is_exact_for_causal_routing():
    from camex_ds.cli import generate as gen_tool

    model = _perturb(_tiny_model(TINY_MOE, seed=2))
    ids = torch.randint(2, 64, (1, 64), generator=torch.Generator().manual_seed(3))
    full = _logits(model, ids)[0]
    multiple, exact = gen_tool.padding_plan(model.config)
    assert (multiple, exact) == (16, True)
    for p in (0, 5, 15, 16, 30, 47, 63):
        got = gen_tool.next_token_logits(model, ids[0, : p + 1].tolist(), 1, multiple, "cpu").double()
        assert torch.allclose(got, full[p], rtol=1e-5, atol=1e-6), p
    seg = _tiny_model({**TINY_MOE, "moe": {**TINY_MOE["moe"], "routing": "segment"}})
    assert gen_tool.padding_plan(seg.config) == (16, False)


def test_generate_cli(moe_run, tmp_path):
    out = tmp_path / "c"
    consolidate(moe_run, out)
    greedy = [_last_json(_tool("generate.py", "--model", out, "--prompt", "def f(x):", "--max_new_tokens", "6",
                               "--json")) for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0]["exact"] and len(greedy[0]["new_ids"]) <= 6
    sampled = _last_json(_tool("generate.py", "--model", out, "--prompt", "import", "--max_new_tokens", "6",
                               "--temperature", "0.9", "--top_p", "0.9", "--seed", "3", "--json"))
    assert sampled["prompt"] == "import"
    bad = _script("generate.py", "--model", out, "--prompt", "x", "--top_p", "0")
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------------------------ DeepSpeed inputs


def test_consolidate_one_process_run_matches_its_evaluation(moe_run, workspace, tmp_path):
    final = json.loads((moe_run / "final_metrics.json").read_text())
    # the checkpoints/ dir and the run dir are both accepted; --tag picks an older one
    res = _last_json(_tool("convert_checkpoint.py", "consolidate", "--checkpoint", moe_run / "checkpoints",
                           "--output", tmp_path / "c"))
    assert res["tag"] == "global_step3" and res["trained_ep_size"] == 1
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"model.safetensors", "config.json", "tokenizer.model"}
    ev = _evaluate(tmp_path / "c", workspace["corpus"], workspace["cache"], batches=2)
    assert _rel(ev["val_ppl"], final["val_ppl"]) < 1e-5
    # without --data: the run's own prepared dataset, which consolidate recorded
    recorded = _last_json(_tool("evaluate.py", "--model", tmp_path / "c", "--max_batches", "2"))
    assert recorded["val_loss"] == ev["val_loss"]
    assert Path(recorded["data"]).resolve().parent == Path(workspace["cache"]).resolve()
    assert consolidate(moe_run, tmp_path / "c2", tag="global_step2", tokenizer=tmp_path / "c" / "tokenizer.model")[
        "step"] == 2
    proc = _script("evaluate.py", "--model", tmp_path / "c2")  # an explicit tokenizer records no dataset
    assert proc.returncode == 2 and "--data is required" in proc.stderr and "Traceback" not in proc.stderr
    bf16 = consolidate(moe_run, tmp_path / "c3", dtype="bf16")
    assert bf16["trained_dtype"] == "fp32"
    assert next(load_pretrained(tmp_path / "c3").parameters()).dtype == torch.bfloat16


def _copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_consolidate_and_reshard_check_the_checkpoint(moe_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="does not exist"):
        consolidate(tmp_path / "missing", out)
    with pytest.raises(ConvertError, match=r"tag 'global_step9' does not exist .*available: global_step2, global_step3"):
        consolidate(moe_run, out, tag="global_step9")
    with pytest.raises(ConvertError, match="no DeepSpeed checkpoint"):
        consolidate(tmp_path, out)

    run = _copy_run(moe_run, tmp_path / "missing_expert")
    (run / "checkpoints/global_step3/layer_0_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ConvertError, match=r"expert file .*layer_0_expert_2_mp_rank_00_model_states.pt' is missing"):
        consolidate(run, out)

    run = _copy_run(moe_run, tmp_path / "truncated")
    f = run / "checkpoints/global_step3/mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ConvertError, match=r"mp_rank_00_model_states.pt' is unreadable or truncated"):
        consolidate(run, out)

    run = _copy_run(moe_run, tmp_path / "mismatch")
    f = run / "checkpoints/global_step3/mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=False)
    states["model_config"]["ffn_hidden_size"] = 128
    torch.save(states, f)
    with pytest.raises(ConvertError, match=r"has shape \[64, 32\] but the config implies \[128, 32\]"):
        consolidate(run, out)
    states["model_config"]["ffn_hidden_size"] = 64
    states["model_config"]["moe"]["num_experts"] = 2
    torch.save(states, f)
    with pytest.raises(ConvertError, match="expert_2.*is not an expert of the model"):
        consolidate(run, out)

    run = _copy_run(moe_run, tmp_path / "no_optimizer")
    (run / "checkpoints/global_step3/expp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert consolidate(run, tmp_path / "fine")["step"] == 3  # fp32 weights need no optimizer state
    with pytest.raises(ConvertError, match="expp_rank_0_mp_rank_00_optim_states.pt' is missing"):
        reshard(run, 2, out)
    with pytest.raises(ConvertError, match=r"ep_size=3 .*divisor of 4 experts"):
        reshard(moe_run, 3, out)
    with pytest.raises(ConvertError, match="world_size"):
        reshard(moe_run, 2, out, world_size=3)

    run = _copy_run(moe_run, tmp_path / "no_tokenizer")
    args = json.loads((run / "train_args.json").read_text())
    args.update(data=str(tmp_path / "gone"), tokenizer=None)
    args.pop("prepared_data", None)
    (run / "train_args.json").write_text(json.dumps(args))
    with pytest.raises(ConvertError, match="tokenizer"):
        consolidate(run, out)
    assert not out.exists()
    _no_partials(tmp_path)

    proc = _script("convert_checkpoint.py", "consolidate", "--checkpoint", moe_run, "--tag", "nope", "--output", out)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint tag 'nope' does not exist")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_reshard_to_more_ranks_and_back_is_lossless(moe_run, tmp_path):
    """ep 1 -> ep 2 (ZeRO 0: one torch optimizer state per EP rank) -> ep 1 gives back the same files."""
    ckpt = moe_run / "checkpoints" / "global_step3"
    res = reshard(moe_run, 2, tmp_path / "ep2")
    assert (res["from_ep_size"], res["ep_size"], res["optimizer"]) == (1, 2, "torch")
    assert sorted(p.name for p in (tmp_path / "ep2" / "global_step3").glob("expp_rank_*")) == [
        "expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"]
    for rank in (0, 1):  # each EP rank's half of the factors, in their own group, with the run's lr scale
        groups = torch.load(tmp_path / f"ep2/global_step3/expp_rank_{rank}_mp_rank_00_optim_states.pt",
                            weights_only=False)["optimizer"]["param_groups"]
        assert [(g.get("lr_scale"), len(g["params"])) for g in groups if "lr_scale" in g] == [(LR_SCALE, 2 * 2)]
    reshard(tmp_path / "ep2", 1, tmp_path / "ep1")
    _assert_same_checkpoint(ckpt, tmp_path / "ep1" / "global_step3")
    assert (tmp_path / "ep1" / "latest").read_text() == "global_step3"


def test_bf16_zero1_run_reshard_round_trip_and_master_weights(workspace, tmp_path):
    """bf16 + ZeRO 1 (the bf16_zero_pp_rank files): ep 1 -> ep 2 on 2 ranks -> ep 1 is lossless, and an fp32
    consolidation takes the fp32 master weights, whose bf16 rounding is what the model held."""
    run = tmp_path / "bf16_run"
    _train(run, _write_json(tmp_path / "m.json", {**TINY_MOE, "moe": {**TINY_MOE["moe"], "num_experts": 2}}),
           _ds_config(tmp_path / "ds.json", stage=1, bf16=True), workspace["corpus"], workspace["cache"],
           "--max_steps", "2", "--save_interval", "2", "--eval_interval", "2", "--eval_batches", "1")
    tag = run / "checkpoints" / "global_step2"
    assert (tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    reshard(run, 2, tmp_path / "ep2", world_size=2)
    assert (tmp_path / "ep2/global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    reshard(tmp_path / "ep2", 1, tmp_path / "ep1")
    _assert_same_checkpoint(tag, tmp_path / "ep1" / "global_step2")
    fp32 = consolidate(run, tmp_path / "c32")
    assert fp32["weights"] == "fp32 master copies" and fp32["trained_dtype"] == "bf16"
    consolidate(run, tmp_path / "c16", dtype="bf16")
    masters = load_pretrained(tmp_path / "c32").state_dict()
    held = load_pretrained(tmp_path / "c16").state_dict()
    assert masters["wte.weight"].dtype == torch.float32 and held["wte.weight"].dtype == torch.bfloat16
    for name in held:
        assert torch.equal(masters[name].to(torch.bfloat16), held[name]), name


def test_dense_run_consolidate_upcycle_same_perplexity(dense_run, workspace, tmp_path):
    final = json.loads((dense_run / "final_metrics.json").read_text())
    consolidate(dense_run, tmp_path / "dense")
    dense_eval = _evaluate(tmp_path / "dense", workspace["corpus"], workspace["cache"])
    assert _rel(dense_eval["val_ppl"], final["val_ppl"]) < 1e-5
    moe = _write_json(tmp_path / "moe.json", {"method": "camex", "num_experts": 4, "every": 2, "segment_len": 16})
    res = _last_json(_tool("convert_checkpoint.py", "upcycle", "--input", tmp_path / "dense", "--moe_config", moe,
                           "--output", tmp_path / "up"))
    assert res["method"] == "camex" and res["moe_layers"] == [1]
    up_eval = _evaluate(tmp_path / "up", workspace["corpus"], workspace["cache"])
    assert _rel(up_eval["val_ppl"], dense_eval["val_ppl"]) < 1e-5
    with pytest.raises(ConvertError, match="dense"):
        reshard(dense_run, 1, tmp_path / "r")


# ------------------------------------------------------------------------------------------------ slow: EP=2, ZeRO-2


def _assert_same(a, b, path=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), path
        _assert_same(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*.pt") if not p.name.startswith("rng_state"))
    assert files == sorted(p.name for p in b.glob("*.pt") if not p.name.startswith("rng_state"))
    assert (b / "manifest.json").is_file()  # reshard's output verifies like a saved checkpoint
    for name in files:
        _assert_same(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name)
