"""`camex_ds.moe.CAMExMoE` (spec §2–§4, §6) in one process: against the float64 reference, camex* == Euclidean
twin at init, parameter naming, gradchecks and argument errors. Its routing (causality, the aux loss):
test_router.py; the dynamic chain: test_chain.py; both build their layers with `make` and `make_chain` below."""
import copy

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from tests import reference as ref
from camex_ds.config import ConfigError
from camex_ds.moe import CAMExMoE, MergeChain
from camex_ds.moe.factors import split_factors
from camex_ds.moe import functional as Fn

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
METHODS = ["euclid", "ties", "dare", "camex", "camex-ties", "camex-dare"]
TWINS = [("camex", "euclid"), ("camex-ties", "ties"), ("camex-dare", "dare")]


def mask_of(method):
    return method.split("-")[-1] if method.endswith(("ties", "dare")) else "none"


def make(method="camex", d=6, h=10, n=3, *, seed=0, T=2, noisy_gating=False, perturb=0.0, double=True, **kw):
    """A layer built from `seed`; `perturb` adds noise to the curvature factors (non-identity operators)."""
    torch.manual_seed(seed)
    layer = CAMExMoE(d, h, n, method=method, segment_len=T, noisy_gating=noisy_gating, init_std=0.5, **kw)
    if double:
        layer = layer.double()
    if perturb:
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if ".curvature." in name:
                    p.add_(perturb * torch.randn_like(p))
    return layer


def params_of(layer):
    """The layer's tensors in the reference's layout: base, stacked experts, stacked factors, router."""
    experts_list = list(layer.deepspeed_moe.experts.deepspeed_experts)
    names = list(layer.shapes)
    experts = {n: torch.stack([getattr(e, n) for e in experts_list]).detach() for n in names}
    factors = None
    if experts_list[0].curvature is not None:
        factors = {n: tuple(torch.stack(fs, 1).detach() for fs in zip(*(e.curvature[n].tensors() for e in experts_list)))
                   for n in names}
    base = None if layer.base is None else {n: layer.base[n].detach() for n in names}
    return base, experts, factors, layer.router.w_gate.detach()


def reference_forward(layer, x, *, T, top_k=None, routing="causal", first_segment="uniform", alpha=1.0,
                      activation="gelu", mask="none", prev=None):
    """The layer's output from the spec: gates (§2) from the router weights, merged weights (§3/§4), FFN (§1).

    `prev` (per-segment weights `name -> [S,out,in]`) replaces the base for a continuing dynamic layer.
    Returns `(output [B,L,d], weights, gates [B,S,N] before the causal shift)`.
    """
    base, experts, factors, w_gate = params_of(layer)
    bsz, length, d = x.shape
    n = w_gate.shape[1]
    seg = length if routing == "sequence" else T
    k = n if top_k is None else top_k
    gates = ref.segment_gates(x, w_gate, seg, k, routing == "causal", first_segment).reshape(-1, n)
    own = ref.segment_gates(x, w_gate, seg, k, False)
    base = prev if prev is not None else base
    weights = {name: ref.merge_weights(base[name], experts[name], gates, None if factors is None else factors[name],
                                       mask[name] if isinstance(mask, dict) else mask, alpha)
               for name in experts}
    out = ref.ffn_per_segment(x.reshape(-1, seg, d), weights, activation).reshape(bsz, length, d)
    return out, weights, own


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# =========================================================================== forward against the reference

