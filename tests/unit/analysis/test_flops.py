"""`camex_ds.analysis.flops` (spec §8): analytic FLOPs per token against FlopCounterMode on the real model,
forward and training step; parameter counts against the model; peaks (`camex_ds.analysis.hardware`), MFU and
the `camex-flops` CLI (`tools/flops.py`)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camex_ds.analysis import flops as fl
from camex_ds.analysis.measured import measure_flops_per_token
from camex_ds.analysis import hardware as hw
from camex_ds.cli import flops as flops_cli
from camex_ds.config import ConfigError, ModelConfig
from camex_ds.model import build_model

REPO = Path(__file__).resolve().parents[3]
BASE = dict(d_model=32, n_layers=4, n_heads=2, ffn_hidden_size=96, seq_len=32, vocab_size=97)
BATCH = 2
LLAMA = dict(BASE, architecture="llama", activation="swiglu", n_heads=4, n_kv_heads=2, norm_eps=1e-6,
             rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=16))


def moe(**kw):
    m = dict(num_experts=4, segment_len=8, every=2, noisy_gating=False)
    m.update(kw)
    return m


CONFIGS = {
    "dense": dict(BASE),
    "smoe-top2": dict(BASE, moe=moe(method="smoe", top_k=2, backend="deepspeed")),
    # N=3 and capacity_factor 1.5: ceil() pads the capacity buffers beyond k tokens per token.
    "smoe-top1-padded": dict(BASE, moe=moe(method="smoe", top_k=1, num_experts=3, capacity_factor=1.5,
                                           backend="deepspeed")),
    "euclid": dict(BASE, moe=moe(method="euclid", every=1)),
    "camex-R2-every2": dict(BASE, moe=moe(method="camex", curvature_rank=2)),
    "camex-dynamic": dict(BASE, moe=moe(method="camex", dynamic=True, every=1)),
    "camex-dare-dynamic-chains-of-2": dict(BASE, moe=moe(method="camex-dare", dynamic=True, every=1, chain_length=2)),
    "swiglu-camex-ties": dict(BASE, activation="swiglu", moe=moe(method="camex-ties")),
    "camex-dare-sequence-top2": dict(BASE, moe=moe(method="camex-dare", routing="sequence", top_k=2)),
    # The llama family: grouped-query attention (4 query heads over 2 key/value heads), rotary positions,
    # RMSNorm, an untied head, Qwen2's q/k/v biases; and GPT-2's biases and tanh GELU in the gpt family.
    "llama-gqa-dense": dict(LLAMA),
    "llama-gqa-camex-untied-qkv-bias": dict(LLAMA, tie_embeddings=False, bias="qkv", moe=moe(method="camex")),
    "llama-gqa-smoe-top2": dict(LLAMA, moe=moe(method="smoe", top_k=2, backend="deepspeed")),
    "llama-gqa-dynamic": dict(LLAMA, moe=moe(method="camex-ties", dynamic=True, every=1)),
    "gpt2-biases-camex": dict(BASE, bias="all", activation="gelu_tanh", moe=moe(method="camex")),
    "gpt2-biases-smoe-top1": dict(BASE, bias="all", activation="gelu_tanh", moe=moe(method="smoe", top_k=1)),
}


def rel(a, b):
    return abs(a - b) / b


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_match_flop_counter(name):
    cfg = ModelConfig.from_dict(CONFIGS[name])
    analytic = fl.flops_per_token(cfg, micro_batch_tokens=BATCH * cfg.seq_len)
    measured = measure_flops_per_token(cfg, batch=BATCH)
    assert rel(analytic["forward"], measured["forward"]) < 0.02, (analytic["components"], measured["by_op"])
    # The accounting follows the code op by op, so in fact it is exact.
    assert analytic["forward"] == pytest.approx(measured["forward"], rel=1e-9)


@pytest.mark.parametrize("name", ["camex-R2-every2", "camex-dynamic", "smoe-top2", "swiglu-camex-ties",
                                  "llama-gqa-camex-untied-qkv-bias", "gpt2-biases-camex"])
def test_train_flops_match_flop_counter(name):
    """Training mode (router noise on) forward + backward of loss + aux_loss: the backward accounting (2x plain
    GEMMs, 2.5x SDPA, 1x the top-2 gate einsums, the custom backwards of _MergedLinear and _Curvature) holds."""
    raw = json.loads(json.dumps(CONFIGS[name]))
    if raw["moe"]["method"] != "smoe":
        raw["moe"]["noisy_gating"] = True
    cfg = ModelConfig.from_dict(raw)
    analytic = fl.flops_per_token(cfg, micro_batch_tokens=BATCH * cfg.seq_len)
    measured = measure_flops_per_token(cfg, batch=BATCH, train=True)
    assert rel(analytic["forward_train"], measured["forward"]) < 0.02
    assert rel(analytic["backward"], measured["backward"]) < 0.02
    assert rel(analytic["train"], measured["train"]) < 0.02
    assert analytic["train"] == pytest.approx(measured["train"], rel=1e-9)
    mult = measured["backward"] / measured["forward"]
    assert analytic["backward_multiplier"] == pytest.approx(mult, rel=1e-9)
    assert 2.0 < mult < 3.0  # above 2: SDPA, merge and curvature recompute in their backward


def test_static_merge_and_curvature_backward_terms():
    """_MergedLinear: forward one ((N+1)-row, base folded in) merge GEMM per segment; backward recomputes it,
    then the task+base gradient ((N+1) rows) and the gate gradient (N rows). _Curvature: backward recomputes
    three mode products (D, C, B) and runs two GEMMs per factor."""
    cfg = ModelConfig.from_dict(CONFIGS["euclid"])
    merge = fl.flops_per_token(cfg, micro_batch_tokens=64)["components"]["merge"]
    d, h, n, t, layers = 32, 96, 4, 8, 4
    p = 2 * d * h
    assert merge["forward"] == pytest.approx(layers * 2 * (n + 1) * p / t)
    assert merge["backward"] == pytest.approx(layers * (2 * (n + 1) + 2 * (n + 1) + 2 * n) * p / t)
    curved = ModelConfig.from_dict(CONFIGS["camex-R2-every2"])
    curv = fl.flops_per_token(curved, micro_batch_tokens=64)["components"]["curvature"]
    (o1, o2), (i1, i2) = fl.kron_factor_shape(h), fl.kron_factor_shape(d)
    # w_in is [h, d], w_out is [d, h]: out/in factor roles swap.
    # w_in recomputes D, C, B = i2, i1, o2; w_out (in = h) recomputes o2, o1, i2.
    back = 2 * 2 * (4 * (o1 + o2 + i1 + i2) + (i2 + i1 + o2) + (o2 + o1 + i2)) * d * h
    assert curv["backward"] == pytest.approx(len(curved.moe_layers) * n * back / 64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_counts_match_model(name):
    cfg = ModelConfig.from_dict(CONFIGS[name])
    counts = fl.param_counts(cfg)
    assert counts["total"] == build_model(cfg).num_parameters()
    dense = fl.param_counts(cfg.replace(moe=None))["total"]
    p = 2 * 32 * 96 * (1.5 if cfg.activation == "swiglu" else 1) + (96 + 32 if cfg.bias == "all" else 0)
    if cfg.moe is None:
        assert counts["active"] == counts["total"]
    elif cfg.moe.method == "smoe":
        router = 32 * cfg.moe.num_experts
        assert counts["active"] == dense + len(cfg.moe_layers) * (router + (cfg.moe.k - 1) * p)
    else:
        router = 32 * cfg.moe.routed_experts * (2 if cfg.moe.noisy_gating else 1)
        assert counts["active"] == dense + len(cfg.moe_layers) * router
    vocab_matrices = 97 * 32 * (1 if cfg.tie_embeddings else 2)
    positions = 32 * 32 if cfg.architecture == "gpt" else 0
    assert counts["total_non_embedding"] == counts["total"] - vocab_matrices - positions


def test_grouped_query_attention_flops():
    """The fused q/k/v projection shrinks with fewer key/value heads; SDPA's count (query heads) does not."""
    mha = ModelConfig.from_dict(dict(CONFIGS["llama-gqa-dense"], n_kv_heads=None))
    gqa = ModelConfig.from_dict(CONFIGS["llama-gqa-dense"])
    d, kv, layers = 32, 2 * 8, 4
    saved = fl.flops_per_token(mha)["attention"] - fl.flops_per_token(gqa)["attention"]
    assert saved == layers * 2 * d * 2 * (d - kv)


