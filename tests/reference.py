"""An independent, deliberately naive float64 reference of the CAMEx math, written from the spec
(`shared/design/camex.md` §1–§5), not from `camex_ds.moe.functional`.

Everything here is loops over experts / segments / matrices, explicit `einsum` of the index formula of §3
and explicit Kronecker products (`torch.kron`) as a cross-check. Slow and obviously correct is the goal.
All functions compute in float64 and return float64.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _d(t):
    return t.detach().to(F64) if isinstance(t, torch.Tensor) else t


# --------------------------------------------------------------------------- §3 Kronecker shape


def kron_factor_shape(n: int) -> tuple[int, int]:
    """`(a, n/a)`, `a` the largest divisor of n with a <= sqrt(n), by brute force."""
    best = 1
    for a in range(1, n + 1):
        if n % a == 0 and a * a <= n:
            best = a
    return best, n // best


def matrix_shapes(d: int, h: int, activation: str) -> dict:
    """`name -> (out, in)` (§1)."""
    if activation == "gelu":
        return {"w_in": (h, d), "w_out": (d, h)}
    if activation == "swiglu":
        return {"w_gate": (h, d), "w_up": (h, d), "w_down": (d, h)}
    raise ValueError(activation)


# --------------------------------------------------------------------------- §3 curvature operator


def curve_one(tau, a, b, c, d):
    """`M(τ)` for one expert: `τ [out,in]`, factors `A [R,o1,o1]`, `B [R,o2,o2]`, `C [R,i1,i1]`, `D [R,i2,i2]`.

    Literally the formula of §3: reshape τ row-major to `[o1,o2,i1,i2]`,
    `M[a,b,c,e] = (1/R) Σ_r Σ A[r,a,a'] B[r,b,b'] C[r,c,c'] D[r,e,e'] τ[a',b',c',e']`.
    """
    tau, a, b, c, d = map(_d, (tau, a, b, c, d))
    out_f, in_f = tau.shape
    o1, o2 = kron_factor_shape(out_f)
    i1, i2 = kron_factor_shape(in_f)
    assert a.shape[1:] == (o1, o1) and b.shape[1:] == (o2, o2)
    assert c.shape[1:] == (i1, i1) and d.shape[1:] == (i2, i2)
    rank = a.shape[0]
    t4 = tau.reshape(o1, o2, i1, i2)
    total = torch.zeros_like(t4)
    for r in range(rank):
        total += torch.einsum("pa,qb,sc,te,abce->pqst", a[r], b[r], c[r], d[r], t4)
    return (total / rank).reshape(out_f, in_f)


def curve_one_kron(tau, a, b, c, d):
    """The same operator as `(1/R) Σ_r (A_r ⊗ B_r) τ (C_r ⊗ D_r)ᵀ` with explicit Kronecker products."""
    tau, a, b, c, d = map(_d, (tau, a, b, c, d))
    rank = a.shape[0]
    return sum(torch.kron(a[r], b[r]) @ tau @ torch.kron(c[r], d[r]).T for r in range(rank)) / rank


def apply_curvature(tau, factors):
    """`tau [N,out,in]`, factors `(A [R,N,o1,o1], B, C, D)` -> `[N,out,in]`, one expert at a time."""
    tau = _d(tau)
    return torch.stack([curve_one(tau[i], *(f[:, i] for f in factors)) for i in range(tau.shape[0])])


def random_factors(rank, num, out_f, in_f, *, scale=0.3, generator=None):
    """Non-identity factors `I + scale·noise`, `[R, num, k, k]` each, float64."""
    dims = kron_factor_shape(out_f) + kron_factor_shape(in_f)
    return tuple(torch.eye(k, dtype=F64) + scale * torch.randn(rank, num, k, k, dtype=F64, generator=generator)
                 for k in dims)


# --------------------------------------------------------------------------- §3 masks


def ties_mask(tau):
    """`m_i = [sign(τ_i) == sign(Σ_j τ_j)]`, elementwise, 0/1, looping over experts."""
    tau = _d(tau)
    elected = torch.sign(tau.sum(0))
    return torch.stack([(torch.sign(tau[i]) == elected).to(F64) for i in range(tau.shape[0])])


# --------------------------------------------------------------------------- §2 routing


def topk_softmax_row(logits, top_k):
    """One row: keep the top_k largest logits, softmax over them, zero elsewhere."""
    n = logits.shape[0]
    order = sorted(range(n), key=lambda i: -float(logits[i]))[:top_k]
    vals = torch.stack([logits[i] for i in order])
    probs = torch.exp(vals - vals.max())
    probs = probs / probs.sum()
    out = torch.zeros(n, dtype=F64)
    for j, i in enumerate(order):
        out[i] = probs[j]
    return out


def segment_gates(x, w_gate, segment_len, top_k, causal, first_segment="uniform"):
    """`x [B,L,d]`, `w_gate [d,N]` -> gates `[B, L/T, N]` (noise-free), by loops."""
    x, w_gate = _d(x), _d(w_gate)
    bsz, length, _ = x.shape
    n = w_gate.shape[1]
    assert length % segment_len == 0
    segs = length // segment_len
    own = torch.zeros(bsz, segs, n, dtype=F64)
    for b in range(bsz):
        for s in range(segs):
            z = x[b, s * segment_len:(s + 1) * segment_len].mean(0)
            own[b, s] = topk_softmax_row(z @ w_gate, top_k)
    if not causal:
        return own
    used = torch.zeros_like(own)
    for b in range(bsz):
        for s in range(segs):
            if s > 0:
                used[b, s] = own[b, s - 1]
            elif first_segment == "uniform":
                used[b, s] = 1.0 / n
            elif first_segment == "self-detached":
                used[b, s] = own[b, 0]
            else:
                raise ValueError(first_segment)
    return used


# --------------------------------------------------------------------------- §3/§4 merging


def _mask_for(mask, tau, i):
    """The multiplier of expert i given the task vectors `tau [N,out,in]` of one segment."""
    if mask is None or (isinstance(mask, str) and mask == "none"):
        return torch.ones_like(tau[i])
    if isinstance(mask, str) and mask == "ties":
        return ties_mask(tau)[i]
    return _d(mask)[i]


def merge_weights(base, experts, gates, factors=None, mask="none", alpha=1.0):
    """`W_s = base_s + α Σ_i g_{s,i} (m_i ⊙ M_i(E_i − base_s))`, segment by segment, expert by expert.

    `base [out,in]` (static, §3) or `[S,out,in]` (the dynamic chain's per-segment base, §4); with a per-segment
    base, TIES elects its sign per segment from `E_i − base_s` (§4). `mask` is "none", "ties" or a tensor of
    multipliers `[N,out,in]` shared by all segments.
    """
    base, experts, gates = _d(base), _d(experts), _d(gates)
    num_seg, n = gates.shape
    out = []
    for s in range(num_seg):
        b_s = base if base.dim() == 2 else base[s]
        tau = torch.stack([experts[i] - b_s for i in range(n)])
        w = b_s.clone()
        for i in range(n):
            curved = tau[i] if factors is None else curve_one(tau[i], *(f[:, i] for f in factors))
            w = w + alpha * gates[s, i] * (_mask_for(mask, tau, i) * curved)
        out.append(w)
    return torch.stack(out)


# --------------------------------------------------------------------------- §1 the FFN


def gelu(x):
    """Exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + torch.exp(-x))


