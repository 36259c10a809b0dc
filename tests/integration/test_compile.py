"""A capturable merge layer and compiled training (issue: a GPU step that is not launch-bound).

The merge layer makes no host synchronisation (no `.item()`, no data-dependent shapes, no branch on a tensor
value), so `torch.compile(fullgraph=True)` traces its forward and backward whole; a CUDA graph can then capture
it. The compiled model (inductor's CPU backend here) gives eager's loss and gradients, and so does a compiled
2-rank expert-parallel DeepSpeed step under ZeRO 0, 1 and 2."""
import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from camex_ds.model import build_model
from camex_ds.moe import CAMExMoE, MergeChain

from tests import distributed

MERGE_METHODS = ["euclid", "ties", "dare", "camex", "camex-ties", "camex-dare"]


def _layers(method, dynamic):
    torch.manual_seed(0)
    layers = [CAMExMoE(16, 24, 4, method=method, segment_len=4, dynamic=dynamic, chain_start=i == 0, alpha=0.5)
              for i in range(2 if dynamic else 1)]
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if ".curvature." in name:
                    p.add_(0.1 * torch.randn_like(p))
    return layers


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merge_layer_traces_whole_forward_and_backward(method, dynamic):
    """Training mode (router noise, DARE masks): one graph, no break; the backward traces too (aot_eager)."""
    layers = [layer.train() for layer in _layers(method, dynamic)]

    def loss(x):
        chain, out, aux = MergeChain(), x, 0.0
        for layer in layers:
            out, layer_aux, _, chain = layer(out, chain)
            aux = aux + layer_aux
        return out.square().mean() + aux

    x = torch.randn(2, 16, 16, requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch.compile(loss, backend="aot_eager", fullgraph=True)(x).backward()
    assert all(p.grad is not None for layer in layers for p in layer.parameters() if p.requires_grad)


BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden_size=64, seq_len=32)


def _moe(**kw):
    return dict(num_experts=4, every=1, segment_len=8, alpha=0.5, **kw)


MODELS = {
    "dense": BASE,
    "smoe": dict(BASE, moe=_moe(method="smoe", backend="deepspeed")),
    "euclid": dict(BASE, moe=_moe(method="euclid")),
    "camex": dict(BASE, moe=_moe(method="camex")),
    "camex-ties": dict(BASE, moe=_moe(method="camex-ties")),
    "dynamic-camex": dict(BASE, moe=dict(_moe(method="camex", dynamic=True), num_experts=5)),
}


@pytest.mark.slow  # inductor compiles each model for a few seconds to half a minute
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_matches_eager(name):
    torch.manual_seed(0)
    eager = build_model(MODELS[name]).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))

    def step(model):
        torch.manual_seed(3)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    # router noise must come from eager's RNG stream; inductor's own patch() restores the setting afterwards
    # (a monkeypatch undo deletes the attribute from inductor's config module, failing every later test here)
    with torch._inductor.config.patch(fallback_random=True):
        (loss_e, grads_e), (loss_c, grads_c) = step(eager), step(compiled)
    assert set(grads_c) == set(grads_e)
    assert ((loss_c - loss_e).abs() / loss_e.abs()).item() < 1e-5
    err = {n: ((grads_c[n] - grads_e[n]).norm() / grads_e[n].norm().clamp_min(1e-30)).item() for n in grads_e}
    worst = max(err, key=err.get)
    assert err[worst] < 1e-5, f"{worst}: rel err {err[worst]:.2e}"


@pytest.mark.slow
def test_compiled_expert_parallel_step_matches_eager(tmp_path):
    script = "tests.dist.ep_step"
    distributed.python(script, "--out", tmp_path, "--layouts", "ref", "--methods", "camex")
    distributed.ranks_ok(script, "--out", tmp_path, "--layouts", "ep2", "--methods", "camex", "--compile")
    want = torch.load(tmp_path / "ref_rank0.pt")
    parts = [torch.load(tmp_path / f"ep2_compiled_rank{r}.pt") for r in range(2)]
    for key in want:
        got = {**parts[1][key]["after"], **parts[0][key]["after"]}
        err = max(((got[n] - w).norm() / w.norm()).item() for n, w in want[key]["after"].items())
        assert err < 1e-5, f"{key}: rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["euclid", "camex", "camex-ties", "camex-dare", "dynamic-camex"])
def test_training_forward_and_backward_make_no_host_sync_on_cuda(method):
    """What a CUDA graph needs: the model's training forward and backward never wait for the GPU."""
    name = method if method in MODELS else None
    raw = MODELS[name] if name else dict(BASE, moe=_moe(method=method))
    torch.manual_seed(0)
    model = build_model(raw).cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, 64, (2, 32), device="cuda")
    out = model(ids, labels=ids)  # warm-up: lazy initialisation may synchronise once
    (out.loss + out.aux_loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