def test_curvature_scales_with_rank_experts_ep_and_tokens():
    cfg = ModelConfig.from_dict(dict(BASE, moe=moe(method="camex", num_experts=4)))
    one = fl.flops_per_token(cfg, micro_batch_tokens=64)["curvature"]
    d, h = 32, 96
    sums = sum(sum(fl.kron_factor_shape(o)) + sum(fl.kron_factor_shape(i)) for o, i in ((h, d), (d, h)))
    assert one == pytest.approx(len(cfg.moe_layers) * 4 * 2 * 1 * sums * d * h / 64)
    assert fl.flops_per_token(cfg.with_moe(curvature_rank=3), micro_batch_tokens=64)["curvature"] == \
        pytest.approx(3 * one)
    assert fl.flops_per_token(cfg.with_moe(ep_size=2), micro_batch_tokens=64)["curvature"] == pytest.approx(one / 2)
    assert fl.flops_per_token(cfg, micro_batch_tokens=128)["curvature"] == pytest.approx(one / 2)
    assert fl.flops_per_token(cfg.with_moe(method="euclid"), micro_batch_tokens=64)["curvature"] == 0


def test_dynamic_term_per_segment_or_through_the_span():
    """Segment by segment (TIES, whose election is per segment): n·curvature per segment, not amortised over the
    batch. Through the span (camex here): per-step images, so accumulation divides that part."""
    ties = ModelConfig.from_dict(dict(CONFIGS["camex-dynamic"], moe=moe(method="camex-ties", dynamic=True, every=1)))
    a = fl.flops_per_token(ties, micro_batch_tokens=64)
    b = fl.flops_per_token(ties, micro_batch_tokens=256, accumulation=4)
    assert a["dynamic"] == pytest.approx(b["dynamic"])  # not amortised over the batch
    per_expert = fl.curvature_flops_per_expert(ties)
    layers_after_first = len(ties.moe_layers) - 1
    assert a["dynamic"] == pytest.approx(layers_after_first * 3 * per_expert / 8)  # N-1 = 3 experts, T = 8
    assert fl.flops_per_token(ties.with_moe(segment_len=16), micro_batch_tokens=64)["dynamic"] == \
        pytest.approx(a["dynamic"] / 2)
    assert a["elementwise"]["dynamic_merge"] > 0  # the per-segment merge is elementwise: reported, not counted
    camex = ModelConfig.from_dict(CONFIGS["camex-dynamic"])
    one, four = (fl.flops_per_token(camex, micro_batch_tokens=64, accumulation=k)["components"]["dynamic"]
                 for k in (1, 4))
    assert 0 < four["train"] < one["train"] and four["forward"] == one["forward"]  # eval: every forward
    assert one["train"] < fl.flops_per_token(ties, micro_batch_tokens=64)["components"]["dynamic"]["train"]


