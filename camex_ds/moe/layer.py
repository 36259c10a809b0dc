"""`CAMExMoE`: the curvature-aware merge layer as a DeepSpeed MoE layer (spec §3, §4, §6, §7).

Experts and their Kronecker curvature factors live in DeepSpeed's `Experts` container, so the engine's
expert-parallel groups, expert-data-parallel gradient reduction and per-expert checkpoint files cover
them. Tokens never move between ranks: the owners' curved task vectors are all-gathered instead.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from .. import deepspeed_adapter as ds
from ..deepspeed_adapter import Experts, MoE
from .ffn import add_biases, ffn_biases, matrix_shapes
from ..config import ACTIVATIONS, MERGE_METHODS, ConfigError, MoEConfig, check_choice, check_int
from ..parallel import expert_parallel_rank, global_expert
from ..parallel import rank as process_rank
from . import comm
from . import functional as Fn
from .chain import MergeChain
from .factor_init import initial_factors, peeked_generator
from .factors import KronFactors, split_factors
from .masks import MaskKind, mask_kind
from .plan import Evaluation, MatrixPlan, MergePlan, evaluations
from .protocol import MoEOutput
from .router import SegmentRouter
from .saved import saved_as_recomputed


class CurvedExpert(nn.Module):
    """One expert's FFN matrices and, for `camex*` methods, their curvature factors."""

    def __init__(self, shapes: dict, curvature_rank: int, curved: bool):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.curvature = nn.ModuleDict({n: KronFactors(curvature_rank, *s) for n, s in shapes.items()}) if curved \
            else None


