"""The dynamic merging chain (spec §4): what a forward pass carries from one MoE layer to the next, and how a
layer evaluates its per-segment curvature term `M^l_i(Ŵ^{l−1}_s)`.

Two exact evaluations exist. Segment by segment: `S·n` curvature applications every forward (`n` = N−1 routed
experts). Through the span: `Ŵ^{l−1}_s = Σ_j β_sj V_j` for a basis `V` that depends on parameters only (the
chain's base `B¹`, layer 1's curved task vectors, and each later layer's images of the basis before it), so
`M^l_i(Ŵ^{l−1}_s) = Σ_j β_sj M^l_i(V_j)`: `n·K` curvature applications once per optimizer step, then one merge
GEMM per forward. The basis grows with depth (`K_l = K_{l−1} + n·(K_{l−1} + 1)`), so each layer takes whichever
costs fewer training FLOPs (`prefer_span`), and `camex_ds.analysis.flops` counts exactly the evaluation taken.
The span needs a mask that does not depend on the segment: none or DARE, not TIES.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .functional import curvature_backward_flops, curvature_flops


@dataclass
class Span:
    """`Ŵ_s = coef[s] @ cat(blocks)`: `blocks` are `[k, out, in]` tensors that carry their autograd graph (the
    per-step work of the next layer is built from them); `coef [S, K]` are this forward's coefficients."""

    blocks: list
    coef: Tensor

    @property
    def size(self) -> int:
        return self.coef.shape[1]


@dataclass
class MergeChain:
    """A dynamic layer's per-segment merged weights `Ŵ^l_s` (`name -> [S, out, in]`), which the next layer of its
    chain merges onto (§4), and their spans while the chain can still be evaluated through them.

    Each dynamic layer returns its own; the next layer reads it and returns a new one.
    """

    weights: dict = field(default_factory=dict)
    spans: dict = field(default_factory=dict)


def start_span_size(routed: int) -> int:
    """Layer 1's basis: the base and its `n` curved task vectors."""
    return routed + 1


def next_span_size(size: int, routed: int) -> int:
    """Layer l adds, per expert, its image of the layer's own expert and of each basis element."""
    return size + routed * (size + 1)


def span_flops(size: int, routed: int, segments: int, accumulation: int, elements: int, curvature: float) -> float:
    """Training FLOPs per forward of one matrix through the span: `routed·size` curvature applications (forward and
    backward, `curvature` FLOPs each) once per optimizer step, and the merge GEMM `[S, n(K+1)] × [n(K+1), P]` with
    its two backward GEMMs every forward."""
    return routed * size * curvature / accumulation + 6 * segments * routed * (size + 1) * elements


def segment_flops(routed: int, segments: int, curvature: float) -> float:
    """Training FLOPs per forward of one matrix segment by segment: `S·n` curvature applications."""
    return segments * routed * curvature


def prefer_span(size: Optional[int], routed: int, segments: int, accumulation: int, shape: tuple[int, int],
                rank: int, curved: bool) -> bool:
    """Whether a layer after a basis of `size` (None: no span, e.g. after a per-segment layer or with TIES) is
    cheaper through the span for one `[out, in]` matrix (`shape`). Without curvature the per-segment term is
    elementwise, 0 FLOPs, and always cheaper."""
    if size is None or not curved:
        return False
    curvature = curvature_flops(*shape, rank) + curvature_backward_flops(*shape, rank)
    return span_flops(size, routed, segments, accumulation, shape[0] * shape[1], curvature) < \
        segment_flops(routed, segments, curvature)
