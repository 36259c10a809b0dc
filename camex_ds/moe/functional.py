"""The CAMEx functional core (spec §5): pure, differentiable, dtype-preserving tensor functions.

Shapes follow the spec: an expert matrix is `[out, in]`, a stack of experts `[N, out, in]`, curvature
factors `(A [R,N,o1,o1], B [R,N,o2,o2], C [R,N,i1,i1], D [R,N,i2,i2])`, gates `[S, N]` over segments.
The modules in this package are thin shells over these functions; nothing here knows about processes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Factors = Sequence[Tensor]
Mask = Union[str, Tensor, None]
MASKS = ("none", "ties")

# Segments are merged in chunks of at most this many weight elements, so the merged-weight
# transient stays a few MiB whatever the batch; big enough that each chunk's GEMM is efficient.
MERGE_CHUNK_ELEMENTS = 1 << 21


def kron_factor_shape(n: int) -> tuple[int, int]:
    """`(a, n // a)` with `a` the largest divisor of `n` not above `sqrt(n)` (§3)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"kron_factor_shape needs a positive integer, got {n!r}")
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def identity_factors(rank: int, num: int, out_features: int, in_features: int, *, dtype=None, device=None):
    """Identity Kronecker factors `[R, num, k, k]` for a matrix of shape `[out, in]`."""
    dims = kron_factor_shape(out_features) + kron_factor_shape(in_features)
    return tuple(torch.eye(k, dtype=dtype, device=device).expand(rank, num, k, k).clone() for k in dims)


def _curve(t: Tensor, factors: Factors) -> Tensor:
    """`M(t)` for `t [*b, out, in]` and factors `[R, *b', k, k]` with `b'` broadcastable to `b`.

    `M(t) = (A⊗B) t (C⊗D)ᵀ`, done as four plain batched GEMMs (`2·R·(o1+o2+i1+i2)·out·in` FLOPs): A
    from the left and D from the right on `t`, then C from the left and B from the right on `tᵀ`, so
    every factor meets a wide operand (BLAS-friendly) and only one transpose is copied each way.
    """
    a, b, c, d = factors
    rank, (o1, o2, i1, i2) = a.shape[0], (f.shape[-1] for f in factors)
    batch, (out_f, in_f) = t.shape[:-2], t.shape[-2:]
    x = a @ t.reshape(*batch, o1, o2 * in_f)
    x = x.reshape(rank, *batch, out_f * i1, i2) @ d.transpose(-1, -2)
    x = x.reshape(rank, *batch, out_f, in_f).transpose(-1, -2).contiguous()
    x = c @ x.reshape(rank, *batch, i1, i2 * out_f)
    x = x.reshape(rank, *batch, in_f * o1, o2) @ b.transpose(-1, -2)
    x = x.reshape(rank, *batch, in_f, out_f).transpose(-1, -2)
    return (x[0] if rank == 1 else x.mean(0)).contiguous()


def _check_factors(tau: Tensor, factors: Factors) -> None:
    if len(factors) != 4:
        raise ValueError(f"factors must be the four Kronecker factors (A, B, C, D), got {len(factors)} tensors")
    n, out_f, in_f = tau.shape[-3:]
    want = kron_factor_shape(out_f) + kron_factor_shape(in_f)
    rank = factors[0].shape[0]
    for name, f, k in zip("ABCD", factors, want):
        if tuple(f.shape) != (rank, n, k, k):
            raise ValueError(f"factor {name} has shape {tuple(f.shape)}; for tau [{n},{out_f},{in_f}] "
                             f"it must be [{rank},{n},{k},{k}]")


def apply_curvature(tau: Tensor, factors: Factors) -> Tensor:
    """`M_i(tau_i)` for every expert: `tau [N,out,in]` -> `[N,out,in]` (§3, with the 1/R normalisation)."""
    _check_factors(tau, factors)
    return _curve(tau, factors)


@torch.no_grad()
def ties_mask(tau: Tensor, total: Optional[Tensor] = None) -> Tensor:
    """`[sign(tau_i) == sign(sum_j tau_j)]` as 0/1 in `tau`'s dtype.

    `total` is the elected sum when the experts are spread over ranks (the all-reduced `sum_j tau_j`).
    """
    if total is None:
        total = tau.sum(0)
    return (torch.sign(tau) == torch.sign(total)).to(tau.dtype)


def dare_mask(shape, p: float, *, dtype=torch.float32, device=None, generator=None) -> Tensor:
    """DARE's drop-and-rescale multipliers `Bernoulli(1-p) / (1-p)`, one draw per element."""
    keep = torch.full(shape, 1.0 - p, dtype=dtype, device=device)
    return torch.bernoulli(keep, generator=generator) / (1.0 - p)


def curved_task_vectors(tau: Tensor, factors: Optional[Factors] = None, mask: Mask = "none",
                        total: Optional[Tensor] = None) -> Tensor:
    """`m_i ⊙ M_i(tau_i)`: the mask is computed from the raw `tau` and multiplies the curved vector (§3)."""
    curved = tau if factors is None else apply_curvature(tau, factors)
    if isinstance(mask, Tensor):
        return curved * mask
    if mask is None or mask == "none":
        return curved
    if mask == "ties":
        return curved * ties_mask(tau, total)
    raise ValueError(f"mask={mask!r} is invalid: expected one of {', '.join(MASKS)} or a tensor of multipliers")


