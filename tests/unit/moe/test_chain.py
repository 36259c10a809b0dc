"""The dynamic merging chain (`camex_ds.moe.chain`, spec §4) through dynamic CAMExMoE layers in one process: the
recursion against the float64 reference, DARE's mask in a chain, where the chain stores its weights and how
gradients flow through it, a continuing layer without a chain, and a gradcheck of two chained layers."""
import pytest
import torch

from camex_ds.moe import MergeChain
from camex_ds.moe import functional as Fn
from tests.unit.moe.test_layer import (F64, _gradcheck_module_chain, close, make, make_chain, mask_of,
                                      reference_forward)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("method", ["camex", "camex-ties", "euclid", "ties"])
def test_dynamic_chain_matches_reference_recursion(method, activation):
    """Ŵ⁰ = B¹, Ŵ^l_s = Ŵ^{l-1}_s + α Σ_{i<N} g^l_{s,i} (m ⊙ M^l_i(E^l_i − Ŵ^{l-1}_s)); TIES elected per segment."""
    chain_layers = make_chain(method, activation=activation, routing="causal")
    x = torch.randn(2, 6, 6, dtype=F64)
    chain = MergeChain()
    inp, prev = x, None
    for layer in chain_layers:
        out, l_aux, counts, chain = layer(inp, chain)
        assert counts.shape == (3,)  # N-1 routed experts
        want, weights, _ = reference_forward(layer, inp, T=2, alpha=0.8, activation=activation,
                                             mask=mask_of(method), prev=prev)
        close(out, want)
        for name in weights:
            close(chain.weights[name], weights[name])
        inp, prev = out, weights


@pytest.mark.parametrize("method", ["dare", "camex-dare"])
def test_dynamic_chain_dare_training_matches_reference(monkeypatch, method):
    """DARE in a dynamic chain (training): one `[N-1,out,in]` mask per matrix and forward, shared by all segments,
    multiplying `M(E − Ŵ^{l-1}_s)`."""
    drawn = []
    real = Fn.dare_mask

    def recording(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(Fn, "dare_mask", recording)
    layers = [layer.train() for layer in make_chain(method, dare_p=0.3)]
    x = torch.randn(2, 6, 6, dtype=F64)
    chain, inp, prev = MergeChain(), x, None
    for layer in layers:
        drawn.clear()
        out, _, _, chain = layer(inp, chain)
        assert len(drawn) == 2 and all(m.shape[0] == 3 for m in drawn)  # N-1 experts
        masks = {("w_in" if m.shape[1:] == (10, 6) else "w_out"): m for m in drawn}
        want, weights, _ = reference_forward(layer, inp, T=2, alpha=0.8, mask=masks, prev=prev)
        close(out, want)
        inp, prev = out, weights


def test_dynamic_chain_storage_and_gradient_flow():
    first, second, third = make_chain("camex-ties")
    for layer in (first, second, third):
        assert len(layer.deepspeed_moe.experts.deepspeed_experts) == 3  # N-1 experts
        assert layer.router.w_gate.shape == (6, 3)
        assert layer.num_experts == 3
    assert first.base is not None
    for layer in (second, third):
        assert layer.base is None
        assert not any(n.startswith("base") for n, _ in layer.named_parameters())
        assert not any(n.startswith("base") for n in layer.state_dict())
    # the base of layer 1 gets gradient through the chain's weights alone (input of layer 2 detached)
    x = torch.randn(1, 4, 6, dtype=F64)
    chain = MergeChain()
    y1, _, _, chain = first(x, chain)
    second(y1.detach(), chain)[0].square().sum().backward()
    assert first.base["w_in"].grad is not None and first.base["w_in"].grad.abs().max() > 0


def test_dynamic_continuation_needs_a_chain():
    _, second = make_chain("camex", layers=2)
    with pytest.raises(ValueError, match="MergeChain"):
        second(torch.randn(1, 4, 6, dtype=F64))
    with pytest.raises(ValueError, match="MergeChain"):
        second(torch.randn(1, 4, 6, dtype=F64), MergeChain())


@pytest.mark.parametrize("method", ["camex", "camex-ties"])
def test_gradcheck_dynamic_two_layer_chain(method):
    layers = [make(method, d=4, h=6, n=3, T=2, seed=20 + i, perturb=0.3, dynamic=True, chain_start=i == 0).eval()
              for i in range(2)]
    _gradcheck_module_chain(layers, torch.randn(1, 4, 4, dtype=F64))
