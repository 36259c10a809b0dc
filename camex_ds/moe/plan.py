"""A merge layer's plan: the work it derives from its parameters alone, built once per optimizer step (spec §3, §4).

Between the micro-batches of one optimizer step the parameters do not change, so the curved task vectors
`τ̃ = M(τ)`, the TIES election, DARE's mask, the dynamic chain's span images and, under expert parallelism, their
all-gathers are the same for every micro-batch. A `MergePlan` holds them, with their autograd graphs, for one
step: the step's first micro-batch builds every MoE layer's plan, each just before its block (`StepPlans`,
`GPT.merge_plans`), and each micro-batch's forward reads `plan.for_micro_batch(last)`. Evaluation and inference
build a plan per call with the same code (`CAMExMoE.plan`).

The gradient relay: every micro-batch but the last reads a detached copy of each per-step tensor whose gradient
is summed (in float32 for lower precisions) instead of flowing back. The last micro-batch (DeepSpeed's
accumulation boundary) reads the kept tensor itself, whose backward adds that sum: the gradient goes back through
`M` (and the expert-parallel reduce-scatter) once, inside the boundary's backward, before DeepSpeed reduces
gradients. This is exact, since `Σ_m Jᵀ g_m = Jᵀ Σ_m g_m`. A plan belongs to one step and to the parameters it
was built from: nothing is kept anywhere else, so nothing can go stale.

How each matrix is evaluated is decided on shapes alone (`evaluations`), the function `analysis.flops` counts
FLOPs with: a static layer folds its merge into each segment's GEMM; a dynamic chain's first layer merges onto
its own base; a later chain layer goes through the chain's span or segment by segment, whichever is cheaper
(`chain.prefer_span`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import functional as Fn
from .chain import MergeChain, Span, next_span_size, prefer_span, start_span_size
from .factors import split_factors
from .masks import MaskKind


class Evaluation(enum.Enum):
    """How a layer evaluates one matrix's per-segment merged weights."""

    FOLDED = "folded"  # static: `B + α Σ g τ̃` folded into each segment's GEMM (`functional.merged_linear`)
    START = "start"  # a dynamic chain's first layer: `Ŵ_s = B + α Σ g τ̃` from its own base
    SPAN = "span"  # a later chain layer through the chain's span: one merge GEMM per forward
    SEGMENT = "segment"  # a later chain layer segment by segment: `S·n` curvature applications per forward


def evaluations(moe, shapes: dict, chain_start: bool, spans_in: dict, segments: int,
                accumulation: int) -> dict[str, tuple[Evaluation, Optional[int]]]:
    """Per matrix `name -> (evaluation, span size handed on)` of a layer of `moe` (a `MoEConfig`) whose chain arrives
    with span sizes `spans_in` (`name -> K`; missing: no span), for `segments` per forward and `accumulation`
    micro-batches per step. A TIES election per segment is not linear in `Ŵ`, so TIES never spans."""
    spannable, routed = moe.mask != "ties", moe.routed_experts
    chosen = {}
    for name, shape in shapes.items():
        size = spans_in.get(name) if spannable else None
        if not moe.dynamic:
            chosen[name] = (Evaluation.FOLDED, None)
        elif chain_start:
            chosen[name] = (Evaluation.START, start_span_size(routed) if spannable else None)
        elif prefer_span(size, routed, segments, accumulation, shape, moe.curvature_rank, moe.curved):
            chosen[name] = (Evaluation.SPAN, next_span_size(size, routed))
        else:
            chosen[name] = (Evaluation.SEGMENT, None)
    return chosen


class MatrixPlan(NamedTuple):
    """One matrix's per-step tensors; which are set follows `evaluation`."""

    evaluation: Evaluation
    task: Optional[Tensor] = None  # FOLDED, START: every expert's masked, curved task vector `[N, out, in]`
    images: Optional[Tensor] = None  # SPAN: `Z [n, K+1, out, in]`, the images of the experts and of the basis
    curved: Optional[Tensor] = None  # SEGMENT: every expert's `M_i(E_i)` `[n, out, in]`
    factors: Optional[Tensor] = None  # SEGMENT with curvature: every expert's factors, one `[n, Σ R·k²]` stack
    multipliers: Optional[Tensor] = None  # SEGMENT with DARE (training): the multipliers `[n, out, in]`
    raw: Optional[Tensor] = None  # SEGMENT with TIES: the experts `E_i` `[n, out, in]`, for the election per segment
    basis: Optional[list] = None  # the span basis handed to the next chain layer (per-step tensors, with graph)


RELAYED = ("task", "images", "curved", "factors")  # the per-step tensors a micro-batch reads, with their graphs


class _GradientSum:
    """The sum of the gradients the step's micro-batches sent to one per-step tensor."""

    def __init__(self, like: Tensor):
        self.dtype = torch.promote_types(like.dtype, torch.float32)
        self.total: Optional[Tensor] = None

    def add(self, grad: Tensor) -> None:
        if self.total is None:
            self.total = grad.to(self.dtype, copy=True)
        else:
            self.total.add_(grad)


