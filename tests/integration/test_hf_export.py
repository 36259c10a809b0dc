"""Issue 25: every model camex_ds trains exports to Hugging Face, with its own modeling code where no stock
architecture computes it, and comes back through import-hf unchanged.

Tiny models of each merge method in both families are built in-process, their experts moved apart, their
curvature factors far from the identity and their routers sharp enough that the gates matter; the exported
folder is loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from camex_ds.ckpt.format import load_pretrained, read_weights, save_pretrained  # noqa: E402
from camex_ds.ckpt.hf import export_hf, import_hf  # noqa: E402
from camex_ds.cli import convert as convert_cli  # noqa: E402
from camex_ds.cli.generate import next_token_logits, padding_plan  # noqa: E402
from camex_ds.config import ModelConfig  # noqa: E402
from camex_ds.model import GPT  # noqa: E402

VOCAB, SEGMENT, SEQ_LEN = 50, 4, 32
FAMILY = {
    "gpt": {"architecture": "gpt", "activation": "gelu", "bias": "all", "tie_embeddings": True},
    "llama": {"architecture": "llama", "activation": "swiglu", "n_kv_heads": 1, "bias": "qkv", "tie_embeddings": False,
              "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}
CASES = {  # name -> moe options
    "euclid": {"method": "euclid"},
    "ties": {"method": "ties"},
    "dare": {"method": "dare", "alpha": 0.5},
    "camex": {"method": "camex", "curvature_rank": 2},
    "camex-ties": {"method": "camex-ties", "top_k": 2},
    "camex-dare": {"method": "camex-dare"},
    "dynamic-camex": {"method": "camex", "dynamic": True, "curvature_rank": 2},
    "dynamic-ties-chain2": {"method": "camex-ties", "dynamic": True, "chain_length": 2},
    # DeepSpeed's gate equals the export when it drops no token (capacity >= tokens) and draws no noise (top-2)
    "smoe-top1": {"method": "smoe", "top_k": 1, "capacity_factor": 4.0},
    "smoe-top2": {"method": "smoe", "top_k": 2, "capacity_factor": 4.0},
}


def _model(family: str, moe: dict, seed: int = 0, gate_scale: float = 50.0) -> GPT:
    raw = {"d_model": 32, "n_layers": 3, "n_heads": 2, "ffn_hidden_size": 48, "seq_len": SEQ_LEN, "vocab_size": VOCAB,
           **FAMILY[family], "moe": {"num_experts": 4, "every": 1, "segment_len": SEGMENT, **moe}}
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_dict(raw)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # what training does: experts apart, curvature away from I, gates far from uniform
        for name, p in model.named_parameters():
            if ".curvature." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif "deepspeed_experts" in name or ".bias" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("w_gate", "gate.wg.weight")):
                p.mul_(gate_scale)
            elif name in ("wte.weight", "lm_head.weight"):
                p.mul_(4)
    for _, layer in model.moe_layers():
        if moe["method"] == "smoe":
            layer.deepspeed_moe.gate.top2_2nd_expert_sampling = False
    return model


def _save(model: GPT, folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_pretrained(folder, model.state_dict(), model.config)
    return folder


def _load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def _our_greedy(model: GPT, prompt: list, new_tokens: int) -> list:
    """camex-generate's greedy decoding: the full padded forward for every new token."""
    multiple, exact = padding_plan(model.config)
    assert exact
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(next_token_logits(model, ids, 0, multiple, "cpu").argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_ours_logits_generate_and_round_trip(family, case, tmp_path, single_thread):
    model = _model(family, CASES[case])
    src = _save(model, tmp_path / "src")
    result = export_hf(src, tmp_path / "hf")
    assert result["model_type"] == "camex" and result["architecture"] == "CamexForCausalLM"
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "configuration_camex.py", "modeling_camex.py", "model.safetensors", "camex_ds.safetensors",
            "README.md"} <= files
    assert "import camex_ds" not in (tmp_path / "hf" / "modeling_camex.py").read_text()
    hf = _load(tmp_path / "hf")
    assert type(hf).__name__ == "CamexForCausalLM"

    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 1.0  # large enough for the comparison to mean something
    assert (ours - theirs).abs().max().item() < 1e-5

    prompt, new = ids[0, :5].tolist(), 2 * SEGMENT + 3
    with torch.no_grad():
        prompt_ids = torch.tensor([prompt])
        out = hf.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new, do_sample=False,
                          use_cache=True, eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == _our_greedy(model, prompt, new)

    import_hf(tmp_path / "hf", tmp_path / "back")
    back, state = read_weights(tmp_path / "back"), model.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["moe"] == model.config.to_dict()["moe"]