def ffn(x, w: dict, activation: str):
    """`x [T,d]` through one expert FFN with matrices `w` (§1)."""
    x = _d(x)
    if activation == "gelu":
        return gelu(x @ w["w_in"].T) @ w["w_out"].T
    if activation == "swiglu":
        return (silu(x @ w["w_gate"].T) * (x @ w["w_up"].T)) @ w["w_down"].T
    raise ValueError(activation)


def merged_ffn(x, gates, base: dict, experts: dict, factors=None, mask="none", alpha=1.0, activation="gelu"):
    """`x [S,T,d]` -> `[S,T,d]`: each segment through `FFN(x_s; W_s)` with every matrix merged separately."""
    x = _d(x)
    weights = {}
    for name in base:
        f = None if factors is None else factors[name]
        m = mask[name] if isinstance(mask, dict) else mask
        weights[name] = merge_weights(base[name], experts[name], gates, f, m, alpha)
    return torch.stack([ffn(x[s], {n: weights[n][s] for n in weights}, activation) for s in range(x.shape[0])])


def ffn_per_segment(x, weights: dict, activation: str):
    """`x [S,T,d]` with per-segment weights `name -> [S,out,in]`."""
    x = _d(x)
    return torch.stack([ffn(x[s], {n: weights[n][s] for n in weights}, activation) for s in range(x.shape[0])])


# --------------------------------------------------------------------------- aux loss (§2)


def cv_squared(v):
    v = _d(v)
    if v.numel() <= 1:
        return torch.zeros((), dtype=F64)
    return v.var() / v.mean() ** 2