CONFIGS = [  # (routing, first_segment, activation, top_k)
    ("causal", "uniform", "gelu", None),
    ("causal", "self-detached", "swiglu", 2),
    ("segment", "uniform", "swiglu", 2),
    ("sequence", "uniform", "gelu", 2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("method", METHODS)
def test_layer_matches_reference(method, config):
    """Eval mode (DARE's mask is 1 in eval), non-identity factors of rank 2, alpha != 1."""
    routing, first, activation, top_k = config
    layer = make(method, n=4, T=2, perturb=0.3, curvature_rank=2, alpha=0.7, routing=routing, first_segment=first,
                 activation=activation, top_k=top_k).eval()
    x = torch.randn(2, 8, 6, dtype=F64)
    out, l_aux, counts, _ = layer(x)
    mask = "none" if mask_of(method) == "dare" else mask_of(method)
    want, _, _ = reference_forward(layer, x, T=2, top_k=top_k, routing=routing, first_segment=first, alpha=0.7,
                                   activation=activation, mask=mask)
    assert out.shape == x.shape and out.dtype == F64
    close(out, want)


@pytest.mark.parametrize("method", ["dare", "camex-dare"])
def test_layer_dare_training_uses_one_mask_per_forward(monkeypatch, method):
    """Training: `m_i ~ Bernoulli(1-p)/(1-p)` per element, drawn once per forward per expert (one `[N,out,in]` draw
    per matrix, shared by all segments), and multiplying the curved task vector (§3)."""
    drawn = []
    real = Fn.dare_mask

    def recording(*args, **kwargs):
        m = real(*args, **kwargs)
        drawn.append(m)
        return m

    monkeypatch.setattr(Fn, "dare_mask", recording)
    p = 0.4
    layer = make(method, n=3, T=2, perturb=0.3, dare_p=p).train()
    x = torch.randn(2, 8, 6, dtype=F64)
    out, _, _, _ = layer(x)
    assert len(drawn) == 2  # one per matrix (w_in [10,6], w_out [6,10])
    masks = {("w_in" if m.shape[1:] == (10, 6) else "w_out"): m for m in drawn}
    assert set(masks) == {"w_in", "w_out"} and all(m.shape[0] == 3 for m in drawn)
    for m in drawn:
        assert ((m == 0) | ((m - 1 / (1 - p)).abs() < 1e-12)).all()
        assert 0 < (m == 0).double().mean() < 1
    want, _, _ = reference_forward(layer, x, T=2, mask=masks)
    close(out, want)
    # a new forward draws new masks; eval draws none and equals the unmasked reference
    layer(x)
    assert len(drawn) == 4 and not torch.equal(drawn[0], drawn[2])
    layer.eval()
    out_eval, _, _, _ = layer(x)
    assert len(drawn) == 4
    close(out_eval, reference_forward(layer, x, T=2)[0])
    assert (out - out_eval).abs().max() > 1e-6


def test_layer_bfloat16_and_float32_preserve_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        layer = make("camex-ties", double=False, perturb=0.1).to(dtype)
        out, l_aux, counts, _ = layer(torch.randn(1, 4, 6).to(dtype))
        assert out.dtype == dtype and l_aux.dtype == dtype and counts.shape == (3,)
        assert torch.isfinite(out.float()).all()


# =========================================================================== camex* == Euclidean twin at init


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t[0])
def test_camex_equals_euclidean_twin_at_init(twin, train):
    """Factors start as identity, so with the same seed the curved method is its Euclidean twin (§3)."""
    curved_name, flat_name = twin
    curved = make(curved_name, n=4, T=2, noisy_gating=True, top_k=3).train(train)
    flat = make(flat_name, n=4, T=2, noisy_gating=True, top_k=3).train(train)
    flat_params = dict(flat.named_parameters())
    curved_params = dict(curved.named_parameters())
    assert set(flat_params) < set(curved_params)
    for name, p in flat_params.items():
        assert torch.equal(p, curved_params[name]), name
    extra = set(curved_params) - set(flat_params)
    assert extra and all(".curvature." in n for n in extra)

    x = torch.randn(2, 8, 6, dtype=F64)
    torch.manual_seed(7)
    out_c, aux_c, cnt_c, _ = curved(x)
    torch.manual_seed(7)
    out_f, aux_f, cnt_f, _ = flat(x)
    close(out_c, out_f, tol=1e-13)
    close(aux_c, aux_f, tol=1e-13)
    assert torch.equal(cnt_c, cnt_f)


def test_camex_differs_from_twin_once_factors_move():
    curved = make("camex", perturb=0.3)
    flat = make("euclid")
    x = torch.randn(1, 4, 6, dtype=F64)
    assert (curved(x)[0] - flat(x)[0]).abs().max() > 1e-4


# =========================================================================== rank terms start apart (§3)


def _at_init(method, rank, dynamic, train, x):
    """The output (and gates' aux loss) of a layer, or of a two-layer dynamic chain, of `method` built from fixed
    seeds, for input `x` with fixed routing noise and DARE masks."""
    layers = [make(method, n=4, T=2, seed=10 + i, noisy_gating=True, top_k=3, curvature_rank=rank, dynamic=dynamic,
                   chain_start=i == 0).train(train) for i in range(2 if dynamic else 1)]
    torch.manual_seed(7)
    chain, out, aux = MergeChain(), x, 0.0
    for layer in layers:
        out, l_aux, _, chain = layer(out, chain)
        aux = aux + l_aux
    return out, aux, layers


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t[0])
def test_camex_equals_euclidean_twin_at_init_at_every_rank(twin, rank, dynamic, train):
    """§3: the R terms start apart (A_r = I + ε_r, centred) and still M_i = I, so every camex* layer (static or a
    dynamic chain, DARE's mask drawn alike in training) is its twin up to the factors' float32 rounding; for R = 1
    the factors are exactly the identity. The draw leaves the global RNG alone: all other tensors are equal."""
    curved_name, flat_name = twin
    x = torch.randn(2, 8, 6, dtype=F64)
    out_c, aux_c, curved = _at_init(curved_name, rank, dynamic, train, x)
    out_f, aux_f, flat = _at_init(flat_name, rank, dynamic, train, x)
    for c, f in zip(curved, flat):
        flat_params = dict(f.named_parameters())
        assert all(torch.equal(p, flat_params[n]) for n, p in c.named_parameters() if ".curvature." not in n)
    tol = 1e-13 if rank == 1 else 1e-6
    close(out_c, out_f, tol=tol)
    close(aux_c, aux_f, tol=tol)  # a chain's second router sees the first layer's output
    for layer in curved:
        for expert in layer.local_experts:
            for kron in expert.curvature.values():
                a, *bcd = kron.tensors()
                assert all(torch.equal(f, torch.eye(f.shape[-1], dtype=F64).expand_as(f)) for f in bcd)
                close(a.mean(0), torch.eye(a.shape[-1], dtype=F64), tol=1e-7)
                assert torch.equal(a, torch.eye(a.shape[-1], dtype=F64).expand_as(a)) == (rank == 1)


