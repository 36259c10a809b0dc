"""The segment router (`camex_ds.moe.router`, spec §2) inside CAMExMoE in one process: causal routing is causal
(forward and gradient), `self-detached`, segment and sequence routing are not, and the load-balancing loss
against its formula, in float64 and under gradcheck."""
import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from tests import reference as ref
from tests.unit.moe.test_layer import F64, close, make, reference_forward

pytestmark = pytest.mark.usefixtures("single_thread")


def _perturbed(x, p):
    y = x.clone()
    y[:, p] += torch.randn_like(y[:, p])
    return y


@pytest.mark.parametrize("p", [0, 1, 2, 3, 5, 6, 9, 11])
def test_causal_routing_is_causal(p):
    """T=3, L=12: p=1,2 inside segment 0, p=3,6,9 segment boundaries. Outputs before p never move,
    neither in the forward nor through the gradient; outputs at p and in the next segment do."""
    layer = make("camex-ties", n=3, T=3, perturb=0.3, routing="causal", top_k=2).eval()
    x = torch.randn(2, 12, 6, dtype=F64)
    out = layer(x)[0]
    out2 = layer(_perturbed(x, p))[0]
    close(out2[:, :p], out[:, :p], tol=0)
    assert (out2[:, p] - out[:, p]).abs().max() > 1e-6
    nxt = (p // 3 + 1) * 3
    if nxt < 12:  # the perturbation reaches the next segment through its gates
        assert (out2[:, nxt:] - out[:, nxt:]).abs().max() > 1e-8
    if p > 0:
        xg = x.clone().requires_grad_()
        (layer(xg)[0][:, :p] * torch.randn(2, p, 6, dtype=F64)).sum().backward()
        assert torch.equal(xg.grad[:, p:], torch.zeros_like(xg.grad[:, p:]))
        assert xg.grad[:, :p].abs().max() > 0


def test_self_detached_first_segment_is_not_causal_in_the_forward():
    """Why `uniform` is the default: with `self-detached`, segment 0 merges with its own gates, so a later token of
    segment 0 changes the outputs of earlier ones; the stop-gradient hides it from the gradient only."""
    layer = make("camex", n=3, T=3, perturb=0.3, routing="causal", first_segment="self-detached").eval()
    x = torch.randn(2, 9, 6, dtype=F64)
    out = layer(x)[0]
    out2 = layer(_perturbed(x, 2))[0]
    assert (out2[:, :2] - out[:, :2]).abs().max() > 1e-8  # tokens 0, 1 see token 2
    xg = x.clone().requires_grad_()
    layer(xg)[0][:, 0].sum().backward()
    assert torch.equal(xg.grad[:, 1:], torch.zeros_like(xg.grad[:, 1:]))  # ... but get no gradient from it
    # from segment 1 on it is causal again
    out3 = layer(_perturbed(x, 4))[0]
    close(out3[:, :4], out[:, :4], tol=0)


@pytest.mark.parametrize("routing", ["segment", "sequence"])
def test_segment_and_sequence_routing_are_not_causal(routing):
    layer = make("camex", n=3, T=3, perturb=0.3, routing=routing).eval()
    x = torch.randn(2, 9, 6, dtype=F64)
    out, out2 = layer(x)[0], layer(_perturbed(x, 2))[0]
    assert (out2[:, :2] - out[:, :2]).abs().max() > 1e-8
    if routing == "sequence":  # T = L: the last token moves the first
        out3 = layer(_perturbed(x, 8))[0]
        assert (out3[:, 0] - out[:, 0]).abs().max() > 1e-8


def test_gradcheck_aux_loss_in_float64():
    """The auxiliary loss is a differentiable function of the router in float64 too (dtype-preserving)."""
    layer = make("camex", d=4, h=6, n=3, T=2).train()
    w = layer.router.w_gate.detach().clone().requires_grad_()
    x = torch.randn(2, 4, 4, dtype=F64)
    assert gradcheck(lambda w_: functional_call(layer, {"router.w_gate": w_}, (x,))[1], (w,),
                     eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_aux_loss_finite_nonnegative_and_counts(top_k, noisy):
    layer = make("camex", n=4, T=2, top_k=top_k, noisy_gating=noisy, aux_loss_coef=0.05).train()
    x = torch.randn(3, 8, 6, dtype=F64)
    _, l_aux, counts, _ = layer(x)
    assert l_aux.dim() == 0 and torch.isfinite(l_aux) and l_aux >= 0
    assert counts.shape == (4,) and not counts.is_floating_point() and (counts >= 0).all()
    assert int(counts.sum()) == 3 * 4 * top_k  # every segment picks top_k experts
    if noisy:
        l_aux.backward()
        assert layer.router.w_noise.grad is not None or top_k == 4


def test_aux_loss_matches_formula_without_noise():
    """coef · (cv²(importance) + cv²(load)); importance, load over the segments' own (unshifted) gates."""
    layer = make("camex", n=4, T=2, top_k=2, aux_loss_coef=0.05).train()
    x = torch.randn(3, 8, 6, dtype=F64)
    _, l_aux, counts, _ = layer(x)
    _, _, own = reference_forward(layer, x, T=2, top_k=2)
    importance, load = own.sum((0, 1)), (own > 0).sum((0, 1)).to(F64)
    assert torch.equal(counts, (own > 0).sum((0, 1)).to(counts.dtype))
    want = 0.05 * (ref.cv_squared(importance) + ref.cv_squared(load))
    torch.testing.assert_close(l_aux, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("noisy", [False, True])
def test_aux_loss_zero_for_uniform_gates(noisy):
    layer = make("camex", n=4, T=2, noisy_gating=noisy).train()
    with torch.no_grad():
        layer.router.w_gate.zero_()
        if noisy:
            layer.router.w_noise.zero_()
    _, l_aux, counts, _ = layer.eval()(torch.randn(2, 8, 6, dtype=F64))
    assert abs(float(l_aux.detach())) < 1e-8
    assert counts.tolist() == [8, 8, 8, 8]
