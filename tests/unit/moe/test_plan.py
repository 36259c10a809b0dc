"""Curvature once per optimizer step: under gradient accumulation a merge layer computes its per-step work
(`τ̃ = M(τ)`, the TIES election, DARE's mask, the dynamic chain's span images) at the step's first micro-batch
and pushes the summed gradient back through it once, at the boundary. The gradients must equal one pass over
the whole batch, and nothing may be reused once it is stale. The runs through DeepSpeed (ZeRO 0-2, ep 1 and 2,
the launcher): tests/integration/test_accumulation.py."""
import pytest
import torch

from camex_ds.analysis.live_bytes import LiveBytes
from camex_ds.moe import StepPlans
from camex_ds.moe import functional as Fn
from tests.unit.moe.test_layer import F64, make, make_chain

ACCUM = 4


def _loss(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def _forward(layers, x, plans=None):
    chain, inp, outs = None, x, []
    for i, layer in enumerate(layers):
        inp, _, _, chain = layer(inp, chain, None if plans is None else plans[i])
        outs.append(inp)
    return outs


def _segments(layer, x):
    return x.shape[0] * (x.shape[1] // layer.segment_len_for(x.shape[1]))


def _grads(layers):
    return {f"{i}.{n}": p.grad.clone() for i, layer in enumerate(layers) for n, p in layer.named_parameters()
            if p.grad is not None}


def one_pass(layers, x, weights):
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    _loss(_forward(layers, x), weights).backward()
    return _grads(layers)


def accumulated(layers, x, weights, between=None):
    """`ACCUM` micro-batches of one optimizer step, its plans built at the first; `between(i)` runs after
    micro-batch i's backward."""
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    plans = None
    for i, (xs, ws) in enumerate(zip(x.chunk(ACCUM), zip(*(w.chunk(ACCUM) for w in weights)))):
        if plans is None:
            plans = StepPlans(layers, _segments(layers[0], xs), ACCUM)
        _loss(_forward(layers, xs, list(plans.for_micro_batch(last=i == ACCUM - 1))), ws).backward()
        if between:
            between(i)
    return _grads(layers)


def assert_same(a, b, tol=1e-10):
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def _batch(layers, batch=8, length=6, d=6):
    x = torch.randn(batch, length, d, dtype=F64)
    return x, [torch.randn(batch, length, d, dtype=F64) for _ in layers]


@pytest.mark.parametrize("method", ["camex", "camex-ties", "camex-dare", "euclid", "ties"])
def test_static_layer_accumulation_equals_one_pass(method):
    layer = make(method, n=4, perturb=0.3, curvature_rank=2, alpha=0.7, dare_p=0.3).train()
    x, w = _batch([layer])
    torch.manual_seed(5)  # DARE: the step's one mask is drawn at its first forward in both runs
    want = one_pass([layer], x, w)
    torch.manual_seed(5)
    assert_same(accumulated([layer], x, w), want)


@pytest.mark.parametrize("length", [6, 64])  # few segments: layer 3 per segment; many: every layer via the span
@pytest.mark.parametrize("method", ["camex", "camex-ties", "camex-dare"])
def test_dynamic_chain_accumulation_equals_one_pass(method, length):
    layers = [layer.train() for layer in make_chain(method, dare_p=0.3)]
    x, w = _batch(layers, length=length)
    torch.manual_seed(5)
    want = one_pass(layers, x, w)
    torch.manual_seed(5)
    assert_same(accumulated(layers, x, w), want)


def test_each_chain_layer_takes_the_cheaper_exact_evaluation():
    """Layer 1 offers its span (base + N-1 curved task vectors); later layers go through it while that costs
    fewer FLOPs than segment by segment (`camex_ds.moe.chain.prefer_span`); TIES (a per-segment election) never."""
    def span_sizes(method, length):
        chain, inp = None, torch.randn(2, length, 6, dtype=F64)
        sizes = []
        for layer in make_chain(method):
            inp, _, _, chain = layer(inp, chain)
            sizes.append(chain.spans["w_in"].size if "w_in" in chain.spans else None)
        return sizes

    assert span_sizes("camex", 6) == [4, 19, None]  # K_2 = 4 + 3·5; at 6 segments layer 3 per segment
    assert span_sizes("camex", 64) == [4, 19, 79]
    assert span_sizes("camex-ties", 64) == [None, None, None]


def test_curvature_runs_once_per_optimizer_step(monkeypatch):
    calls = []
    real = Fn.curved_task_vectors
    monkeypatch.setattr(Fn, "curved_task_vectors", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = make("camex", n=4, perturb=0.3).train()
    x, w = _batch([layer])
    accumulated([layer], x, w)
    assert len(calls) == 2  # w_in and w_out, once for the four micro-batches
    accumulated([layer], x, w)
    assert len(calls) == 4  # a new step computes afresh
    one_pass([layer], x, w)
    assert len(calls) == 6  # no micro-batch information: every forward computes


def test_eval_in_the_middle_of_a_step_changes_nothing():
    layer = make("camex-ties", n=4, perturb=0.3).train()
    x, w = _batch([layer])
    want = accumulated([layer], x, w)

    def evaluate(i):
        if i == 1:
            layer.eval()
            with torch.no_grad():
                layer(torch.randn(3, 6, 6, dtype=F64))
            layer.train()

    assert_same(accumulated([layer], x, w, between=evaluate), want)


def test_nothing_stale_after_a_load_a_skipped_step_or_new_parameters():
    layer = make("camex", n=4, perturb=0.3).train()
    fresh = make("camex", n=4, perturb=0.3, seed=7).train()
    x = torch.randn(2, 6, 6, dtype=F64)
    segments = _segments(layer, x)
    layer(x, None, layer.plan(segments, ACCUM).for_micro_batch(last=False))
    layer.load_state_dict(fresh.state_dict())  # mid-step: the old plan's τ̃ belong to the old parameters
    torch.testing.assert_close(layer(x, None, layer.plan(segments, ACCUM).for_micro_batch(last=False))[0],
                               fresh(x)[0])
    # a step whose boundary backward never ran (skipped), then changed parameters: the next step plans afresh
    layer(x, None, layer.plan(segments, ACCUM).for_micro_batch(last=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.1)
    for accumulation in (ACCUM, 2):  # also a changed accumulation count
        got = layer(x, None, layer.plan(segments, accumulation).for_micro_batch(last=False))[0]
        torch.testing.assert_close(got, layer(x)[0])


def test_dare_mask_is_drawn_once_per_step(monkeypatch):
    drawn = []
    real = Fn.dare_mask
    monkeypatch.setattr(Fn, "dare_mask", lambda *a, **k: drawn.append(1) or real(*a, **k))
    layer = make("camex-dare", n=4, dare_p=0.3).train()
    x, w = _batch([layer])
    accumulated([layer], x, w)
    assert len(drawn) == 2  # one per matrix for the whole step


@pytest.mark.parametrize("chain", [False, True])
def test_a_plan_keeps_its_own_tensors_and_no_copy_of_the_parameters(chain, single_thread):
    """The curvature's backward reads the raw task vectors `E − B` (or the stacked experts): they are rebuilt from
    the parameters then, not kept from the plan to its backward (parameter-sized, per layer and step)."""
    layers = make_chain("camex", layers=2, n=4, d=16, h=32) if chain else [make("camex", d=16, h=32, n=4)]
    for layer in layers:
        layer.train()
    list(StepPlans(layers, segments=4))  # the curvature's reused work buffers, allocated once
    with LiveBytes() as tracker:
        plans = list(StepPlans(layers, segments=4))
        held = tracker.live
    matrices = [m for plan in plans for m in plan.matrices.values()]
    own = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for m in matrices for t in m
           if isinstance(t, torch.Tensor)}
    copy = sum((m.task if m.curved is None else m.curved).nbytes for m in matrices)  # the experts' size
    # beyond its own tensors a plan keeps the curvature's factors (small), not another copy of the experts
    assert 0 <= held - sum(own.values()) < copy, (held, sum(own.values()), copy)