class CAMExMoE(MoE):
    """Segment-routed soft merging of experts: `euclid`, `ties`, `dare` and their curvature-aware twins.

    `forward(hidden_states [B,L,d], chain=None, plan=None) -> MoEOutput(output, l_aux, exp_counts, chain)`.
    Dynamic layers (`dynamic=True`) merge onto the previous layer's weights `chain` (a `MergeChain`) and return
    theirs; the first layer of a chain (`chain_start=True`) owns the base. What depends on parameters alone is
    the layer's `plan`, built once per optimizer step by the trainer, or per call without one (`moe.plan`).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: Optional[int] = None, *,
                 moe: Optional[MoEConfig] = None, activation: str = "gelu", chain_start: bool = True,
                 init_std: float = 0.02, bias: bool = False, **options):
        """`moe`: the layer's whole `MoEConfig` (the model passes its own); without it, `num_experts` and the
        spec §6 keyword options (`method`, `ep_size`, `segment_len`, ...) build one, with §6's defaults."""
        nn.Module.__init__(self)  # MoE.__init__ would build a token gate this layer does not use
        standalone = moe is None
        try:
            if standalone:
                moe = MoEConfig.for_layer(num_experts, **options)
            check_choice("moe.method", moe.method, MERGE_METHODS)
        except ConfigError as e:  # a standalone layer's options are its keywords, not a model config's `moe` block
            raise e.relabel("moe.", "CAMExMoE." if standalone else "moe.") from None
        check_choice("CAMExMoE.activation", activation, ACTIVATIONS)
        check_int("CAMExMoE.hidden_size", hidden_size)
        check_int("CAMExMoE.ffn_hidden_size", ffn_hidden_size)
        self.args = moe
        ep_size, dynamic, curvature_rank = moe.ep_size, moe.dynamic, moe.curvature_rank
        self.hidden_size, self.activation, self.chain_start = hidden_size, activation, chain_start
        ds.set_engine_attributes(self, self.args.stored_experts, ep_size)  # why not MoE.__init__: deepspeed_adapter
        self.ep_rank = expert_parallel_rank(ep_size)

        shapes = matrix_shapes(hidden_size, ffn_hidden_size, activation)
        self.shapes = shapes
        owns_base = not dynamic or chain_start
        self.base = nn.ParameterDict({n: nn.Parameter(torch.randn(s) * init_std) for n, s in shapes.items()}) \
            if owns_base else None
        self.deepspeed_moe = ds.ExpertParallelExperts(Experts(
            CurvedExpert(shapes, curvature_rank, self.args.curved), self.num_local_experts, self.expert_group_name))
        self._init_experts(init_std)
        # GPT-2's FFN biases (an upcycled GPT-2): one per matrix, shared by all experts and never merged, so a
        # layer whose experts equal their base is exactly the dense FFN.
        self.bias = ffn_biases(shapes) if bias else None
        self.router = SegmentRouter(hidden_size, moe.routed_experts, moe.k, causal=moe.routing == "causal",
                                    first_segment=moe.first_segment, noisy_gating=moe.noisy_gating,
                                    aux_loss_coef=moe.aux_loss_coef, init_std=init_std)
        self.traffic = comm.Traffic()  # what this layer's collectives send from this rank

    @torch.no_grad()
    def _init_experts(self, init_std: float) -> None:
        """Draw all N experts and their curvature factors on every rank and keep the local ones: the model is the
        same for any ep_size."""
        owned = [(global_expert(self.ep_rank, self.num_local_experts, j), expert)
                 for j, expert in enumerate(self.local_experts)]
        for name, shape in self.shapes.items():
            full = torch.randn(self.num_experts, *shape) * init_std
            for g, expert in owned:
                getattr(expert, name).copy_(full[g])
        if not self.args.curved:
            return
        gen = peeked_generator()
        for name, shape in self.shapes.items():
            factors = initial_factors(self.args.curvature_rank, self.num_experts, *shape, self.args.curvature_init_std,
                                      gen)
            flat = torch.cat([f.transpose(0, 1).flatten(1) for f in factors], 1)  # [N, Σ R·k²], KronFactors' layout
            for g, expert in owned:
                expert.curvature[name].flat.copy_(flat[g])

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        actual = ds.expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise RuntimeError(f"expert-parallel rank {actual} differs from the rank {self.ep_rank} the experts "
                               "were initialised for; use DeepSpeed's default (expert-before-data) rank layout")

    @property
    def local_experts(self) -> nn.ModuleList:
        return ds.local_experts(self)

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([getattr(e, name) for e in self.local_experts])

    def _factor_stack(self, name: str, group=None) -> Tensor:
        """The curvature factors of matrix `name` as one `[n, Σ R·k²]` stack: the local experts', or with `group`
        every expert's (all-gathered, differentiable)."""
        stacked = torch.stack([e.curvature[name].flat for e in self.local_experts])  # one copy for all four
        return stacked if group is None else comm.gather_experts(stacked, group, self.traffic)

    def _stacked_factors(self, name: str, group=None) -> Optional[list[Tensor]]:
        """`[R, n, k, k]` views of the factors A, B, C, D (see `_factor_stack`), or None without curvature."""
        if not self.args.curved:
            return None
        stack = self._factor_stack(name, group)
        return [f.transpose(0, 1) for f in split_factors(stack, self.local_experts[0].curvature[name].shapes)]

    def _local_multipliers(self, like: Tensor) -> Optional[Tensor]:
        """DARE's multipliers for this rank's experts, drawn here in training; None otherwise (no drop in eval)."""
        if self.args.mask == "dare" and self.training:
            return Fn.dare_mask(like.shape, self.args.dare_p, dtype=like.dtype, device=like.device)
        return None

    def _task_vectors(self, name: str, group) -> Tensor:
        """All experts' `m_i ⊙ M_i(E_i − B)`: each rank curves its own, then the group all-gathers (§7)."""
        def local_task_vectors():
            return Fn.task_vectors(self.base[name], [getattr(e, name) for e in self.local_experts])

        tau = local_task_vectors()
        multipliers = self._local_multipliers(tau)
        mask = mask_kind(self.args.mask)
        total = comm.all_reduce_sum(tau.detach().sum(0), group, self.traffic) if mask is MaskKind.TIES else None
        with saved_as_recomputed(tau, local_task_vectors):  # not kept alive from the plan to its backward
            task = Fn.curved_task_vectors(tau, self._stacked_factors(name), mask, total, multipliers)
        return comm.gather_experts(task, group, self.traffic)

    def _curved_experts(self, name: str, group) -> Tensor:
        """Every expert's `M_i(E_i)`, curved by its owner and all-gathered (§4, §7)."""
        experts = self._stacked(name)
        factors = self._stacked_factors(name)
        if factors is not None:
            with saved_as_recomputed(experts, lambda: self._stacked(name)):  # a copy of the parameters
                experts = Fn.apply_curvature(experts, factors)
        return comm.gather_experts(experts, group, self.traffic)

    def _dare_multipliers(self, name: str, group) -> Optional[Tensor]:
        """DARE's `[n, out, in]` multipliers of every expert (each owner draws its own), or None."""
        multipliers = self._local_multipliers(self._stacked(name).detach())
        return None if multipliers is None else comm.gather_experts(multipliers, group, self.traffic)

    def _matrix_plan(self, name: str, evaluation: Evaluation, basis: Optional[list], spans: bool, group) -> MatrixPlan:
        """Matrix `name`'s per-step tensors for `evaluation` (the order of draws and collectives is part of it)."""
        if evaluation in (Evaluation.FOLDED, Evaluation.START):
            task = self._task_vectors(name, group)
            return MatrixPlan(evaluation, task=task, basis=[self.base[name].unsqueeze(0), task] if spans else None)
        if evaluation is Evaluation.SPAN:
            multipliers = self._dare_multipliers(name, group)
            images = Fn.span_images(torch.cat(basis), self._curved_experts(name, group),
                                    self._stacked_factors(name, group), multipliers)
            return MatrixPlan(evaluation, images=images, basis=basis + [images.flatten(0, 1)])
        curved = self._curved_experts(name, group)
        factors = self._factor_stack(name, group) if self.args.curved else None
        multipliers = self._dare_multipliers(name, group)
        raw = comm.gather_experts(self._stacked(name).detach(), group, self.traffic) if self.args.mask == "ties" \
            else None
        return MatrixPlan(evaluation, curved=curved, factors=factors, multipliers=multipliers, raw=raw)

    def plan(self, segments: int, accumulation: int = 1, spans_in: Optional[dict] = None) -> MergePlan:
        """This layer's work from its parameters alone, for `segments` per forward and `accumulation` micro-batches
        per optimizer step; a dynamic layer continues the span basis `spans_in` (`name -> blocks`) of its chain."""
        spans_in = spans_in or {}
        sizes = {n: sum(b.shape[0] for b in blocks) for n, blocks in spans_in.items()}
        chosen = evaluations(self.args, self.shapes, self.chain_start, sizes, segments, accumulation)
        group = ds.expert_group(self)
        matrices = {n: self._matrix_plan(n, evaluation, spans_in.get(n), size is not None, group)
                    for n, (evaluation, size) in chosen.items()}
        shapes = {n: self.local_experts[0].curvature[n].shapes for n in self.shapes} if self.args.curved else {}
        return MergePlan(matrices, self.base, self.args.alpha, mask_kind(self.args.mask), shapes, accumulation)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"hidden_states must be [batch, seq_len, {self.hidden_size}], got {shape}")
        want = self.router.w_gate.dtype
        if x.dtype != want:
            raise TypeError(f"hidden_states dtype {x.dtype} does not match the layer's parameters ({want}); "
                            f"cast the input or the layer")

    def segment_len_for(self, seq_len: int) -> int:
        return self.args.segment_len_for(seq_len)

    @torch.no_grad()
    def rank_is_degenerate(self) -> bool:
        """Whether R > 1 and the R terms of every local curvature factor are equal: they then get equal gradients
        and stay equal, so rank R computes exactly what rank 1 does (§3); a model saved before the terms started
        apart, or built with curvature_init_std 0."""
        if not self.args.curved or self.args.curvature_rank == 1:
            return False
        return all(torch.equal(f, f[:1].expand_as(f)) for expert in self.local_experts
                   for factors in expert.curvature.values() for f in factors.tensors())

    @torch.no_grad()
    def stats(self, chain_base: Optional[nn.ParameterDict] = None) -> dict:
        """What the trainer logs of this layer, over this rank's experts and tokens (at log steps only):

        - `router/entropy` (nats) and `router/max_load` (the largest expert's share of routed segments) of the last
          forward;
        - `curvature/dev_from_identity`: the curvature factors' mean relative distance from the identity, per term;
        - `task_vector/rel_norm`: `||E_i − B|| / ||B||` averaged over experts and matrices, how far the experts have
          moved from the base they are merged onto. A dynamic layer that continues a chain has no base: it merges
          onto the previous layer's per-segment weights, which depend on the data, so it is measured against the
          chain's base `chain_base` (that every `Ŵ_s` of the chain starts from), which the caller passes; without
          it the value is left out.

        Each value is one host read: the per-expert terms are summed on the device first.
        """
        stats = {f"router/{k}": float(v) for k, v in self.router.last_stats.items()}
        if self.args.curved:
            devs = []
            for expert in self.local_experts:
                for factors in expert.curvature.values():
                    for f in factors.tensors():
                        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
                        devs.append((f - eye).float().norm() / math.sqrt(f.shape[-1] * f.shape[0]))
            stats["curvature/dev_from_identity"] = float(torch.stack(devs).mean())
        base = self.base if self.base is not None else chain_base
        if base is not None:
            norms = {n: base[n].float().norm().clamp_min(1e-30) for n in self.shapes}
            rel = [(getattr(e, n).float() - base[n].float()).norm() / norms[n] for e in self.local_experts
                   for n in self.shapes]
            stats["task_vector/rel_norm"] = float(torch.stack(rel).mean())
        return stats

    def forward(self, hidden_states: Tensor, chain: Optional[MergeChain] = None,
                plan: Optional[MergePlan] = None) -> MoEOutput:
        """Route, merge, compute: `plan` is this micro-batch's view of the step's plan (built here per call without
        it); a dynamic layer merges onto `chain`, the previous layer's weights, and returns its own."""
        x = hidden_states
        self._check_input(x)
        bsz, length, dim = x.shape
        seg = self.segment_len_for(length)
        if length % seg:
            raise ValueError(f"sequence length L={length} is not a multiple of segment_len T={seg}")
        if self.args.dynamic and not self.chain_start and (chain is None or not chain.weights):
            raise ValueError("this dynamic layer continues a chain (chain_start=False): pass the MergeChain "
                             "that the previous dynamic layer returned")
        gates, l_aux, counts = self.router(x, seg)
        if plan is None:
            plan = self.plan(gates.shape[0], spans_in={n: s.blocks for n, s in chain.spans.items()} if chain else None)
        merged = plan.merge(gates, chain)
        out = Fn.ffn(x.reshape(-1, seg, dim), add_biases(merged.linear, self.bias), self.activation)
        return MoEOutput(out.reshape(bsz, length, dim), l_aux, counts, merged.chain)


def warn_degenerate_rank(model: nn.Module) -> None:
    """After a load that may bring in factors saved before the rank terms started apart (`--init_from`,
    `--resume`): one warning line (rank 0) when some layer's rank is degenerate (`rank_is_degenerate`)."""
    curved = [m for m in model.modules() if isinstance(m, CAMExMoE) and m.args.curved and m.args.curvature_rank > 1]
    degenerate = [m for m in curved if m.rank_is_degenerate()]
    if degenerate and process_rank() == 0:
        r = degenerate[0].args.curvature_rank
        print(f"warning: curvature_rank is {r}, but the {r} terms of every curvature factor are equal in "
              f"{len(degenerate)} of the {len(curved)} curved MoE layers (saved before the terms started apart, or "
              f"curvature_init_std 0): equal terms stay equal in training, so rank {r} then equals rank 1, at {r}x "
              "its curvature cost", file=sys.stderr, flush=True)
