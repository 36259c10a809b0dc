"""`camex_ds.moe.functional` (spec §5; its whole-merge functions composed in `composed.py`) against the
independent float64 reference in `tests/reference.py`, plus dtype preservation, gradchecks and argument errors."""
import itertools

import pytest
import torch
from torch.autograd import gradcheck

from tests import reference as ref
from camex_ds.moe import functional as Fn

from tests import composed

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
# Non-square shapes (out, in); (8, 8) makes P = 64 so the blocked gate-gradient path is taken too,
# (5, 7) has prime sides (Kronecker factors 1 x n).
SHAPES = [(6, 4), (4, 9), (12, 10), (5, 7), (8, 8)]


def rnd(*shape, dtype=F64, scale=1.0):
    return torch.randn(*shape, dtype=F64).mul_(scale).to(dtype)


def rand_gates(s, n, top_k=None):
    g = torch.softmax(torch.randn(s, n, dtype=F64), -1)
    if top_k is not None and top_k < n:
        keep = torch.zeros_like(g).scatter(-1, g.topk(top_k, -1).indices, 1.0)
        g = g * keep / (g * keep).sum(-1, keepdim=True)
    return g


def close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol)


# =========================================================================== kron_factor_shape


def test_kron_factor_shape_matches_brute_force():
    for n in range(1, 301):
        a, b = Fn.kron_factor_shape(n)
        assert (a, b) == ref.kron_factor_shape(n), n
        assert a * b == n and a <= b


@pytest.mark.parametrize("n,expected", [(1, (1, 1)), (7, (1, 7)), (12, (3, 4)), (16, (4, 4)), (18, (3, 6)),
                                        (1024, (32, 32)), (768, (24, 32)), (3072, (48, 64))])
def test_kron_factor_shape_examples(n, expected):
    assert Fn.kron_factor_shape(n) == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_kron_factor_shape_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        Fn.kron_factor_shape(bad)


# =========================================================================== apply_curvature


def test_reference_curvature_einsum_equals_kron_form():
    """The reference's index formula equals (1/R) Σ (A⊗B) τ (C⊗D)ᵀ: the two readings of §3 agree."""
    for (out_f, in_f), rank in itertools.product(SHAPES, (1, 3)):
        fac = ref.random_factors(rank, 1, out_f, in_f)
        tau = rnd(out_f, in_f)
        close(ref.curve_one(tau, *(f[:, 0] for f in fac)), ref.curve_one_kron(tau, *(f[:, 0] for f in fac)))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_curvature_matches_reference(shape, rank):
    n = 3
    tau = rnd(n, *shape)
    fac = ref.random_factors(rank, n, *shape)
    got = Fn.apply_curvature(tau, fac)
    assert got.shape == tau.shape and got.dtype == F64
    close(got, ref.apply_curvature(tau, fac))
    # experts are curved independently: expert i only sees its own factors
    for i in range(n):
        close(got[i], ref.curve_one(tau[i], *(f[:, i] for f in fac)))


@pytest.mark.parametrize("rank", [1, 3])
def test_identity_factors_are_identity_operator(rank):
    """Identity factors give M = I for any R (the 1/R normalisation of §9), so camex* == Euclidean at init."""
    tau = rnd(2, 6, 10)
    fac = Fn.identity_factors(rank, 2, 6, 10, dtype=F64)
    assert [tuple(f.shape) for f in fac] == [(rank, 2, 2, 2), (rank, 2, 3, 3), (rank, 2, 2, 2), (rank, 2, 5, 5)]
    close(Fn.apply_curvature(tau, fac), tau, tol=1e-14)


def test_apply_curvature_is_linear_in_tau():
    fac = ref.random_factors(2, 3, 6, 4)
    t1, t2 = rnd(3, 6, 4), rnd(3, 6, 4)
    close(Fn.apply_curvature(2.0 * t1 - t2, fac), 2.0 * Fn.apply_curvature(t1, fac) - Fn.apply_curvature(t2, fac))


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_apply_curvature_preserves_dtype(dtype, tol):
    tau = rnd(3, 6, 4, dtype=dtype)
    fac = tuple(f.to(dtype) for f in ref.random_factors(2, 3, 6, 4))
    got = Fn.apply_curvature(tau, fac)
    assert got.dtype == dtype
    close(got, ref.apply_curvature(tau, fac), tol)