def summarize_segments(x: Tensor, segment_len: int) -> Tensor:
    """Mean of each segment's tokens: `x [B,L,d]` -> `[B, L//T, d]`."""
    if x.dim() != 3:
        raise ValueError(f"hidden states must be [batch, seq_len, hidden], got shape {tuple(x.shape)}")
    bsz, length, dim = x.shape
    if segment_len < 1 or length % segment_len:
        raise ValueError(f"sequence length L={length} is not a multiple of the segment length T={segment_len}")
    return x.reshape(bsz, length // segment_len, segment_len, dim).mean(2)


def topk_softmax(logits: Tensor, top_k: int) -> Tensor:
    """Softmax over the `top_k` largest logits, zero elsewhere; `top_k = N` is a plain softmax."""
    n = logits.shape[-1]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k={top_k} is invalid: expected an integer in [1, {n}] (the number of experts)")
    if top_k == n:
        return torch.softmax(logits, dim=-1)
    values, index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, dim=-1))


def causal_shift(gates: Tensor, first_segment: str = "uniform") -> Tensor:
    """Segment j takes the gates of segment j-1 (§2); `gates [B, S, N]`."""
    if first_segment == "uniform":
        first = torch.full_like(gates[:, :1], 1.0 / gates.shape[-1])
    elif first_segment == "self-detached":
        first = gates[:, :1].detach()
    else:
        raise ValueError(f"first_segment={first_segment!r} is invalid: expected one of uniform, self-detached")
    return torch.cat([first, gates[:, :-1]], dim=1)


def segment_gates(x: Tensor, w_gate: Tensor, segment_len: int, top_k: int, causal: bool,
                  first_segment: str = "uniform") -> Tensor:
    """Noise-free routing gates `[B, L//T, N]` from segment means (§2)."""
    gates = topk_softmax(summarize_segments(x, segment_len) @ w_gate, top_k)
    return causal_shift(gates, first_segment) if causal else gates


def merge_rows(base: Tensor, task_flat: Tensor, gates: Tensor, alpha: float) -> Tensor:
    """`base + alpha * gates @ task` for a static base `[out,in]`: `[S, out, in]`."""
    merged = torch.addmm(base.reshape(1, -1), gates, task_flat, alpha=alpha)
    return merged.view(gates.shape[0], *base.shape)