def test_incremental_decoding_merges_once_per_segment(tmp_path, single_thread):
    """Prefill, then token by token through the cache: the logits of the full forward, and a merge layer builds
    new weights only when a segment completes."""
    model = _model("llama", CASES["dynamic-camex"])
    export_hf(_save(model, tmp_path / "src"), tmp_path / "hf")
    hf = _load(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    layer = hf.blocks[1].ffn
    merges = []
    original = layer.merge
    layer.merge = lambda *a: merges.append(1) or original(*a)
    with torch.no_grad():
        full = hf(ids).logits
        merges.clear()
        out = hf(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 30):
            out = hf(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert len(merges) == 1 + 30 // SEGMENT  # segment 0, then one per completed segment
    with torch.no_grad():  # beam search reorders the cache's segment states with its beams
        beams = [hf.generate(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), max_new_tokens=2 * SEGMENT + 3,
                             num_beams=3, do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=0)
                 for use_cache in (True, False)]
    assert torch.equal(*beams)
    cache_class = sys.modules[type(hf).__module__].CamexCache
    with torch.no_grad():  # a prompt prefilled in chunks that straddle segment boundaries
        chunked = [hf.generate(ids[:, :11], attention_mask=torch.ones_like(ids[:, :11]), max_new_tokens=SEGMENT + 1,
                               do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
                   for kw in ({}, {"prefill_chunk_size": 3, "cache": cache_class()})]
    assert torch.equal(*chunked)


def _cli_error(capsys, *args) -> str:
    code = convert_cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("routing", [{"routing": "segment"}, {"routing": "sequence"},
                                     {"first_segment": "self-detached"},
                                     {"routing": "segment", "dynamic": True, "method": "camex-ties"}])
def test_routings_whose_gates_see_their_segment_score_whole_segments(routing, tmp_path, single_thread):
    """Their exported model computes our logits on whole segments, and refuses to decode with a cache (a segment's
    gates see its own later tokens) or to score a partial segment."""
    model = _model("llama", {"method": "camex", **routing})
    result = export_hf(_save(model, tmp_path / "src"), tmp_path / "hf")
    assert "cannot decode token by token" in result["notes"][0]
    hf = _load(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-5
        with pytest.raises(ValueError, match="cannot decode token by token"):
            hf.generate(ids[:, :SEGMENT], attention_mask=torch.ones_like(ids[:, :SEGMENT]), max_new_tokens=2)
        if routing.get("routing") != "sequence":
            with pytest.raises(ValueError, match="must hold whole segments: length 5"):
                hf(ids[:, :5])


def test_bad_input_is_one_line(tmp_path, capsys):
    src = _save(_model("gpt", CASES["camex"]), tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw["moe"]["method"] = "camex-foo"
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps(raw))
    (unknown / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    err = _cli_error(capsys, "export-hf", "--input", unknown, "--output", tmp_path / "out")
    assert "moe.method='camex-foo' is invalid" in err and "camex-ties" in err
    export_hf(src, tmp_path / "hf")
    err = _cli_error(capsys, "export-hf", "--input", tmp_path / "hf", "--output", tmp_path / "out")
    assert "not a consolidated model" in err or "format" in err
    assert not (tmp_path / "out").exists()
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["blocks.1.ffn.task.w_in"] += 0.01  # fine-tuned as a Hugging Face model
    save_file(tensors, str(weights))
    err = _cli_error(capsys, "import-hf", "--input", tmp_path / "hf", "--output", tmp_path / "out")
    assert "tensor 'blocks.1.ffn.task.w_in'" in err and "changed after export" in err
    training = tmp_path / "hf" / "camex_ds.safetensors"
    training.write_bytes(training.read_bytes()[:100])
    assert "unreadable or truncated" in _cli_error(capsys, "import-hf", "--input", tmp_path / "hf", "--output",
                                                   tmp_path / "out")
    training.unlink()
    assert "lacks camex_ds.safetensors" in _cli_error(capsys, "import-hf", "--input", tmp_path / "hf", "--output",
                                                      tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,case", [("llama", "camex"), ("gpt", "dynamic-camex")])
def test_bf16_export_loads_and_matches_within_bf16_rounding(family, case, tmp_path, single_thread):
    """Smooth gates here: with sharp ones, bf16 rounding flips routing decisions in our own model already."""
    model = _model(family, CASES[case], gate_scale=1.0)
    src = tmp_path / "src"
    src.mkdir()
    save_pretrained(src, model.state_dict(), model.config, dtype="bf16")
    assert export_hf(src, tmp_path / "hf")["dtype"] == "bf16"
    hf = _load(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = load_pretrained(src)(ids).logits.float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() < 3e-2 * ours.abs().max()


def test_exported_folder_runs_without_camex_ds(tmp_path):
    """Only torch and transformers: camex_ds is made unimportable in a fresh interpreter."""
    model = _model("gpt", CASES["dynamic-ties-chain2"])
    export_hf(_save(model, tmp_path / "src"), tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ours.pt")
    script = f"""
import sys
sys.modules["camex_ds"] = None  # any import of it fails
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "hf")!r}, trust_remote_code=True).eval()
ours = torch.load({str(tmp_path / "ours.pt")!r})
with torch.no_grad():
    diff = (model(ours["ids"]).logits - ours["logits"]).abs().max().item()
assert not any(m.startswith("camex_ds") for m in sys.modules if sys.modules[m] is not None)
print("max diff", diff)
assert diff < 1e-5, diff
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dense_gpt_with_swiglu_has_no_gpt2_equivalent_and_gets_its_own_code(tmp_path, single_thread):
    raw = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 48, "seq_len": SEQ_LEN, "vocab_size": VOCAB,
           "activation": "swiglu"}
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_dict(raw)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)
    result = export_hf(_save(model, tmp_path / "src"), tmp_path / "hf")
    assert result["architecture"] == "CamexForCausalLM" and not (tmp_path / "hf" / "camex_ds.safetensors").exists()
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - _load(tmp_path / "hf")(ids).logits).abs().max() < 1e-5
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = read_weights(tmp_path / "back")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