@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step_flops_match_flop_counter_with_accumulation(name, accumulation):
    """One optimizer step of `accumulation` micro-batches: the per-step work (curvature, span images) is counted
    once, at the step's first micro-batch, and its backward once, at the boundary."""
    cfg = ModelConfig.from_dict(CONFIGS[name])
    analytic = fl.flops_per_token(cfg, micro_batch_tokens=BATCH * cfg.seq_len, accumulation=accumulation)
    measured = measure_flops_per_token(cfg, batch=BATCH, train=True, accumulation=accumulation)
    assert analytic["forward_train"] == pytest.approx(measured["forward"], rel=1e-9)
    assert analytic["train"] == pytest.approx(measured["train"], rel=1e-9)


def test_smoe_capacity_follows_deepspeed():
    from deepspeed.moe.sharded_moe import _capacity

    for n, k, cf, tokens in [(4, 2, 1.0, 64), (3, 1, 1.5, 64), (8, 2, 1.25, 40), (16, 1, 1.0, 16)]:
        cfg = ModelConfig.from_dict(dict(BASE, moe=moe(method="smoe", num_experts=n, top_k=k, capacity_factor=cf)))
        gates = torch.zeros(tokens, n)
        want = int(_capacity(gates, torch.tensor(cf * k), torch.tensor(fl.SMOE_MIN_CAPACITY)))
        assert fl.smoe_capacity(cfg, tokens) == want


