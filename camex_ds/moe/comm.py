"""Every expert-parallel collective of the merge layers, and what they cost (spec §7).

The math in `functional` never talks to other processes; the layer calls these on DeepSpeed's
expert-parallel group. With no group (ep_size=1, or no `torch.distributed`) each is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import kron_factor_shape

class Traffic:
    """Bytes one layer has sent from this rank through the collectives below, counted as a ring algorithm
    moves them (all-gather and reduce-scatter: (ep-1)/ep of the full tensor; all-reduce: twice that).

    Each merge layer owns one and passes it to every collective; the trainer logs the model's growth per
    step (`GPT.ep_bytes_sent`) next to the analytic `ep_bytes_per_layer`.
    """

    def __init__(self):
        self.bytes_sent = 0

    def count(self, full_numel: int, element_size: int, size: int, passes: int = 1) -> None:
        self.bytes_sent += passes * (size - 1) * full_numel * element_size // size


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group=group)


def _all_gather(t: Tensor, group, dim: int, traffic: Traffic) -> Tensor:
    size = group_size(group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    traffic.count(t.numel() * size, t.element_size(), size)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(t: Tensor, group, dim: int, traffic: Traffic) -> Tensor:
    """Sum over the group, keep this rank's slice along `dim`. Gloo has no reduce-scatter: all-reduce then slice."""
    size, rank = group_size(group), group_rank(group)
    if dist.get_backend(group) == "gloo":
        total = t.contiguous().clone()
        dist.all_reduce(total, group=group)
        traffic.count(t.numel(), t.element_size(), size, passes=2)
        return total.chunk(size, dim=dim)[rank].contiguous()
    parts = [p.contiguous() for p in t.chunk(size, dim=dim)]
    out = torch.empty_like(parts[rank])
    dist.reduce_scatter(out, parts, group=group)
    traffic.count(t.numel(), t.element_size(), size)
    return out


class _GatherExperts(torch.autograd.Function):
    """All-gather along the expert dimension; the backward reduce-scatters the gradient to its owners."""

    @staticmethod
    def forward(ctx, local, group, dim, traffic):
        ctx.group, ctx.dim, ctx.traffic = group, dim, traffic
        return _all_gather(local, group, dim, traffic)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim, ctx.traffic), None, None, None


def gather_experts(local: Tensor, group, traffic: Traffic, dim: int = 0) -> Tensor:
    """Every rank's experts, concatenated in expert-parallel rank order along `dim` (differentiable); what
    this rank sends, both ways, is counted in `traffic`."""
    if group_size(group) == 1:
        return local
    if not local.requires_grad:
        return _all_gather(local, group, dim, traffic)
    return _GatherExperts.apply(local, group, dim, traffic)


def all_reduce_sum(t: Tensor, group, traffic: Traffic) -> Tensor:
    """Sum over the group without gradient (the TIES sign election), counted in `traffic`."""
    if group_size(group) == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    traffic.count(t.numel(), t.element_size(), group_size(group), passes=2)
    return t


def ep_bytes_per_layer(*, num_experts: int, ep_size: int, matrix_shapes: dict, curvature_rank: int = 1,
                      curved: bool = True, mask: str = "none", dynamic: bool = False, chain_start: bool = True,
                      bytes_per_element: int = 4, backend_reduce_scatter: bool = True) -> dict:
    """Bytes one rank sends and receives per MoE layer per optimizer step (the per-step work is done once per
    optimizer step, however many micro-batches it has).

    Ring collectives: an all-gather or reduce-scatter of a tensor of `n` elements moves `(ep-1)/ep·n`
    each way; an all-reduce moves twice that. `matrix_shapes` maps matrix name to `(out, in)`.
    `num_experts` is the number of experts the layer stores (N, or N-1 in a dynamic layer).
    `backend_reduce_scatter=False` accounts for gloo, which all-reduces instead.
    """
    if ep_size == 1:
        return {"forward": 0, "backward": 0, "total": 0, "elements_per_expert": 0}
    share = (ep_size - 1) / ep_size
    p = sum(o * i for o, i in matrix_shapes.values())
    factor_elems = sum(sum(k * k for k in kron_factor_shape(o) + kron_factor_shape(i))
                       for o, i in matrix_shapes.values()) * curvature_rank if curved else 0
    forward = share * num_experts * p  # all-gather of the curved task vectors (or M(E) in dynamic layers)
    backward = share * num_experts * p * (1 if backend_reduce_scatter else 2)
    if mask == "ties":
        forward += 2 * share * p  # all-reduce of the local task-vector sums for the sign election
    if dynamic and not chain_start:
        forward += share * num_experts * factor_elems
        backward += share * num_experts * factor_elems * (1 if backend_reduce_scatter else 2)
        if mask == "ties":
            forward += share * num_experts * p  # raw experts for the per-segment election
        if mask == "dare":
            forward += share * num_experts * p
    to_bytes = lambda n: int(round(n * bytes_per_element))  # noqa: E731
    return {"forward": to_bytes(forward), "backward": to_bytes(backward), "total": to_bytes(forward + backward),
            "elements_per_expert": p}


__all__ = ["Traffic", "gather_experts", "all_reduce_sum", "ep_bytes_per_layer", "group_size", "group_rank"]