def test_apply_curvature_rejects_bad_factor_shapes():
    tau = rnd(3, 6, 4)
    fac = list(ref.random_factors(1, 3, 6, 4))
    with pytest.raises(ValueError, match="four"):
        Fn.apply_curvature(tau, fac[:3])
    bad = fac.copy()
    bad[1] = torch.eye(2, dtype=F64).expand(1, 3, 2, 2)  # B must be [1,3,3,3] for out=6
    with pytest.raises(ValueError, match=r"factor B .*\[1,3,3,3\]"):
        Fn.apply_curvature(tau, bad)
    bad = fac.copy()
    bad[0] = bad[0][:, :2]  # wrong number of experts
    with pytest.raises(ValueError, match="factor A"):
        Fn.apply_curvature(tau, bad)


# =========================================================================== ties_mask


@pytest.mark.parametrize("shape", [(4, 6, 5), (3, 7), (2, 3, 4, 5)])
def test_ties_mask_matches_reference(shape):
    tau = rnd(*shape)
    m = Fn.ties_mask(tau)
    assert m.shape == tau.shape and m.dtype == tau.dtype
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    close(m, ref.ties_mask(tau), tol=0)


def test_ties_mask_hand_example():
    tau = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 1.0, 1.0], [2.0, 0.5, -5.0]])  # sums: -1, -0.5, -1
    want = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.equal(Fn.ties_mask(tau), want)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_ties_mask_preserves_dtype(dtype):
    assert Fn.ties_mask(rnd(3, 4, 5, dtype=dtype)).dtype == dtype


# =========================================================================== segment_gates