class _Summed(torch.autograd.Function):
    """Identity; the backward adds the gradient to `sums` and sends nothing further back."""

    @staticmethod
    def forward(ctx, anchor, sums):
        ctx.sums = sums
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, grad):
        ctx.sums.add(grad)
        return None, None


class _Released(torch.autograd.Function):
    """Identity on the kept tensor; the backward adds the earlier micro-batches' summed gradient."""

    @staticmethod
    def forward(ctx, kept, sums):
        ctx.sums = sums
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.sums.total
        return (grad if total is None else grad + total.to(grad.dtype)), None


# The gradient sums are Python side effects of a backward, which a compiler would trace once and replay wrongly.
@torch.compiler.disable
def _relay(kept: Tensor, sums: _GradientSum, last: bool) -> Tensor:
    if last:
        return _Released.apply(kept, sums)
    return _Summed.apply(kept.detach().requires_grad_(), sums)


@dataclass
class Merged:
    """One forward's per-segment weights: a static layer's stay folded into its GEMMs (`base`, `task` per matrix), a
    dynamic layer's are explicit and go on to the next layer as `chain`."""

    gates: Tensor
    alpha: float
    folded: dict = field(default_factory=dict)  # name -> (B, τ̃)
    chain: Optional[MergeChain] = None

    def linear(self, name: str, inp: Tensor) -> Tensor:
        """Apply matrix `name` of each segment: `inp [S, T, in] -> [S, T, out]`."""
        if name in self.folded:
            return Fn.merged_linear(inp, *self.folded[name], self.gates, self.alpha)
        return torch.bmm(inp, self.chain.weights[name].transpose(1, 2))


@dataclass
class MergePlan:
    """One layer's per-step work, and the merge a forward does with it: `merge(gates, previous) -> Merged`."""

    matrices: dict  # name -> MatrixPlan
    base: Optional[dict]  # the layer's own base `B` (static and chain-start layers), read as it is
    alpha: float
    mask: MaskKind
    factor_shapes: dict  # name -> the `[R, k, k]` shapes of A, B, C, D in a factor stack
    accumulation: int = 1
    sums: dict = field(default_factory=dict)  # (name, field) -> _GradientSum of a relayed per-step tensor

    def __post_init__(self):
        if self.accumulation > 1 and not self.sums:
            self.sums = {(name, key): _GradientSum(t) for name, m in self.matrices.items()
                         for key, t in _tensors(m) if t.requires_grad}

    def basis(self) -> dict:
        """The span basis handed to the next layer of a dynamic chain: `name -> blocks`."""
        return {n: m.basis for n, m in self.matrices.items() if m.basis is not None}

    def for_micro_batch(self, last: bool) -> MergePlan:
        """The plan one micro-batch's forward reads: every per-step tensor relayed (`last`: the step's boundary)."""
        if self.accumulation == 1:
            return self

        def relayed(name, m):
            return m._replace(**{key: _relay_if_summed(t, self.sums.get((name, key)), last)
                                 for key, t in _tensors(m)})

        return replace(self, matrices={n: relayed(n, m) for n, m in self.matrices.items()}, accumulation=1, sums={})

    def merge(self, gates: Tensor, previous: Optional[MergeChain]) -> Merged:
        """This forward's per-segment weights from its gates `[S, n]` and the chain's previous weights."""
        alpha, segments = self.alpha, gates.shape[0]
        merged = Merged(gates, alpha)
        weights, spans = {}, {}
        if any(m.evaluation is Evaluation.START for m in self.matrices.values()):  # the span's first coefficients
            start_coef = torch.cat([gates.new_ones(segments, 1), alpha * gates], 1)
        for name, m in self.matrices.items():
            if m.evaluation is Evaluation.FOLDED:
                merged.folded[name] = (self.base[name], m.task)
            elif m.evaluation is Evaluation.START:
                weights[name] = Fn.merge_rows(self.base[name], m.task.flatten(1), gates, alpha)
                if m.basis is not None:
                    spans[name] = Span(m.basis, start_coef)
            elif m.evaluation is Evaluation.SPAN:
                span = previous.spans[name]
                weights[name], coef = Fn.span_merge(previous.weights[name], gates, span.coef, m.images, alpha)
                spans[name] = Span(m.basis, torch.cat([span.coef, coef], 1))
            else:
                factors = None if m.factors is None else \
                    [f.transpose(0, 1) for f in split_factors(m.factors, self.factor_shapes[name])]
                weights[name] = Fn.dynamic_merge(previous.weights[name], m.curved, gates, factors, self.mask, alpha,
                                                 raw_experts=m.raw, multipliers=m.multipliers)
        if weights:
            merged.chain = MergeChain(weights, spans)
        return merged


def _tensors(m: MatrixPlan):
    """`(field, tensor)` of a matrix plan's relayed tensors that are set."""
    for key in RELAYED:
        t = getattr(m, key)
        if t is not None:
            yield key, t


def _relay_if_summed(t: Tensor, sums: Optional[_GradientSum], last: bool) -> Tensor:
    return t if sums is None else _relay(t, sums, last)