@pytest.mark.parametrize("std", [0.02, 0.0])
def test_rank_terms_differ_after_one_optimizer_step(std):
    """With the terms apart at the start, one step makes every factor's terms differ (A_0 != A_1, and B, C, D
    that started equal); started equal (curvature_init_std 0, or a model saved before §3's start) they stay equal,
    which is what `rank_is_degenerate` detects."""
    layer = make("camex", curvature_rank=2, curvature_init_std=std).train()
    assert layer.rank_is_degenerate() == (std == 0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(2, 8, 6, dtype=F64))[0].square().sum().backward()
    opt.step()
    for expert in layer.local_experts:
        for kron in expert.curvature.values():
            for f in kron.tensors():
                assert not torch.equal(f, torch.eye(f.shape[-1], dtype=F64).expand_as(f))  # it moved
                assert torch.equal(f[0], f[1]) == (std == 0)
    assert layer.rank_is_degenerate() == (std == 0)
    assert not make("camex", curvature_rank=1, curvature_init_std=0.0).rank_is_degenerate()  # nothing to lose at R=1


def test_the_curvature_start_is_the_same_for_every_expert_parallel_layout(monkeypatch):
    """Each EP rank draws every expert's factors and keeps its own: the layout does not change the model."""
    import camex_ds.moe.layer as layer_module

    whole = make("camex", n=4, curvature_rank=3)
    for ep_rank in (0, 1):
        monkeypatch.setattr(layer_module, "expert_parallel_rank", lambda ep_size, rank=None: ep_rank)
        part = make("camex", n=4, curvature_rank=3, ep_size=2)
        for j, expert in enumerate(part.local_experts):
            same = whole.local_experts[2 * ep_rank + j]
            assert all(torch.equal(p, q) for p, q in zip(expert.parameters(), same.parameters()))