@pytest.mark.parametrize("first_segment", ["uniform", "self-detached"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("segment_len", [1, 3, 12])
def test_segment_gates_match_reference(segment_len, top_k, causal, first_segment):
    x, w = rnd(2, 12, 5), rnd(5, 4)
    got = composed.segment_gates(x, w, segment_len, top_k, causal, first_segment)
    want = ref.segment_gates(x, w, segment_len, top_k, causal, first_segment)
    assert got.shape == (2, 12 // segment_len, 4) and got.dtype == F64
    close(got, want)
    close(got.sum(-1), torch.ones(2, 12 // segment_len, dtype=F64))
    own = ref.segment_gates(x, w, segment_len, top_k, False)
    assert ((own > 0).sum(-1) == top_k).all()


def test_segment_gates_causal_shift_and_first_segment():
    x, w = rnd(3, 8, 4), rnd(4, 5)
    own = composed.segment_gates(x, w, 2, 5, causal=False)
    uni = composed.segment_gates(x, w, 2, 5, causal=True)
    det = composed.segment_gates(x, w, 2, 5, causal=True, first_segment="self-detached")
    close(uni[:, 1:], own[:, :-1], tol=0)
    close(det[:, 1:], own[:, :-1], tol=0)
    close(uni[:, 0], torch.full((3, 5), 0.2, dtype=F64), tol=0)
    close(det[:, 0], own[:, 0], tol=0)


def test_segment_gates_self_detached_first_segment_has_no_gradient():
    """`self-detached`: segment 0 uses its own gates with stop-gradient (§2)."""
    x = rnd(2, 6, 4).requires_grad_()
    w = rnd(4, 3)
    g = composed.segment_gates(x, w, 3, 3, causal=True, first_segment="self-detached")
    (g[:, 0] * rnd(2, 3)).sum().backward(retain_graph=True)
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    (g[:, 1] * rnd(2, 3)).sum().backward()  # segment 1 uses segment 0's gates, with gradient
    assert x.grad[:, :3].abs().sum() > 0 and torch.equal(x.grad[:, 3:], torch.zeros_like(x[:, 3:]))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_segment_gates_preserve_dtype(dtype):
    assert composed.segment_gates(rnd(1, 4, 3, dtype=dtype), rnd(3, 2, dtype=dtype), 2, 2, True).dtype == dtype


def test_segment_gates_errors():
    x, w = rnd(2, 10, 3), rnd(3, 4)
    with pytest.raises(ValueError, match=r"L=10.*T=4"):
        composed.segment_gates(x, w, 4, 2, True)
    with pytest.raises(ValueError, match=r"top_k=5.*\[1, 4\]"):
        composed.segment_gates(x, w, 5, 5, True)
    with pytest.raises(ValueError, match=r"top_k=0"):
        composed.segment_gates(x, w, 5, 0, True)
    with pytest.raises(ValueError, match=r"first_segment='last'.*uniform, self-detached"):
        composed.segment_gates(x, w, 5, 2, True, first_segment="last")
    with pytest.raises(ValueError, match=r"\[batch, seq_len, hidden\].*\(10, 3\)"):
        composed.segment_gates(x[0], w, 5, 2, True)


# =========================================================================== merge_weights


def _mask_variants(n, shape):
    dare = torch.bernoulli(torch.full((n, *shape), 0.7, dtype=F64)) / 0.7
    return {"none": "none", "ties": "ties", "dare": dare}


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("mask_kind", ["none", "ties", "dare"])
@pytest.mark.parametrize("rank", [None, 1, 3])  # None: Euclidean (no factors)
@pytest.mark.parametrize("shape", [(6, 4), (4, 9), (5, 7)])
def test_merge_weights_static_matches_reference(shape, rank, mask_kind, alpha):
    n, s = 3, 4
    base, experts = rnd(*shape), rnd(n, *shape)
    gates = rand_gates(s, n, top_k=2)
    fac = None if rank is None else ref.random_factors(rank, n, *shape)
    mask = _mask_variants(n, shape)[mask_kind]
    got = composed.merge_weights(base, experts, gates, fac, mask, alpha)
    assert got.shape == (s, *shape) and got.dtype == F64
    close(got, ref.merge_weights(base, experts, gates, fac, mask, alpha))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
@pytest.mark.parametrize("mask_kind", ["none", "ties", "dare"])
@pytest.mark.parametrize("rank", [None, 1, 3])
@pytest.mark.parametrize("shape", [(6, 4), (4, 9), (5, 7)])
def test_merge_weights_dynamic_matches_reference(shape, rank, mask_kind, alpha):
    """Per-segment base (§4): `Ŵ_s = base_s + α Σ g m ⊙ M(E − base_s)`, TIES elected per segment."""
    n, s = 3, 4
    base, experts = rnd(s, *shape), rnd(n, *shape)
    gates = rand_gates(s, n)
    fac = None if rank is None else ref.random_factors(rank, n, *shape)
    mask = _mask_variants(n, shape)[mask_kind]
    got = composed.merge_weights(base, experts, gates, fac, mask, alpha)
    assert got.shape == (s, *shape) and got.dtype == F64
    close(got, ref.merge_weights(base, experts, gates, fac, mask, alpha))


def test_merge_weights_dynamic_ties_is_elected_per_segment():
    """With a per-segment base the TIES sign is elected per segment: differs from a global election."""
    n, s, shape = 3, 2, (4, 4)
    experts = rnd(n, *shape)
    base = torch.stack([torch.zeros(shape, dtype=F64), experts.mean(0) + 0.3 * rnd(*shape)])
    gates = rand_gates(s, n)
    got = composed.merge_weights(base, experts, gates, None, "ties")
    close(got, ref.merge_weights(base, experts, gates, None, "ties"))
    # segment 0 alone with a static zero base gives the same segment-0 weights
    close(got[0], composed.merge_weights(base[0], experts, gates[:1], None, "ties")[0])
    close(got[1], composed.merge_weights(base[1], experts, gates[1:], None, "ties")[0])


def test_merge_weights_mask_multiplies_the_curved_vector():
    """§3: `m_i ⊙ M_i(τ_i)`, the mask computed from raw τ — not `M_i(m_i ⊙ τ_i)`."""
    n, shape = 3, (4, 6)
    base, experts, gates = rnd(*shape), rnd(n, *shape), rand_gates(2, n)
    fac = ref.random_factors(1, n, *shape, scale=0.8)
    got = composed.merge_weights(base, experts, gates, fac, "ties")
    tau = experts - base
    m = ref.ties_mask(tau)
    right = base + torch.einsum("sn,noi->soi", gates, m * ref.apply_curvature(tau, fac))
    wrong = base + torch.einsum("sn,noi->soi", gates, ref.apply_curvature(m * tau, fac))
    close(got, right)
    assert (got - wrong).abs().max() > 1e-3


def test_merge_weights_gates_one_hot_and_zero():
    n, shape = 3, (4, 6)
    base, experts = rnd(*shape), rnd(n, *shape)
    gates = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    got = composed.merge_weights(base, experts, gates)
    close(got[0], experts[1])
    close(got[1], base)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 1e-1)])
def test_merge_weights_preserves_dtype(dtype, tol, dynamic):
    n, s, shape = 3, 2, (6, 4)
    base = rnd(*((s,) if dynamic else ()), *shape, dtype=dtype)
    experts, gates = rnd(n, *shape, dtype=dtype), rand_gates(s, n).to(dtype)
    fac = tuple(f.to(dtype) for f in ref.random_factors(2, n, *shape))
    for mask in ("none", "ties"):
        got = composed.merge_weights(base, experts, gates, fac, mask, 0.7)
        assert got.dtype == dtype
        if dtype != torch.bfloat16 or mask == "none":  # bf16 rounding can flip a TIES sign
            close(got, ref.merge_weights(base, experts, gates, fac, mask, 0.7), tol)


def test_merge_weights_errors():
    base, experts, gates = rnd(4, 6), rnd(3, 4, 6), rand_gates(2, 3)
    with pytest.raises(ValueError, match=r"mask='magic'.*none, ties"):
        composed.merge_weights(base, experts, gates, mask="magic")
    with pytest.raises(ValueError, match=r"mask='magic'.*none, ties"):
        composed.merge_weights(rnd(2, 4, 6), experts, gates, mask="magic")
    with pytest.raises(ValueError, match=r"S=2.*\(3, 4, 6\)"):
        composed.merge_weights(rnd(3, 4, 6), experts, gates)


# =========================================================================== merged_linear / merged_ffn


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_merged_linear_matches_reference(monkeypatch, chunk):
    s, t, out_f, in_f, n = 5, 3, 6, 4, 3
    if chunk is not None:  # chunk segments per merge
        monkeypatch.setattr(Fn, "MERGE_CHUNK_ELEMENTS", chunk * out_f * in_f)
    x, base, task, gates = rnd(s, t, in_f), rnd(out_f, in_f), rnd(n, out_f, in_f), rand_gates(s, n)
    got = Fn.merged_linear(x, base, task, gates, 0.8)
    w = base + 0.8 * torch.einsum("sn,noi->soi", gates, task)
    close(got, torch.stack([x[i] @ w[i].T for i in range(s)]))


@pytest.mark.parametrize("policy", ["cpu", "gpu"])
def test_merged_linear_gradients_with_each_device_policy(monkeypatch, policy):
    """The chunk sizes and the blocked gate-gradient reduction a GPU uses, run here on the CPU: same gradients."""
    s, t, out_f, in_f, n = 6, 3, 8, 4, 3
    if policy == "gpu":
        monkeypatch.setattr(Fn, "MERGE_CHUNK_ELEMENTS", Fn.MERGE_CHUNK_ELEMENTS_GPU)
        on_device = Fn._reduction_blocks  # its non-CPU rule, applied to these CPU tensors
        monkeypatch.setattr(Fn, "_reduction_blocks", lambda a: on_device(a.new_empty(a.shape, device="meta")))
        assert Fn._reduction_blocks(rnd(2, out_f * in_f)) == 32
    x, base, task = rnd(s, t, in_f), rnd(out_f, in_f), rnd(n, out_f, in_f)
    gates = rand_gates(s, n)
    leaves = [v.requires_grad_() for v in (x, base, task, gates)]
    Fn.merged_linear(x, base, task, gates, 0.8).square().sum().backward()
    want = [v.detach().requires_grad_() for v in leaves]
    w = want[1] + 0.8 * torch.einsum("sn,noi->soi", want[3], want[2])
    torch.einsum("sti,soi->sto", want[0], w).square().sum().backward()
    for got, ref_leaf in zip(leaves, want):
        close(got.grad, ref_leaf.grad)


def _ffn_inputs(activation, n, d, h, dynamic, s, rank, mask_kind):
    shapes = ref.matrix_shapes(d, h, activation)
    base = {k: rnd(*((s,) if dynamic else ()), *v) for k, v in shapes.items()}
    experts = {k: rnd(n, *v, scale=0.7) for k, v in shapes.items()}
    fac = None if rank is None else {k: ref.random_factors(rank, n, *v) for k, v in shapes.items()}
    mask = {k: _mask_variants(n, v)["dare"] for k, v in shapes.items()} if mask_kind == "dare" else mask_kind
    return base, experts, fac, mask


@pytest.mark.parametrize("mask_kind", ["none", "ties", "dare"])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_merged_ffn_matches_reference(activation, dynamic, rank, mask_kind):
    s, t, d, h, n = 3, 4, 6, 10, 3
    base, experts, fac, mask = _ffn_inputs(activation, n, d, h, dynamic, s, rank, mask_kind)
    x, gates = rnd(s, t, d), rand_gates(s, n, top_k=2)
    got = composed.merged_ffn(x, gates, base, experts, fac, mask, 0.9, activation)
    assert got.shape == x.shape and got.dtype == F64
    close(got, ref.merged_ffn(x, gates, base, experts, fac, mask, 0.9, activation))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_ffn_preserves_dtype(dtype):
    base, experts, fac, _ = _ffn_inputs("swiglu", 3, 4, 6, False, 2, 1, "none")
    cast = lambda dct: {k: v.to(dtype) for k, v in dct.items()}  # noqa: E731
    fac = {k: tuple(f.to(dtype) for f in v) for k, v in fac.items()}
    x, gates = rnd(2, 3, 4, dtype=dtype), rand_gates(2, 3).to(dtype)
    assert composed.merged_ffn(x, gates, cast(base), cast(experts), fac, "ties", 1.0, "swiglu").dtype == dtype


def test_merged_ffn_errors():
    base, experts, _, _ = _ffn_inputs("gelu", 2, 4, 6, False, 2, None, "none")
    x, gates = rnd(2, 3, 4), rand_gates(2, 2)
    with pytest.raises(ValueError, match=r"activation='relu'.*gelu, gelu_tanh, swiglu"):
        composed.merged_ffn(x, gates, base, experts, activation="relu")
    with pytest.raises(ValueError, match=r"swiglu.*missing"):
        composed.merged_ffn(x, gates, base, experts, activation="swiglu")


def test_merged_linear_saves_no_per_segment_weights():
    """§3: never materialise `[S, ...P]` merged weights for the backward: saved state is O(N·P), not O(S·P)."""
    s, t, out_f, in_f, n = 32, 1, 8, 8, 2
    x = rnd(s, t, in_f).requires_grad_()
    base, task = rnd(out_f, in_f).requires_grad_(), rnd(n, out_f, in_f).requires_grad_()
    gates = rand_gates(s, n).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t_: saved.append(t_.numel()) or t_, lambda t_: t_):
        y = Fn.merged_linear(x, base, task, gates)
    y.sum().backward()
    assert max(saved) < s * out_f * in_f


# =========================================================================== gradchecks


def _gc(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 2])
def test_gradcheck_apply_curvature(rank):
    tau = rnd(2, 6, 4).requires_grad_()
    fac = [f.requires_grad_() for f in ref.random_factors(rank, 2, 6, 4)]
    _gc(lambda t, a, b, c, d: Fn.apply_curvature(t, (a, b, c, d)), tau, *fac)


