"""Work a merge layer derives from its parameters alone, done once per optimizer step instead of per micro-batch.

Between the micro-batches of one optimizer step the parameters do not change, so the curved task vectors
`τ̃ = M(τ)`, the TIES election, DARE's mask and, under expert parallelism, the all-gather of `τ̃` are the same
for every micro-batch. `StepReuse` computes such a value at the step's first micro-batch and keeps it with
its autograd graph. Every micro-batch but the last gets a detached copy whose gradient is summed (in float32
for lower precisions) instead of flowing back. The last micro-batch (DeepSpeed's accumulation boundary) gets
the kept value itself, whose backward adds that sum: the gradient goes back through `M` (and the
expert-parallel reduce-scatter) once, inside the boundary's backward, before DeepSpeed reduces gradients.
This is exact, since `Σ_m Jᵀ g_m = Jᵀ Σ_m g_m`.

A kept value belongs to the optimizer step it was made in (`MicroBatch.step`, DeepSpeed's `global_steps`), so
a new step, a skipped one or a changed accumulation count computes afresh, and the layer drops its values when
a state dict is loaded. Evaluation (`no_grad`), inference and single-micro-batch steps compute as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class MicroBatch:
    """Where a training forward sits in its optimizer step; the trainer reads it off DeepSpeed's engine."""

    step: int  # optimizer steps taken so far: names the parameters' current values
    last: bool  # the accumulation boundary: the step's gradients are complete after this backward
    accumulation: int  # micro-batches per optimizer step


class _GradientSum:
    """The sum of the gradients the step's micro-batches sent to one reused value."""

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
    """Identity on the kept value; the backward adds the earlier micro-batches' summed gradient."""

    @staticmethod
    def forward(ctx, kept, sums):
        ctx.sums = sums
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.sums.total
        return (grad if total is None else grad + total.to(grad.dtype)), None


@dataclass
class _Kept:
    step: int
    value: Tensor
    sums: _GradientSum


class StepReuse:
    """One layer's per-step values, by key. `get` returns `(for_forward, kept)`: the tensor this micro-batch's
    forward should use, and the graph-carrying value from which other per-step values may be built."""

    def __init__(self):
        self._kept: dict[str, _Kept] = {}

    def clear(self) -> None:
        self._kept.clear()

    def holds(self, key: str, micro_batch: Optional[MicroBatch]) -> bool:
        """Whether `key` was made earlier in this micro-batch's optimizer step."""
        return micro_batch is not None and micro_batch.accumulation > 1 and self._holds(key, micro_batch.step)

    def get(self, key: str, compute: Callable[[], Tensor], micro_batch: Optional[MicroBatch]) -> tuple[Tensor, Tensor]:
        if micro_batch is None or micro_batch.accumulation == 1 or not torch.is_grad_enabled():
            value = compute()
            return value, value
        return self._reused(key, compute, micro_batch)

    # The kept values live across compiled graphs and their gradient sums are Python side effects of a backward,
    # which a compiler would trace once and replay wrongly: this bookkeeping always runs eagerly.
    @torch.compiler.disable
    def _holds(self, key: str, step: int) -> bool:
        kept = self._kept.get(key)
        return kept is not None and kept.step == step

    @torch.compiler.disable
    def _reused(self, key: str, compute: Callable[[], Tensor], micro_batch: MicroBatch) -> tuple[Tensor, Tensor]:
        kept = self._kept.get(key)
        if kept is None or kept.step != micro_batch.step:
            value = compute()
            kept = self._kept[key] = _Kept(micro_batch.step, value, _GradientSum(value))
        if not kept.value.requires_grad:
            if micro_batch.last:
                del self._kept[key]
            return kept.value, kept.value
        if micro_batch.last:
            del self._kept[key]
            return _Released.apply(kept.value, kept.sums), kept.value
        return _Summed.apply(kept.value.detach().requires_grad_(), kept.sums), kept.value