def test_components_sum_and_result_shape():
    cfg = ModelConfig.from_dict(CONFIGS["camex-dynamic"])
    f = fl.flops_per_token(cfg)
    assert f["micro_batch_tokens"] == cfg.seq_len and f["accumulation"] == 1  # default: one sequence, one forward
    comps = f["components"]
    assert f["forward"] == pytest.approx(sum(c["forward"] for c in comps.values()))
    assert f["train"] == pytest.approx(sum(c["train"] for c in comps.values()))
    assert set(comps) == set(fl.COMPONENTS)
    for name in fl.COMPONENTS:
        assert f[name] == comps[name]["forward"]
    assert f["embeddings"] == 0 and f["dense_ffn"] == 0  # every layer is a MoE layer here
    assert fl.flops_per_token(cfg.replace(moe=None))["merge"] == 0


def test_chain_length_restarts_the_chain():
    cfg = ModelConfig.from_dict(CONFIGS["camex-dare-dynamic-chains-of-2"])
    assert cfg.chain_starts == [True, False, True, False]
    model = build_model(cfg)
    assert [layer.base is not None for _, layer in model.moe_layers()] == cfg.chain_starts
    with pytest.raises(ConfigError, match="chain_length"):
        ModelConfig.from_dict(dict(BASE, moe=moe(method="camex", chain_length=2)))


def test_bad_arguments_raise_config_errors():
    cfg = ModelConfig.from_dict(CONFIGS["euclid"])
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        fl.flops_per_token(cfg, micro_batch_tokens=40)
    with pytest.raises(ConfigError, match="segment_len"):
        fl.flops_per_token(cfg, seq_len=36)
    with pytest.raises(ConfigError, match="vocab_size"):
        fl.flops_per_token(cfg.replace(vocab_size=None))
    assert fl.flops_per_token(cfg.replace(vocab_size=None), vocab_size=97)["forward"] == \
        pytest.approx(fl.flops_per_token(cfg)["forward"])


def test_ep_bytes_use_the_layer_formula():
    from camex_ds.moe.comm import ep_bytes_per_layer as layer_bytes

    cfg = ModelConfig.from_dict(dict(BASE, moe=moe(method="camex", ep_size=2)))
    one = layer_bytes(num_experts=4, ep_size=2, matrix_shapes={"w_in": (96, 32), "w_out": (32, 96)})["total"]
    assert fl.ep_bytes_per_step(cfg) == len(cfg.moe_layers) * one
    assert fl.ep_bytes_per_step(cfg.with_moe(ep_size=1)) == 0