# =========================================================================== a dynamic chain (test_chain.py)


def make_chain(method, *, layers=3, n=4, activation="gelu", perturb=0.3, rank=2, alpha=0.8, **kw):
    return [make(method, n=n, T=2, seed=10 + i, perturb=perturb, curvature_rank=rank, alpha=alpha, dynamic=True,
                 chain_start=(i == 0), activation=activation, **kw).eval() for i in range(layers)]


# =========================================================================== parameter names (§6)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("variant", ["static", "dynamic-start", "dynamic-continue"])
@pytest.mark.parametrize("method", METHODS)
def test_only_expert_container_names_contain_expert(method, variant, activation):
    kw = {} if variant == "static" else {"dynamic": True, "chain_start": variant == "dynamic-start"}
    layer = make(method, n=3, activation=activation, **kw)
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    names += list(layer.state_dict())
    for name in names:
        if "expert" in name:
            assert name.startswith(EXPERT_PREFIX), name
    stored = 3 if variant == "static" else 2
    per_matrix = 2 if method.startswith("camex") else 1  # the matrix and its factors, stored flat
    expert_params = [(n, p) for n, p in layer.named_parameters() if n.startswith(EXPERT_PREFIX)]
    assert len(expert_params) == stored * len(layer.shapes) * per_matrix
    assert {n[len(EXPERT_PREFIX):].split(".")[0] for n, _ in expert_params} == {str(i) for i in range(stored)}
    for name, p in layer.named_parameters():  # DeepSpeed's expert markers, kept through .double()
        if name.startswith(EXPERT_PREFIX):
            assert p.allreduce is False and p.group_name == "ep_size_1", name
        else:
            assert getattr(p, "allreduce", True), name


def test_factors_are_views_of_one_flat_parameter_and_old_checkpoints_load():
    """Each expert matrix keeps its four factors in one parameter (one per matrix for the engine to track);
    a state dict that holds them as `.a`..`.d` (older checkpoints) loads into it unchanged."""
    layer = make("camex-ties", perturb=0.3, curvature_rank=2)
    kron = layer.local_experts[0].curvature["w_in"]
    a, b, c, d = kron.tensors()
    assert [tuple(f.shape) for f in (a, b, c, d)] == [(2, 2, 2), (2, 5, 5), (2, 2, 2), (2, 3, 3)]
    assert all(f.data_ptr() >= kron.flat.data_ptr() for f in (a, b, c, d))  # views, no copies
    old = {}
    for key, value in layer.state_dict().items():
        if key.endswith(".flat"):
            module = layer.get_submodule(key[:-len(".flat")])
            old.update({key[:-len("flat")] + n: f.clone() for n, f in zip("abcd", split_factors(value, module.shapes))})
        else:
            old[key] = value
    fresh = make("camex-ties", seed=5, curvature_rank=2)
    fresh.load_state_dict(old, strict=True)
    for (k, v), (_, w) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(v, w), k


def _tiny_gpt_config(**moe):
    from camex_ds.config import ModelConfig

    return ModelConfig.from_dict({"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 32,
                                  "seq_len": 16, "moe": {"method": "camex", "num_experts": 4, "every": 1,
                                                         "segment_len": 8, **moe}})


