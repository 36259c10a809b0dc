"""The CAMEx functional core (spec §5): pure, differentiable, dtype-preserving tensor functions.

Shapes follow the spec: an expert matrix is `[out, in]`, a stack of experts `[N, out, in]`, curvature
factors `(A [R,N,o1,o1], B [R,N,o2,o2], C [R,N,i1,i1], D [R,N,i2,i2])`, gates `[S, N]` over segments.
The modules in this package are thin shells over these functions; nothing here knows about processes.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .masks import MaskKind, mask_kind

Factors = Sequence[Tensor]


# Segments are merged in chunks of at most this many weight elements. On CPU the merged-weight transient
# stays a few MiB (in cache) whatever the batch, big enough that each chunk's GEMM is efficient; on a GPU a
# chunk is as many segments as fit in a few hundred MiB, since each kernel launch there needs a lot of work.
MERGE_CHUNK_ELEMENTS = 1 << 21
MERGE_CHUNK_ELEMENTS_GPU = 1 << 27


_SCRATCH = threading.local()


def _scratch(slot: str, shape, like: Tensor) -> Tensor:
    """A work buffer that never leaves the function using it, reused across calls on CPU (per thread and slot).

    The CPU allocator hands blocks of this size back to the OS when freed, so a fresh one page-faults on
    every step, which costs more than the arithmetic of the skinny GEMMs writing it. Other devices have a
    caching allocator: they get a plain new tensor. Buffers made under `torch.inference_mode` cannot be
    written outside it, so each mode has its own. Under `torch.compile` the compiler owns memory planning.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():  # a compiled graph plans its own buffers
        return like.new_empty(shape)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel, key = math.prod(shape), (slot, like.dtype, torch.is_inference_mode_enabled())
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


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


def _rotate(f: Tensor, u: Tensor, out: Tensor, accumulate: bool = False) -> Tensor:
    """One mode product on the trailing mode: `u` holds items whose last mode has size `m = f.shape[-1]`;
    `out [n, m, rest] = f @ u.view(n, rest, m)ᵀ`, which also rotates that mode to the front. Four of them
    (D, C, B, A) apply `M` and restore the `[o1,o2,i1,i2]` layout with no transposing copy, each one a
    single batched GEMM whose transposed operand the BLAS reads in place."""
    n, m = f.shape[0], f.shape[-1]
    u = u.view(n, -1, m).transpose(1, 2)
    if accumulate:
        return out.view(n, m, -1).baddbmm_(f, u)
    return torch.bmm(f, u, out=out.view(n, m, -1))


