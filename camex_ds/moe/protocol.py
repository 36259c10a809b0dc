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


class StepPlans:
    """One optimizer step's merge plans, one per MoE layer (None for a layer without one), each built the first time
    it is asked for: the forward asks for a layer's plan just before its block.

    Why lazily: autograd runs the nodes made later first, so plans built before the whole forward would have their
    backward run after every block's, holding every layer's gradients of its curved task vectors (parameter-sized)
    until the backward's end. Built just before its block, a plan's backward runs right after that block's, and its
    gradients and saved tensors go before the next block's backward starts. At accumulation > 1 the step's first
    micro-batch builds them, and their backward still runs at the end of the last micro-batch's (`MergePlan`'s
    gradient relay)."""

    def __init__(self, layers: list, segments: int, accumulation: int = 1):
        self.layers, self.segments, self.accumulation = layers, segments, accumulation
        self.built: list[Optional[MergePlan]] = []
        self._basis: dict = {}  # the span basis of the last plan built, which a dynamic layer continues

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> Optional[MergePlan]:
        """Layer `index`'s plan, building it and those before it (in order: each continues its chain's basis)."""
        if not 0 <= index < len(self.layers):
            raise IndexError(f"MoE layer index {index} is out of range: the model has {len(self.layers)}")
        while len(self.built) <= index:
            plan = self.layers[len(self.built)].plan(self.segments, self.accumulation, self._basis)
            self._basis = {} if plan is None else plan.basis()
            self.built.append(plan)
        return self.built[index]

    def for_micro_batch(self, last: bool):
        """The plans one micro-batch's forward reads, in layer order, each built (and relayed: `last` is the step's
        boundary, `MergePlan.for_micro_batch`) when the forward reaches its layer."""
        for index in range(len(self.layers)):
            plan = self[index]
            yield None if plan is None else plan.for_micro_batch(last)