def test_a_model_saved_with_equal_rank_terms_loads_with_one_warning(tmp_path, capsys):
    """A model from before §3's start (every rank term the identity) still loads (`--init_from`), with one warning
    line for the whole model saying that its rank R then equals rank 1; a model of today loads silently.
    (`--resume` goes through `train.checkpoint.load`: tests/integration/test_curvature_training.py.)"""
    from camex_ds.ckpt.format import load_state_into, save_pretrained
    from camex_ds.model import GPT

    cfg = _tiny_gpt_config(curvature_rank=4)
    for old in (True, False):
        model = GPT(cfg)
        if old:
            with torch.no_grad():
                for _, layer in model.moe_layers():
                    for expert in layer.local_experts:
                        for kron in expert.curvature.values():
                            for f in kron.tensors():
                                f.copy_(torch.eye(f.shape[-1]).expand_as(f))
        folder = tmp_path / f"old{old}"
        folder.mkdir()
        save_pretrained(folder, model.state_dict(), cfg)
        fresh = GPT(cfg)
        capsys.readouterr()
        load_state_into(fresh, folder)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
        if old:
            assert len(warnings) == 1, warnings
            assert "curvature_rank is 4" in warnings[0] and "in 2 of the 2 curved MoE layers" in warnings[0]
            assert "rank 4 then equals rank 1" in warnings[0]
        else:
            assert warnings == []


def test_stats_report_task_vectors_relative_to_the_base():
    """`task_vector/rel_norm` = mean over experts and matrices of ||E_i − B|| / ||B||; a dynamic layer continuing a
    chain has no base and is measured against the chain's, which the caller passes."""
    layer = make("camex", n=3, curvature_rank=2)
    layer(torch.randn(1, 4, 6, dtype=F64))
    stats = layer.stats()
    assert set(stats) == {"router/entropy", "router/max_load", "curvature/dev_from_identity", "task_vector/rel_norm"}
    with torch.no_grad():
        want = torch.stack([(getattr(e, n) - layer.base[n]).norm() / layer.base[n].norm()
                            for e in layer.local_experts for n in layer.shapes]).mean()
    assert stats["task_vector/rel_norm"] == pytest.approx(float(want), rel=1e-6)
    assert 0 < stats["curvature/dev_from_identity"] < 0.05  # A_r = I + ε_r, ε ~ N(0, 0.02²)
    first, second = make_chain("euclid", layers=2)
    assert "task_vector/rel_norm" not in second.stats() and "curvature/dev_from_identity" not in second.stats()
    with torch.no_grad():
        want = torch.stack([(getattr(e, n) - first.base[n]).norm() / first.base[n].norm()
                            for e in second.local_experts for n in second.shapes]).mean()
    assert second.stats(first.base)["task_vector/rel_norm"] == pytest.approx(float(want), rel=1e-6)


# =========================================================================== gradchecks