def test_gpu_table_matching_and_peaks(monkeypatch):
    assert hw.match_gpu("NVIDIA H100 80GB HBM3")[0] == "H100 SXM"
    assert hw.match_gpu("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert hw.match_gpu("NVIDIA GH200 480GB")[0] == "GH200"
    assert hw.match_gpu("NVIDIA A100-SXM4-80GB")[0] == "A100"
    assert hw.match_gpu("NVIDIA A10G")[0] == "A10G"
    assert hw.match_gpu("NVIDIA L40S")[0] == "L40S"
    assert hw.match_gpu("Tesla V100-SXM2-16GB")[0] == "V100 SXM2"
    assert hw.match_gpu("NVIDIA GeForce RTX 4090") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert hw.peak_flops("cuda", "bf16") == pytest.approx(989.5e12)
    assert hw.peak_flops("cuda", "tf32") == pytest.approx(494.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ValueError, match="bf16"):
        hw.peak_flops("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    with pytest.raises(ValueError, match="override"):
        hw.peak_flops("cuda", "bf16")
    assert hw.peak_flops("cuda", "bf16", override=1e14) == 1e14
    with pytest.raises(ValueError, match="dtype"):
        hw.peak_flops("cpu", "fp8")


def test_cpu_probe_and_mfu(monkeypatch):
    monkeypatch.setattr(hw, "_CPU_PEAK_CACHE", {})
    peak = hw.cpu_matmul_peak("fp32", size=256, seconds=0.05)
    assert 1e8 < peak < 1e14
    assert hw.cpu_matmul_peak("fp32", size=256, seconds=0.05) == peak  # cached
    assert fl.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert fl.achieved_flops(1000.0, 6e9) == pytest.approx(6e12)


def test_tool_json_and_table(tmp_path, capsys):
    tool = flops_cli
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CONFIGS["camex-R2-every2"]))
    assert tool.main(["--model_config", str(path), "--micro_batch_tokens", "64", "--json", "--sweep", "N=2,4"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [r["variant"] for r in out["variants"]]
    assert names[1:] == ["dense", "smoe top-2", "euclid", "dynamic camex"]
    dense = out["variants"][1]
    assert dense["overhead_pct"] == 0 and dense["params_active"] == dense["params_total"]
    cfg = ModelConfig.from_dict(CONFIGS["camex-R2-every2"])
    assert out["variants"][0]["train"] == pytest.approx(fl.flops_per_token(cfg, micro_batch_tokens=64)["train"])
    assert [r["N"] for r in out["sweeps"][0]["rows"]] == [2, 4]
    assert tool.main(["--model_config", json.dumps(CONFIGS["smoe-top2"]), "--sweep", "ep=1,2,3"]) == 0
    text = capsys.readouterr().out
    assert "| variant" in text and "smoe top-2" in text and "n/a" in text  # ep=3 divides neither 4 nor 3


def test_tool_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(BASE, moe=moe(num_experts=0))))
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "flops.py"), "--model_config", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flops.py")]
    assert len(lines) == 1 and "num_experts" in lines[0]
    assert proc.stdout == "" or "Traceback" not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_tool_errors_in_process(capsys):
    tool = flops_cli
    assert tool.main(["--model_config", "/nonexistent/cfg.json"]) == 2
    assert tool.main(["--model_config", json.dumps(CONFIGS["euclid"]), "--tokenizer", "/nonexistent.model"]) == 2
    assert tool.main(["--model_config", json.dumps(CONFIGS["euclid"]), "--sweep", "Q=1"]) == 2
    assert tool.main(["--model_config", "{not json"]) == 2
    err = capsys.readouterr().err
    assert err.count("flops.py: error:") == 4
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0


def test_tool_without_vocab_size_assumes_the_launcher_default(capsys):
    tool = flops_cli
    assert tool.main(["--model_config", json.dumps(dict(BASE, vocab_size=None)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vocab_size_assumed"] and out["config"]["vocab_size"] == tool.DEFAULT_VOCAB
    assert tool.main(["--model_config", json.dumps(dict(BASE, vocab_size=None))]) == 0
    assert "not in the config" in capsys.readouterr().out