def test_task_vectors_are_expert_minus_base_and_dtype_preserving():
    base, experts = rnd(4, 6), rnd(3, 4, 6)
    tau = Fn.task_vectors(base, list(experts))
    assert tau.dtype == F64 and torch.equal(tau, experts - base)


def test_gradcheck_task_vectors():
    base, experts = rnd(4, 6).requires_grad_(), [rnd(4, 6).requires_grad_() for _ in range(3)]
    _gc(lambda b, *e: Fn.task_vectors(b, e), base, *experts)


@pytest.mark.parametrize("shape", [(6, 4), (8, 8)])  # (8, 8): P = 64, the blocked gate-gradient path
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_gradcheck_merged_linear(monkeypatch, chunk, shape):
    s, t, n = 5, 2, 3
    out_f, in_f = shape
    if chunk is not None:
        monkeypatch.setattr(Fn, "MERGE_CHUNK_ELEMENTS", chunk * out_f * in_f)
    x, base = rnd(s, t, in_f).requires_grad_(), rnd(out_f, in_f).requires_grad_()
    task, gates = rnd(n, out_f, in_f).requires_grad_(), rand_gates(s, n).requires_grad_()
    _gc(lambda *a: Fn.merged_linear(*a, alpha=0.7), x, base, task, gates)


