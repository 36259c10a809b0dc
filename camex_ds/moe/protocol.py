"""What the model asks of every MoE layer, merge layers and token-routing baselines alike."""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

from torch import Tensor

from .chain import MergeChain
from .plan import MergePlan


class MoEOutput(NamedTuple):
    output: Tensor  # [B, L, d]
    aux_loss: Tensor  # the load-balancing loss, already scaled by its coefficient
    counts: Optional[Tensor]  # segments (merge layers) or tokens (token routing) per expert; None where unknown
    chain: Optional[MergeChain]  # a dynamic merge layer's weights for the next layer of its chain; else None


@runtime_checkable
class MoELayer(Protocol):
    """A MoE layer: its work from parameters alone, once per optimizer step (`plan`; None when it has none), and a
    forward that reads the micro-batch's view of that plan (or builds one per call without it)."""

    def plan(self, segments: int, accumulation: int = 1, spans_in: Optional[dict] = None) -> Optional[MergePlan]:
        ...

    def forward(self, hidden_states: Tensor, chain: Optional[MergeChain] = None,
                plan: Optional[MergePlan] = None) -> MoEOutput:
        ...

    def stats(self) -> dict:
        ...


def plan_layers(layers: list, segments: int, accumulation: int) -> list[Optional[MergePlan]]:
    """Each MoE layer's plan for one optimizer step, in order: a dynamic layer builds on the span basis of the plan
    before it (a chain's first layer ignores it)."""
    plans, basis = [], {}
    for layer in layers:
        plan = layer.plan(segments, accumulation, basis)
        basis = {} if plan is None else plan.basis()
        plans.append(plan)
    return plans
