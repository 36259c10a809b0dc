"""What autograd keeps from a merge plan until its backward: tensors cheap to rebuild are rebuilt instead of kept.

A merge plan is built at an optimizer step's start and its backward runs at the step's end, so anything its graph
saves is alive for the whole step, parameter-sized, per layer. The curvature's backward reads its input, the raw task
vectors `E − B` (or the stacked experts): a subtraction (a copy) of the parameters, which do not change before the
backward, so `saved_as_recomputed` keeps the way to rebuild them instead."""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import Tensor


class _Recompute(NamedTuple):
    """What autograd keeps instead of a saved tensor that `saved_as_recomputed` rebuilds in the backward."""

    rebuild: Callable[[], Tensor]


def _unpack(packed):
    if isinstance(packed, _Recompute):
        with torch.no_grad():
            return packed.rebuild()
    return packed


def _layout(t: Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t.dtype


def saved_as_recomputed(t: Tensor, rebuild: Callable[[], Tensor]):
    """A context within which, wherever autograd saves `t` for a backward, it keeps `rebuild` instead and calls it
    when the backward reads `t`. For a tensor cheap to rebuild from tensors alive anyway: the task vectors `E − B` (or
    the stacked experts) from the parameters, which the curvature's backward reads and which would otherwise stay
    alive, parameter-sized, from the step's merge plan to its backward. `rebuild` must give `t`'s values then:
    nothing may change the parameters between the forward and the backward (the optimizer steps after it). Under
    `torch.compile` it does nothing: the compiled graph decides what it saves."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    key = _layout(t)  # not `t` itself: autograd keeps the pack hook with every tensor it packs

    def pack(saved: Tensor):
        return _Recompute(rebuild) if _layout(saved) == key else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