def _segment_chunk(num_segments: int, weight_numel: int) -> int:
    return max(1, min(num_segments, MERGE_CHUNK_ELEMENTS // max(1, weight_numel)))


def _row_inner_products(a: Tensor, b: Tensor, blocks: int = 64) -> Tensor:
    """`a @ b.T` for short, very wide `a [m,P]`, `b [k,P]`: BLAS runs such a reduction on one core, so
    split P into blocks, batch them, and sum."""
    width = a.shape[1]
    if width % blocks:
        return a @ b.t()
    a3 = a.view(a.shape[0], blocks, -1).transpose(0, 1)
    b3 = b.view(b.shape[0], blocks, -1).transpose(0, 1)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


class _MergedLinear(torch.autograd.Function):
    """`y_s = x_s (B + alpha Σ_i g_si τ̃_i)ᵀ` without keeping the per-segment weights.

    Forward and backward rebuild each chunk's merged weights from `base`, `τ̃` and the gates (one
    `(c×N)·(N×P)` GEMM, cheap next to the FFN GEMMs when T > N), so the saved state is `N·P`, not `S·P`.
    """

    @staticmethod
    def forward(ctx, x, base, task, gates, alpha):
        segments = x.shape[0]
        task_flat = task.reshape(task.shape[0], -1)
        out = x.new_empty(segments, x.shape[1], base.shape[0])
        chunk = _segment_chunk(segments, base.numel())
        for s in range(0, segments, chunk):
            weight = merge_rows(base, task_flat, gates[s:s + chunk], alpha)
            torch.bmm(x[s:s + chunk], weight.transpose(1, 2), out=out[s:s + chunk])
        ctx.save_for_backward(x, base, task, gates)
        ctx.alpha = alpha
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, base, task, gates = ctx.saved_tensors
        alpha, segments = ctx.alpha, x.shape[0]
        need_x, need_base, need_task, need_gates = ctx.needs_input_grad[:4]
        task_flat = task.reshape(task.shape[0], -1)
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_gates = torch.empty_like(gates) if need_gates else None
        grad_base = torch.zeros_like(base).reshape(-1) if need_base else None
        grad_task = torch.zeros_like(task_flat) if need_task else None
        chunk = _segment_chunk(segments, base.numel())
        for s in range(0, segments, chunk):
            e = min(s + chunk, segments)
            if need_x:
                torch.bmm(grad_out[s:e], merge_rows(base, task_flat, gates[s:e], alpha), out=grad_x[s:e])
            grad_w = torch.bmm(grad_out[s:e].transpose(1, 2), x[s:e]).reshape(e - s, -1)
            if need_base:
                grad_base += grad_w.sum(0)
            if need_task:
                grad_task.addmm_(gates[s:e].t(), grad_w, alpha=alpha)
            if need_gates:
                grad_gates[s:e] = _row_inner_products(grad_w, task_flat) * alpha
        return (grad_x, None if grad_base is None else grad_base.view_as(base),
                None if grad_task is None else grad_task.view_as(task), grad_gates, None)


def merged_linear(x: Tensor, base: Tensor, task: Tensor, gates: Tensor, alpha: float = 1.0) -> Tensor:
    """Apply each segment's merged matrix: `x [S,T,in]`, static `base [out,in]`, `task [N,out,in]`
    (the masked, curved task vectors), `gates [S,N]` -> `[S,T,out]`."""
    return _MergedLinear.apply(x.contiguous(), base, task.contiguous(), gates.contiguous(), float(alpha))


def dynamic_merge(base: Tensor, curved_experts: Tensor, gates: Tensor, factors: Optional[Factors],
                  mask: Mask, alpha: float, raw_experts: Optional[Tensor] = None) -> Tensor:
    """`Ŵ_s = base_s + α Σ_i g_si m_si ⊙ (M_i(E_i) − M_i(base_s))` for a per-segment base (§4).

    `curved_experts` is `M_i(E_i)` (computed once per forward, possibly on other ranks); the
    per-segment term `M_i(base_s)` is built one expert at a time so no `[S, N, out, in]` tensor exists.
    `raw_experts` (the `E_i`) is needed only for the per-segment TIES election.
    """
    merged = torch.zeros_like(base)
    if mask == "ties":
        total = torch.sign(raw_experts.sum(0) - curved_experts.shape[0] * base)
    for i in range(curved_experts.shape[0]):
        term = curved_experts[i] - (base if factors is None else _curve(base, [f[:, i:i + 1] for f in factors]))
        if isinstance(mask, Tensor):
            term = term * mask[i]
        elif mask == "ties":
            term = term * (torch.sign(raw_experts[i] - base) == total).to(base.dtype)
        elif mask not in (None, "none"):
            raise ValueError(f"mask={mask!r} is invalid: expected one of {', '.join(MASKS)} or a tensor")
        merged = merged + gates[:, i, None, None] * term
    return base + alpha * merged


def merge_weights(base: Tensor, experts: Tensor, gates: Tensor, factors: Optional[Factors] = None,
                  mask: Mask = "none", alpha: float = 1.0) -> Tensor:
    """Per-segment merged weights `[S,out,in]` (§3; §4 when `base` is per-segment `[S,out,in]`)."""
    if base.dim() == 2:
        task = curved_task_vectors(experts - base, factors, mask)
        return merge_rows(base, task.reshape(task.shape[0], -1), gates, alpha)
    if base.dim() != 3 or base.shape[0] != gates.shape[0]:
        raise ValueError(f"base must be [out,in] or [S,out,in] with S={gates.shape[0]}, got {tuple(base.shape)}")
    if factors is not None:
        _check_factors(experts, factors)
    curved = experts if factors is None else _curve(experts, factors)
    return dynamic_merge(base, curved, gates, factors, mask, alpha, raw_experts=experts)


def expert_matrix_names(activation: str) -> tuple[str, ...]:
    if activation == "gelu":
        return ("w_in", "w_out")
    if activation == "swiglu":
        return ("w_gate", "w_up", "w_down")
    raise ValueError(f"activation={activation!r} is invalid: expected one of gelu, swiglu")


def ffn(x: Tensor, linear, activation: str) -> Tensor:
    """The expert FFN of §1 with `linear(name, input)` applying the named matrix."""
    if activation == "gelu":
        return linear("w_out", F.gelu(linear("w_in", x)))
    return linear("w_down", F.silu(linear("w_gate", x)) * linear("w_up", x))


def merged_ffn(x: Tensor, gates: Tensor, base: dict, experts: dict, factors: Optional[dict] = None,
               mask: Union[str, dict] = "none", alpha: float = 1.0, activation: str = "gelu") -> Tensor:
    """`y_s = FFN(x_s; W_s)` with each matrix merged by `merge_weights`: `x [S,T,d]` -> `[S,T,d]`."""
    names = expert_matrix_names(activation)
    missing = [n for n in names if n not in base or n not in experts]
    if missing:
        raise ValueError(f"activation {activation!r} needs matrices {names}; missing {missing}")

    def linear(name: str, inp: Tensor) -> Tensor:
        m = mask[name] if isinstance(mask, dict) else mask
        f = None if factors is None else factors[name]
        if base[name].dim() == 2:
            return merged_linear(inp, base[name], curved_task_vectors(experts[name] - base[name], f, m), gates, alpha)
        return torch.bmm(inp, merge_weights(base[name], experts[name], gates, f, m, alpha).transpose(1, 2))

    return ffn(x, linear, activation)