def _gradcheck_module_chain(layers, x, outputs=lambda outs: outs, fast=True):
    """gradcheck wrt the input and every parameter of the layers, run in sequence with one MergeChain.

    `fast`: torch's fast mode (random projections of the full Jacobian, one per input tensor) keeps the
    whole-layer checks to a second; the custom autograd function itself is checked in full in test_functional."""
    specs = [(i, n) for i, layer in enumerate(layers) for n, _ in layer.named_parameters()]
    leaves = [dict(layers[i].named_parameters())[n].detach().clone().requires_grad_() for i, n in specs]

    def fn(x_, *flat):
        chain, inp, outs = MergeChain(), x_, []
        for i, layer in enumerate(layers):
            p = {n: t for (j, n), t in zip(specs, flat) if j == i}
            inp, _, _, chain = functional_call(layer, p, (inp, chain))
            outs.append(inp)
        return tuple(outputs(outs))

    assert gradcheck(fn, (x.clone().requires_grad_(), *leaves), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("method,activation", [("camex", "gelu"), ("camex-ties", "swiglu"), ("euclid", "gelu")])
def test_gradcheck_layer(method, activation):
    layer = make(method, d=4, h=6, n=3, T=2, perturb=0.3, curvature_rank=2, alpha=0.8, activation=activation,
                 top_k=2).eval()
    _gradcheck_module_chain([layer], torch.randn(1, 4, 4, dtype=F64))


def test_gradcheck_layer_full_jacobian_minimal():
    """Full (not fast-mode) gradcheck of a minimal camex layer with non-identity factors."""
    layer = make("camex", d=2, h=4, n=2, T=1, perturb=0.3).eval()
    _gradcheck_module_chain([layer], torch.randn(1, 2, 2, dtype=F64), fast=False)


def test_gradcheck_layer_chunked(monkeypatch):
    monkeypatch.setattr(Fn, "MERGE_CHUNK_ELEMENTS", 1)
    layer = make("camex", d=4, h=6, n=3, T=1, perturb=0.3).eval()
    _gradcheck_module_chain([layer], torch.randn(1, 3, 4, dtype=F64))


# =========================================================================== argument errors


def test_error_unknown_method():
    with pytest.raises(ValueError, match=r"method='bogus'.*euclid, ties, dare, camex, camex-ties, camex-dare"):
        CAMExMoE(6, 10, 4, method="bogus")


def test_error_unknown_activation():
    with pytest.raises(ValueError, match=r"activation='relu'.*gelu, gelu_tanh, swiglu"):
        CAMExMoE(6, 10, 4, activation="relu")


@pytest.mark.parametrize("field,value,choices", [("routing", "bogus", "causal, segment, sequence"),
                                                 ("first_segment", "last", "uniform, self-detached")])
def test_error_bad_routing(field, value, choices):
    with pytest.raises(ValueError, match=rf"{field}='{value}'.*{choices}"):
        CAMExMoE(6, 10, 4, **{field: value})


@pytest.mark.parametrize("field,value", [("curvature_init_std", v) for v in (-0.01, float("nan"), float("inf"), "0.02",
                                                                             True)]
                         + [("curvature_lr_scale", v) for v in (0, -1.0, float("nan"), float("inf"), "2")])
def test_error_bad_curvature_option(field, value):
    bound = ">= 0.0" if field == "curvature_init_std" else "> 0.0"
    with pytest.raises(ConfigError, match=rf"^CAMExMoE.{field}={value!r} is invalid: expected a finite number {bound}$"):
        CAMExMoE(6, 10, 4, **{field: value})


def test_error_length_not_multiple_of_segment():
    layer = make(T=4)
    with pytest.raises(ValueError, match=r"L=10.*T=4"):
        layer(torch.randn(1, 10, 6, dtype=F64))


def test_error_ep_size_not_dividing_experts():
    with pytest.raises(ConfigError, match=r"ep_size=3.*one of \[1, 2, 4\]"):
        CAMExMoE(6, 10, 4, ep_size=3)
    with pytest.raises(ConfigError, match=r"ep_size=2.*3 stored experts.*\[1, 3\]"):  # dynamic: N-1 = 3
        CAMExMoE(6, 10, 4, ep_size=2, dynamic=True)


def test_error_ep_size_needs_distributed(monkeypatch):
    # other tests of the session may have initialised a process group: look as a fresh process would
    monkeypatch.setattr("camex_ds.parallel.dist.is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"ep_size=2.*torch\.distributed"):
        CAMExMoE(6, 10, 4, ep_size=2)


def test_error_top_k_too_large():
    with pytest.raises(ValueError, match=r"top_k=5.*4"):
        CAMExMoE(6, 10, 4, top_k=5)
    with pytest.raises(ValueError, match=r"top_k=4.*3"):  # dynamic layers route N-1 experts
        CAMExMoE(6, 10, 4, top_k=4, dynamic=True)
    with pytest.raises(ValueError, match=r"top_k=0"):
        CAMExMoE(6, 10, 4, top_k=0)


def test_sequence_routing_ignores_segment_len():
    """`routing="sequence"` is T = L: any L works, one gate vector per sequence."""
    layer = make("camex", T=4, routing="sequence", perturb=0.3).eval()
    x = torch.randn(2, 6, 6, dtype=F64)
    out, _, counts, _ = layer(x)
    close(out, reference_forward(layer, x, T=4, routing="sequence")[0])
    assert int(counts.sum()) == 2 * 3


def test_error_wrong_dtype_input():
    layer = make()  # float64
    with pytest.raises(TypeError, match=r"torch\.float32.*torch\.float64"):
        layer(torch.randn(1, 4, 6))


@pytest.mark.parametrize("shape,shown", [((4, 6), r"\(4, 6\)"), ((1, 4, 5), r"\(1, 4, 5\)"),
                                         ((1, 1, 4, 6), r"\(1, 1, 4, 6\)")])
def test_error_wrong_shape_input(shape, shown):
    layer = make()
    with pytest.raises(ValueError, match=rf"\[batch, seq_len, 6\].*{shown}"):
        layer(torch.randn(*shape, dtype=F64))


def test_error_dynamic_needs_two_experts():
    with pytest.raises(ValueError, match=r"num_experts=1"):
        CAMExMoE(6, 10, 1, dynamic=True)


@pytest.mark.parametrize("method", ["camex-ties", "euclid"])
def test_inference_mode_then_training(method):
    """The CPU work buffers made under inference_mode are not reused by a training step (it could not write them)."""
    layer = CAMExMoE(8, 16, 4, method=method, segment_len=4, noisy_gating=False)
    x = torch.randn(2, 8, 8)
    with torch.inference_mode():
        first = layer(x)[0].clone()
    out = layer(x.clone().requires_grad_())[0]
    out.sum().backward()
    assert torch.allclose(out.detach(), first, atol=1e-6) and layer.base["w_in"].grad is not None
    with torch.inference_mode():
        assert torch.allclose(layer(x)[0], first, atol=1e-6)


# =========================================================================== CUDA (run where a GPU is lent)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_layer_on_cuda_matches_cpu_float64(method, dtype):
    """The CUDA path (GPU chunking, blocked gate reductions, no CPU scratch pool) computes what float64 on the
    CPU computes from the same (rounded) parameters and input: relative L2 error of the output, the input grad
    and all parameter grads together (one of them, the base's, is ~0 for full softmax gates: Σ_i g_i = 1).

    bf16 TIES is looser: the elected sign of a near-zero `Σ_j τ_j` flips under bf16 sums, and that flips
    whole mask elements."""
    tol = 1e-4 if dtype == torch.float32 else 1e-1 if mask_of(method) == "ties" else 3e-2
    gpu = make(method, d=64, h=256, n=4, T=16, perturb=0.1, curvature_rank=2, top_k=2).eval().to("cuda", dtype)
    cpu = copy.deepcopy(gpu).to("cpu", F64)
    x = torch.randn(2, 64, 64).to(dtype).to(F64).requires_grad_(True)
    xg = x.detach().to("cuda", dtype).requires_grad_(True)
    outs = []
    for layer, inp in ((cpu, x), (gpu, xg)):
        out, _, _, _ = layer(inp)
        out.float().square().sum().backward()
        outs.append(out.detach().cpu().double())

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()

    grads = [(q.grad, p.grad) for p, q in zip(cpu.parameters(), gpu.parameters()) if p.grad is not None]
    errors = {"output": rel(outs[1], outs[0]), "input grad": rel(xg.grad, x.grad),
              "param grads": rel(torch.cat([g.flatten().double().cpu() for g, _ in grads]),
                                 torch.cat([r.flatten() for _, r in grads]))}
    assert max(errors.values()) < tol, {k: f"{v:.1e}" for k, v in errors.items()}