class _Curvature(torch.autograd.Function):
    """`m ⊙ M(t)` for `t [nb,out,in]`, factors `[R, nf, k, k]` (`nf` = 1 broadcasts over the items).

    `M(x) = (1/R) Σ_r x ×₄D_r ×₃C_r ×₂B_r ×₁A_r` on `x` viewed as `[o1,o2,i1,i2]`, one `_rotate` GEMM per
    mode over all items at once. The backward recomputes each product's input (three GEMMs) instead of
    keeping `3·R·nb·out·in` elements from the forward: as fast here, since fresh buffers that size cost as
    much in page faults, and the memory stays that of the batch's activations. The optional mask is a tensor
    of multipliers `[nb,out,in]` or, for TIES, `sign(Σ_j τ_j) [out,in]`, from which the 0/1 mask is rebuilt.
    """

    @staticmethod
    def forward(ctx, t, mask, sign_total, a, b, c, d):
        nb = t.shape[0]
        rank, nf = a.shape[:2]
        if nf != nb:
            a, b, c, d = (f.expand(rank, nb, *f.shape[2:]) for f in (a, b, c, d))
        d_scaled = d if rank == 1 else d / rank
        res = torch.empty_like(t)
        inter = _scratch("curvature_inter", (3, *t.shape), t)
        for r in range(rank):
            _Curvature.chain(t, (d_scaled[r], c[r], b[r]), inter)
            _rotate(a[r], inter[2], res, accumulate=r > 0)
        if mask is not None:
            res.mul_(mask)
        elif sign_total is not None:
            res.mul_(torch.sign(t) == sign_total)
        ctx.broadcast = nf != nb
        ctx.save_for_backward(t, mask, sign_total, a, b, c, d_scaled)
        return res

    @staticmethod
    def chain(t: Tensor, factors, out: Tensor) -> None:
        """The first three products of the chain, `out[k]` = input of product k+1."""
        u = t
        for k, f in enumerate(factors):
            u = _rotate(f, u, out[k])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        t, mask, sign_total, a, b, c, d_scaled = ctx.saved_tensors
        rank = a.shape[0]
        need_t, need_f = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:7])
        if mask is None and sign_total is None:
            gy = grad.contiguous()
        else:
            gy = torch.mul(grad, mask if mask is not None else torch.sign(t) == sign_total,
                           out=_scratch("curvature_grad", t.shape, t))
        grad_t = torch.empty_like(t) if need_t else None
        grads = [t.new_empty(rank, *f.shape[1:]) for f in (a, b, c, d_scaled)] if need_f else None
        inter = _scratch("curvature_inter", (3, *t.shape), t)
        work = _scratch("curvature_work", (2, *t.shape), t)
        for r in range(rank):
            _Curvature.chain(t, (d_scaled[r], c[r], b[r]), inter)
            # back through A, B, C, D: product k had input `inputs[k]` and factor `factors[k]`
            factors, inputs = (a[r], b[r], c[r], d_scaled[r]), (inter[2], inter[1], inter[0], t)
            g = gy
            for k, (f, u) in enumerate(zip(factors, inputs)):
                n, m = f.shape[0], f.shape[-1]
                gv = g.view(n, m, -1)
                if need_f:  # d/dF = g uᵀ in the rotated layouts: [n,m,rest] @ [n,rest,m]
                    torch.bmm(gv, u.view(n, -1, m), out=grads[k][r])
                if k == 3 and not need_t:
                    break
                dest = work[k % 2] if k < 3 else grad_t
                if k == 3 and r:
                    dest.view(n, -1, m).baddbmm_(gv.transpose(1, 2), f)
                else:
                    torch.bmm(gv.transpose(1, 2), f, out=dest.view(n, -1, m))
                g = dest
        ga = gb = gc = gd = None
        if need_f:
            ga, gb, gc, gd = grads
            if rank > 1:
                gd.mul_(1.0 / rank)
            if ctx.broadcast:
                ga, gb, gc, gd = (f.sum(1, keepdim=True) for f in (ga, gb, gc, gd))
        return grad_t, None, None, ga, gb, gc, gd


def _curve(t: Tensor, factors: Factors, mask: Optional[Tensor] = None, sign_total: Optional[Tensor] = None) -> Tensor:
    """`m ⊙ M(t)` for `t [*b, out, in]` and factors `[R, *b', k, k]` with `b'` broadcastable to `b`.

    `M(t) = (1/R) Σ_r (A_r⊗B_r) t (C_r⊗D_r)ᵀ` as four mode products per item and rank
    (`2·R·(o1+o2+i1+i2)·out·in` FLOPs per item), see `_Curvature`. `mask` (multipliers shaped like `t`)
    or `sign_total` (TIES: keep where `sign(t_i) == sign_total`) multiply the result.
    """
    a = factors[0]
    rank, batch, (out_f, in_f) = a.shape[0], t.shape[:-2], t.shape[-2:]
    nb = math.prod(batch)
    fbatch = a.shape[1:-2]
    if math.prod(fbatch) == 1:
        flat = [f.reshape(rank, 1, f.shape[-2], f.shape[-1]) for f in factors]
    else:
        flat = [f.expand(rank, *batch, f.shape[-2], f.shape[-1]).reshape(rank, nb, f.shape[-2], f.shape[-1])
                for f in factors]
    t3 = t.reshape(nb, out_f, in_f).contiguous()
    if mask is not None:
        mask = mask.reshape(nb, out_f, in_f).contiguous()
    if sign_total is not None:
        sign_total = sign_total.contiguous()
    return _Curvature.apply(t3, mask, sign_total, *flat).view(t.shape)


def curvature_flops(out_features: int, in_features: int, rank: int) -> int:
    """Matmul FLOPs of one `M_i` application to an `[out, in]` matrix: `2·R·(o1+o2+i1+i2)·out·in` (§3)."""
    return 2 * rank * (sum(kron_factor_shape(out_features)) + sum(kron_factor_shape(in_features))) \
        * out_features * in_features


def curvature_backward_flops(out_features: int, in_features: int, rank: int) -> int:
    """Matmul FLOPs of `_Curvature.backward` for one application: it recomputes the forward's first three
    products (D, C, B), then runs two GEMMs per factor (the factor's gradient and the gradient flowing on):
    `2·R·(2·(o1+o2+i1+i2) + i2+i1+o2)·out·in`."""
    (o1, o2), (i1, i2) = kron_factor_shape(out_features), kron_factor_shape(in_features)
    return 2 * rank * (2 * (o1 + o2 + i1 + i2) + i2 + i1 + o2) * out_features * in_features


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
    return torch.bernoulli(keep, generator=generator).div_(1.0 - p)