@pytest.mark.parametrize("which", ["x", "base", "task", "gates"])
def test_gradcheck_merged_linear_partial_requires_grad(which):
    """Each input's gradient alone (the backward skips the others)."""
    s, t, n, out_f, in_f = 4, 2, 3, 4, 6
    inputs = {"x": rnd(s, t, in_f), "base": rnd(out_f, in_f), "task": rnd(n, out_f, in_f), "gates": rand_gates(s, n)}
    inputs[which].requires_grad_()
    _gc(lambda *a: Fn.merged_linear(*a, alpha=1.3), *inputs.values())


@pytest.mark.parametrize("mask", ["none", "ties"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_gradcheck_merge_weights(dynamic, mask):
    n, s, shape = 3, 2, (4, 6)
    base = rnd(*((s,) if dynamic else ()), *shape).requires_grad_()
    experts, gates = rnd(n, *shape).requires_grad_(), rand_gates(s, n).requires_grad_()
    fac = [f.requires_grad_() for f in ref.random_factors(2, n, *shape)]
    _gc(lambda b, e, g, *f: composed.merge_weights(b, e, g, f, mask, 0.8), base, experts, gates, *fac)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_gradcheck_merged_ffn(monkeypatch, dynamic, activation):
    monkeypatch.setattr(Fn, "MERGE_CHUNK_ELEMENTS", 2 * 4 * 4)  # chunked static path: 2 segments per chunk
    s, t, d, h, n = 3, 2, 4, 4, 2
    base, experts, fac, _ = _ffn_inputs(activation, n, d, h, dynamic, s, 1, "none")
    names = list(base)
    x, gates = rnd(s, t, d).requires_grad_(), rand_gates(s, n).requires_grad_()
    leaves = [x, gates] + [base[k].requires_grad_() for k in names] + [experts[k].requires_grad_() for k in names]
    leaves += [f.requires_grad_() for k in names for f in fac[k]]
    k = len(names)

    def fn(x_, g_, *rest):
        b = dict(zip(names, rest[:k]))
        e = dict(zip(names, rest[k:2 * k]))
        flat = rest[2 * k:]
        f = {nm: flat[4 * j:4 * j + 4] for j, nm in enumerate(names)}
        return composed.merged_ffn(x_, g_, b, e, f, "ties", 0.9, activation)

    _gc(fn, *leaves)