class _SignMasked(torch.autograd.Function):
    """`t_i ⊙ [sign(t_i) == sign_total]` (TIES without curvature); the 0/1 mask is rebuilt in the backward
    instead of being saved."""

    @staticmethod
    def forward(ctx, t, sign_total):
        ctx.save_for_backward(t, sign_total)
        return t * (torch.sign(t) == sign_total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        t, sign_total = ctx.saved_tensors
        return grad * (torch.sign(t) == sign_total), None


class _TaskVectors(torch.autograd.Function):
    """`stack(E_i) − B` in one pass into one new tensor (no stacked copy of the experts first); the backward
    hands each expert a view of the gradient and the base `−Σ_i grad_i`."""

    @staticmethod
    def forward(ctx, base, *experts):
        tau = base.new_empty(len(experts), *base.shape)
        for i, e in enumerate(experts):
            torch.sub(e, base, out=tau[i])
        return tau

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (grad.sum(0).neg_(), *grad.unbind(0))


def task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """`τ_i = E_i − B` for a list of expert matrices `[out,in]`: `[N,out,in]` (§3)."""
    return _TaskVectors.apply(base, *experts)


def curved_task_vectors(tau: Tensor, factors: Optional[Factors] = None, mask: MaskKind = MaskKind.NONE,
                        total: Optional[Tensor] = None, multipliers: Optional[Tensor] = None) -> Tensor:
    """`m_i ⊙ M_i(tau_i)`: the mask is computed from the raw `tau` and multiplies the curved vector (§3); DARE's
    `multipliers` come with it, and `total` is TIES's `Σ_j τ_j` over every expert (default: over `tau`'s)."""
    mask = mask_kind(mask)
    sign_total = None
    if mask is MaskKind.TIES:  # elected once; each expert's 0/1 mask is rebuilt in cache where it is applied
        with torch.no_grad():
            sign_total = torch.sign(tau.detach().sum(0) if total is None else total.detach()).to(tau.dtype)
    dropped = multipliers if mask is MaskKind.DARE else None
    if factors is None:
        if dropped is not None:
            return tau * dropped
        return _SignMasked.apply(tau.contiguous(), sign_total.contiguous()) if sign_total is not None else tau
    _check_factors(tau, factors)
    if sign_total is not None:
        return _curve(tau, factors, sign_total=sign_total)
    if dropped is not None:
        if dropped.shape != tau.shape or dropped.dtype != tau.dtype or dropped.requires_grad:
            return _curve(tau, factors) * dropped
        return _curve(tau, factors, mask=dropped.detach())
    return _curve(tau, factors)


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


def merge_rows(base: Tensor, task_flat: Tensor, gates: Tensor, alpha: float) -> Tensor:
    """`base + alpha * gates @ task` for a static base `[out,in]`: `[S, out, in]`."""
    merged = torch.addmm(base.reshape(1, -1), gates, task_flat, alpha=alpha)
    return merged.view(gates.shape[0], *base.shape)


def segment_chunk(num_segments: int, weight_numel: int, like: Tensor) -> int:
    """How many segments `merged_linear` merges at once: as many `weight_numel`-element weights as fit in
    `MERGE_CHUNK_ELEMENTS` (`_GPU` off the CPU), at least one."""
    limit = MERGE_CHUNK_ELEMENTS if like.device.type == "cpu" else MERGE_CHUNK_ELEMENTS_GPU
    return max(1, min(num_segments, limit // max(1, weight_numel)))


def _reduction_blocks(a: Tensor) -> int:
    """How many blocks `_row_inner_products` splits the width into: a few per CPU thread, up to 1024 on a GPU."""
    width = a.shape[1]
    if torch.compiler.is_compiling():  # the compiler schedules the reduction itself
        return 1
    if a.device.type != "cpu":
        return math.gcd(width, 1024)
    blocks = 2 * torch.get_num_threads()
    return 1 if blocks == 2 or width % blocks else blocks


def _row_inner_products(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b.T` for short, very wide `a [m,P]`, `b [k,P]`: BLAS runs such a reduction on one core (cuBLAS on a
    few thread blocks), so split P into `_reduction_blocks` blocks, batch them, and sum."""
    blocks = _reduction_blocks(a)
    if blocks == 1:
        return a @ b.t()
    a3 = a.view(a.shape[0], blocks, -1).transpose(0, 1)
    b3 = b.view(b.shape[0], blocks, -1).transpose(0, 1)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


def _merge_operands(base: Tensor, task: Tensor, gates: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """`W = coef @ stacked` for every segment at once: `stacked = [τ̃; B] [N+1, P]`, `coef = [α g, 1] [S, N+1]`.

    Folding the base into the GEMM writes each merged weight once (no broadcast copy of `B` first).
    """
    stacked = torch.cat([task.reshape(task.shape[0], -1), base.reshape(1, -1)])
    coef = torch.cat([gates * alpha, gates.new_ones(gates.shape[0], 1)], dim=1)
    return stacked, coef


class _MergedLinear(torch.autograd.Function):
    """`y_s = x_s (B + alpha Σ_i g_si τ̃_i)ᵀ` without keeping the per-segment weights.

    Segments go in chunks (`MERGE_CHUNK_ELEMENTS`) through one reused merged-weight buffer. Forward and
    backward rebuild each chunk's merged weights with one `(c×(N+1))·((N+1)×P)` GEMM (cheap next to the FFN
    GEMMs when T > N), so the saved state is `(N+1)·P`, not `S·P`. The backward computes a chunk's weight
    gradients `G_s = gy_sᵀ x_s` once and reduces them while they are in cache: `[α g, 1]ᵀ G` gives the task
    and base gradients in one GEMM, `α G τ̃ᵀ` the gate gradients.
    """

    @staticmethod
    def forward(ctx, x, base, task, gates, alpha):
        segments, tokens = x.shape[:2]
        out_f, in_f = base.shape
        stacked, coef = _merge_operands(base, task, gates, alpha)
        out = x.new_empty(segments, tokens, out_f)
        chunk = segment_chunk(segments, base.numel(), x)
        weight = _scratch("merged_weight", (chunk, out_f, in_f), x)
        for s in range(0, segments, chunk):
            e = min(s + chunk, segments)
            w = weight[:e - s]
            torch.mm(coef[s:e], stacked, out=w.view(e - s, -1))
            torch.bmm(x[s:e], w.transpose(1, 2), out=out[s:e])
        ctx.save_for_backward(x, stacked, gates)
        ctx.alpha = alpha
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, stacked, gates = ctx.saved_tensors
        alpha, (segments, _, in_f), num = ctx.alpha, x.shape, stacked.shape[0] - 1
        out_f = stacked.shape[1] // in_f
        need_x, need_base, need_task, need_gates = ctx.needs_input_grad[:4]
        coef = torch.cat([gates * alpha, gates.new_ones(segments, 1)], dim=1)
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_gates = torch.empty_like(gates) if need_gates else None
        # rows of `stacked` whose gradient is wanted: tasks 0..N-1, base N
        rows = slice(0 if need_task else num, num + 1 if need_base else num)
        need_stacked = rows.start < rows.stop
        grad_stacked = stacked.new_empty(rows.stop - rows.start, stacked.shape[1]) if need_stacked else None
        chunk = segment_chunk(segments, stacked.shape[1], x)
        weight = _scratch("merged_weight", (chunk, out_f, in_f), x) if need_x else None
        grad_w = _scratch("merged_weight_grad", (chunk, out_f, in_f), x) if (need_stacked or need_gates) else None
        for s in range(0, segments, chunk):
            e = min(s + chunk, segments)
            if need_x:
                w = weight[:e - s]
                torch.mm(coef[s:e], stacked, out=w.view(e - s, -1))
                torch.bmm(grad_out[s:e], w, out=grad_x[s:e])
            if grad_w is None:
                continue
            gw = grad_w[:e - s]
            torch.bmm(grad_out[s:e].transpose(1, 2), x[s:e], out=gw)
            gw = gw.view(e - s, -1)
            if need_stacked:  # the first chunk writes, the others accumulate: no zero fill
                torch.addmm(grad_stacked, coef[s:e, rows].t(), gw, beta=1 if s else 0, out=grad_stacked)
            if need_gates:
                torch.mul(_row_inner_products(gw, stacked[:num]), alpha, out=grad_gates[s:e])
        grad_base = grad_task = None
        if need_task:
            grad_task = grad_stacked[:num].view(num, out_f, in_f)
        if need_base:
            grad_base = grad_stacked[-1].view(out_f, in_f)
            if need_task:  # do not pin the task gradient's storage through the base's
                grad_base = grad_base.clone()
        return grad_x, grad_base, grad_task, grad_gates, None


def merged_linear(x: Tensor, base: Tensor, task: Tensor, gates: Tensor, alpha: float = 1.0) -> Tensor:
    """Apply each segment's merged matrix: `x [S,T,in]`, static `base [out,in]`, `task [N,out,in]`
    (the masked, curved task vectors), `gates [S,N]` -> `[S,T,out]`."""
    return _MergedLinear.apply(x.contiguous(), base, task, gates.contiguous(), float(alpha))


def dynamic_merge(base: Tensor, curved_experts: Tensor, gates: Tensor, factors: Optional[Factors],
                  mask: MaskKind, alpha: float, raw_experts: Optional[Tensor] = None,
                  multipliers: Optional[Tensor] = None) -> Tensor:
    """`Ŵ_s = base_s + α Σ_i g_si m_si ⊙ (M_i(E_i) − M_i(base_s))` for a per-segment base (§4).

    `curved_experts` is `M_i(E_i)` (computed once per forward, possibly on other ranks); the
    per-segment term `M_i(base_s)` is built one expert at a time so no `[S, N, out, in]` tensor exists.
    `raw_experts` (the `E_i`) is needed only for the per-segment TIES election, `multipliers` only for DARE.
    """
    mask = mask_kind(mask)
    merged = torch.zeros_like(base)
    if mask is MaskKind.TIES:
        total = torch.sign(raw_experts.sum(0) - curved_experts.shape[0] * base)
    for i in range(curved_experts.shape[0]):
        term = curved_experts[i] - (base if factors is None else _curve(base, [f[:, i:i + 1] for f in factors]))
        if mask is MaskKind.DARE and multipliers is not None:
            term = term * multipliers[i]
        elif mask is MaskKind.TIES:
            term = term * (torch.sign(raw_experts[i] - base) == total).to(base.dtype)
        merged = merged + gates[:, i, None, None] * term
    return base + alpha * merged


def span_images(basis: Tensor, curved_experts: Tensor, factors: Optional[Factors], mask: Optional[Tensor]) -> Tensor:
    """`Z_i = m_i ⊙ [M_i(E_i), M_i(V_1), …, M_i(V_K)]` `[n, K+1, out, in]`: a chain layer's images of its own
    experts (`curved_experts` = `M_i(E_i)`, already computed) and of the chain's span basis `V [K, out, in]`
    (§4 through the span, see `camex_ds.moe.chain`). `mask` is DARE's `[n, out, in]` multipliers or None."""
    n, size = curved_experts.shape[0], basis.shape[0]
    images = basis.unsqueeze(0).expand(n, size, *basis.shape[1:])
    if factors is not None:
        images = _curve(images, [f.unsqueeze(2) for f in factors])
    z = torch.cat([curved_experts.unsqueeze(1), images], 1)
    return z if mask is None else z * mask.unsqueeze(1)


def span_merge(previous: Tensor, gates: Tensor, coef: Tensor, images: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """One chain layer through the span: `Ŵ^l_s = Ŵ^{l−1}_s + α Σ_i g_si (Z_i0 − Σ_j β_sj Z_ij)`, which equals
    the §4 recursion when `Ŵ^{l−1}_s = Σ_j β_sj V_j` (`coef` = β `[S, K]`), as one GEMM with the coefficients
    `α g_si · [1, −β_s]`. Returns `Ŵ^l [S,out,in]` and those coefficients `[S, n(K+1)]`."""
    segments = gates.shape[0]
    new = (alpha * gates).unsqueeze(2) * torch.cat([coef.new_ones(segments, 1), -coef], 1).unsqueeze(1)
    new = new.reshape(segments, -1)
    merged = torch.addmm(previous.reshape(segments, -1), new, images.reshape(new.shape[1], -1))
    return merged.view_as(previous), new


def ffn(x: Tensor, linear, activation: str) -> Tensor:
    """The expert FFN of §1 with `linear(name, input)` applying the named matrix (`gelu_tanh`: GPT-2's GELU)."""
    if activation == "swiglu":
        return linear("w_down", F.silu(linear("w_gate", x)) * linear("w_up", x))
    return linear("w_out", F.gelu(linear("w_in", x), approximate="tanh" if activation == "gelu_tanh" else "none"))
