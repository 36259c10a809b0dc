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
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import Tensor, nn

from .ffn import add_biases, ffn_biases, matrix_shapes
from ..config import ACTIVATIONS, MERGE_METHODS, ConfigError, MoEConfig, check_choice, check_int
from ..parallel import expert_parallel_rank, global_expert
from ..parallel import rank as process_rank
from . import comm
from . import functional as Fn
from .chain import MergeChain, Span, prefer_span
from .factor_init import initial_factors, peeked_generator
from .router import SegmentRouter
from .step_reuse import MicroBatch, StepReuse


class KronFactors(nn.Module):
    """One matrix's curvature factors `A [R,o1,o1], B [R,o2,o2], C [R,i1,i1], D [R,i2,i2]`: built as the identity,
    then `CAMExMoE` draws the terms apart (`factor_init`, spec §3).

    They are stored as one flat parameter `flat = [A | B | C | D]` and read as views: a training engine pays
    per parameter (gradient hooks, buckets, clipping, optimizer state), and on a GPU four tiny tensors per
    matrix and expert cost more in that bookkeeping than the curvature's arithmetic. Checkpoints that hold
    the four factors separately (`.a`, `.b`, `.c`, `.d`) still load.
    """

    def __init__(self, rank: int, out_features: int, in_features: int):
        super().__init__()
        self.shapes = factor_shapes(rank, out_features, in_features)
        self.flat = nn.Parameter(torch.cat([f.flatten() for f in Fn.identity_factors(rank, 1, out_features,
                                                                                      in_features)]))

    def tensors(self) -> tuple[Tensor, ...]:
        return split_factors(self.flat, self.shapes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        upgrade_factor_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def upgrade_factor_keys(state: dict, prefix: str) -> None:
    """The one reader of the old four-tensor layout: a matrix's factors stored separately (`<prefix>a` ...
    `<prefix>d`) become, in place, the one flat tensor `<prefix>flat` that `KronFactors` holds."""
    if prefix + "flat" not in state and all(prefix + k in state for k in "abcd"):
        state[prefix + "flat"] = torch.cat([state.pop(prefix + k).flatten() for k in "abcd"])


def factor_shapes(rank: int, out_features: int, in_features: int) -> list[tuple[int, int, int]]:
    """`[R,k,k]` of A, B, C, D for one `[out, in]` matrix (§3)."""
    dims = Fn.kron_factor_shape(out_features) + Fn.kron_factor_shape(in_features)
    return [(rank, k, k) for k in dims]


def split_factors(flat: Tensor, shapes) -> tuple[Tensor, ...]:
    """Views of the four factors in `flat [..., Σ R·k²]` (leading dims kept): `[..., R, k, k]` each."""
    views, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[..., start:start + size].unflatten(-1, shape))
        start += size
    return tuple(views)


class CurvedExpert(nn.Module):
    """One expert's FFN matrices and, for `camex*` methods, their curvature factors."""

    def __init__(self, shapes: dict, curvature_rank: int, curved: bool):
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.curvature = nn.ModuleDict({n: KronFactors(curvature_rank, *s) for n, s in shapes.items()}) if curved \
            else None


class _ExpertParallelExperts(nn.Module):
    """Holds `experts.deepspeed_experts.<local id>` (the path DeepSpeed's checkpointing expects) and the EP group."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group


class CAMExMoE(MoE):
    """Segment-routed soft merging of experts: `euclid`, `ties`, `dare` and their curvature-aware twins.

    `forward(hidden_states [B,L,d], chain=None, micro_batch=None) -> (output, l_aux, exp_counts)`. Dynamic
    layers (`dynamic=True`) read the previous layer's merged weights from `chain` (a `MergeChain`) and
    write theirs; the first layer of a chain (`chain_start=True`) owns the base. With `micro_batch` (where a
    training forward sits in its optimizer step), the work that depends on parameters alone is done once per
    optimizer step (`StepReuse`).
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
        # The attributes DeepSpeed's engine and checkpointing read from every MoE layer.
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = self.args.stored_experts
        self.num_local_experts = self.num_experts // ep_size
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_rank = expert_parallel_rank(ep_size)

        shapes = matrix_shapes(hidden_size, ffn_hidden_size, activation)
        self.shapes = shapes
        owns_base = not dynamic or chain_start
        self.base = nn.ParameterDict({n: nn.Parameter(torch.randn(s) * init_std) for n, s in shapes.items()}) \
            if owns_base else None
        experts = Experts(CurvedExpert(shapes, curvature_rank, self.args.curved), self.num_local_experts,
                          self.expert_group_name)
        self._init_experts(experts, init_std)
        self.deepspeed_moe = _ExpertParallelExperts(experts)
        # GPT-2's FFN biases (an upcycled GPT-2): one per matrix, shared by all experts and never merged, so a
        # layer whose experts equal their base is exactly the dense FFN.
        self.bias = ffn_biases(shapes) if bias else None
        self.router = SegmentRouter(hidden_size, moe.routed_experts, moe.k, causal=moe.routing == "causal",
                                    first_segment=moe.first_segment, noisy_gating=moe.noisy_gating,
                                    aux_loss_coef=moe.aux_loss_coef, init_std=init_std)
        self.step_reuse = StepReuse()
        self.traffic = comm.Traffic()  # what this layer's collectives send from this rank

    def _load_from_state_dict(self, *args, **kwargs):
        self.step_reuse.clear()  # values made from the old parameters
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _init_experts(self, experts: Experts, init_std: float) -> None:
        """Draw all N experts and their curvature factors on every rank and keep the local ones: the model is the
        same for any ep_size."""
        owned = [(global_expert(self.ep_rank, self.num_local_experts, j), expert)
                 for j, expert in enumerate(experts.deepspeed_experts)]
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
        actual = groups._get_expert_parallel_rank(self.expert_group_name)
        if actual != self.ep_rank:
            raise RuntimeError(f"expert-parallel rank {actual} differs from the rank {self.ep_rank} the experts "
                               "were initialised for; use DeepSpeed's default (expert-before-data) rank layout")

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def _stacked(self, name: str) -> Tensor:
        return torch.stack([getattr(e, name) for e in self.local_experts])

    def _factor_stack(self, name: str, group=None) -> Tensor:
        """The curvature factors of matrix `name` as one `[n, Σ R·k²]` stack: the local experts', or with `group`
        every expert's (all-gathered, differentiable)."""
        stacked = torch.stack([e.curvature[name].flat for e in self.local_experts])  # one copy for all four
        return stacked if group is None else comm.gather_experts(stacked, group, self.traffic)

    def _factor_views(self, name: str, stack: Tensor) -> list[Tensor]:
        """`[R, n, k, k]` views of the factors A, B, C, D in a factor stack."""
        return [f.transpose(0, 1) for f in split_factors(stack, self.local_experts[0].curvature[name].shapes)]

    def _stacked_factors(self, name: str, group=None) -> Optional[list[Tensor]]:
        if not self.args.curved:
            return None
        return self._factor_views(name, self._factor_stack(name, group))

    def _local_mask(self, like: Tensor):
        if self.args.mask == "dare":
            return Fn.dare_mask(like.shape, self.args.dare_p, dtype=like.dtype, device=like.device) \
                if self.training else "none"
        return self.args.mask

    def _task_vectors(self, name: str, group) -> Tensor:
        """All experts' `m_i ⊙ M_i(E_i − B)`: each rank curves its own, then the group all-gathers (§7)."""
        tau = Fn.task_vectors(self.base[name], [getattr(e, name) for e in self.local_experts])
        mask = self._local_mask(tau)
        total = comm.all_reduce_sum(tau.detach().sum(0), group, self.traffic) if mask == "ties" else None
        task = Fn.curved_task_vectors(tau, self._stacked_factors(name), mask, total)
        return comm.gather_experts(task, group, self.traffic)

    def _curved_experts(self, name: str, group) -> Tensor:
        """Every expert's `M_i(E_i)`, curved by its owner and all-gathered (§4, §7)."""
        experts = self._stacked(name)
        factors = self._stacked_factors(name)
        return comm.gather_experts(experts if factors is None else Fn.apply_curvature(experts, factors), group,
                                  self.traffic)

    def _dare_mask(self, name: str, group) -> Optional[Tensor]:
        """DARE's `[n, out, in]` multipliers of every expert (each owner draws its own), or None."""
        mask = self._local_mask(self._stacked(name).detach())
        return comm.gather_experts(mask, group, self.traffic) if isinstance(mask, Tensor) else None

    def _segment_weights(self, name: str, previous: Tensor, gates: Tensor, group,
                         micro_batch: Optional[MicroBatch]) -> Tensor:
        """`Ŵ^l_s` from `Ŵ^{l-1}_s` segment by segment (§4); what depends on parameters alone is reused per step."""
        curved = self.step_reuse.get(f"curved.{name}", lambda: self._curved_experts(name, group), micro_batch)[0]
        factors = None
        if self.args.curved:
            stack = self.step_reuse.get(f"factors.{name}", lambda: self._factor_stack(name, group), micro_batch)[0]
            factors = self._factor_views(name, stack)
        mask, raw = self.args.mask, None
        if mask == "dare":
            mask = self.step_reuse.get(f"mask.{name}", lambda: self._dare_mask(name, group), micro_batch)[0] \
                if self.training else "none"
        elif mask == "ties":
            raw = self.step_reuse.get(f"raw.{name}", lambda: comm.gather_experts(self._stacked(name).detach(), group,
                                                                                     self.traffic),
                                      micro_batch)[0]
        return Fn.dynamic_merge(previous, curved, gates, factors, mask, self.args.alpha, raw_experts=raw)

    def _span_images(self, name: str, span: Span, group) -> Tensor:
        """This layer's images `Z [n, K+1, out, in]` of its experts and of the chain's span basis (per step)."""
        mask = self._dare_mask(name, group) if self.args.mask == "dare" else None
        return Fn.span_images(torch.cat(span.blocks), self._curved_experts(name, group),
                              self._stacked_factors(name, group), mask)

    def _takes_span(self, name: str, span: Optional[Span], segments: int, micro_batch: Optional[MicroBatch]) -> bool:
        """Whether matrix `name` goes through the span: decided at the step's first micro-batch, kept for the step."""
        if self.step_reuse.holds(f"span.{name}", micro_batch):
            return True
        if self.step_reuse.holds(f"curved.{name}", micro_batch):
            return False
        return prefer_span(None if span is None else span.size, self.args.routed_experts, segments,
                           1 if micro_batch is None else micro_batch.accumulation, self.shapes[name],
                           self.args.curvature_rank, self.args.curved)

    def _chain_weights(self, chain: Optional[MergeChain], gates: Tensor, group,
                       micro_batch: Optional[MicroBatch]) -> tuple[dict, dict]:
        """Per-segment merged weights of a dynamic layer and their spans: from its own base at the chain's start,
        else from `chain`, each matrix through the span or segment by segment, whichever is cheaper."""
        alpha, segments = self.args.alpha, gates.shape[0]
        spannable = self.args.mask != "ties"  # a per-segment election is not linear in Ŵ
        weights, spans = {}, {}
        if self.base is not None:
            coef = torch.cat([gates.new_ones(segments, 1), alpha * gates], 1)
            for n in self.shapes:
                task, task_kept = self.step_reuse.get(f"task.{n}", lambda n=n: self._task_vectors(n, group),
                                                      micro_batch)
                weights[n] = Fn.merge_rows(self.base[n], task.flatten(1), gates, alpha)
                if spannable:
                    spans[n] = Span([self.base[n].unsqueeze(0), task_kept], coef)
            return weights, spans
        if chain is None or chain.weights is None:
            raise ValueError("this dynamic layer continues a chain (chain_start=False): pass the MergeChain "
                             "that the previous dynamic layer filled")
        for n in self.shapes:
            span = chain.spans.get(n) if spannable else None
            if self._takes_span(n, span, segments, micro_batch):
                images, images_kept = self.step_reuse.get(
                    f"span.{n}", lambda n=n, span=span: self._span_images(n, span, group), micro_batch)
                weights[n], coef = Fn.span_merge(chain.weights[n], gates, span.coef, images, alpha)
                spans[n] = Span(span.blocks + [images_kept.flatten(0, 1)], torch.cat([span.coef, coef], 1))
            else:
                weights[n] = self._segment_weights(n, chain.weights[n], gates, group, micro_batch)
        return weights, spans

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
                micro_batch: Optional[MicroBatch] = None):
        x = hidden_states
        self._check_input(x)
        bsz, length, dim = x.shape
        seg = self.segment_len_for(length)
        if length % seg:
            raise ValueError(f"sequence length L={length} is not a multiple of segment_len T={seg}")
        gates, l_aux, counts = self.router(x, seg)
        group = self.deepspeed_moe.ep_group

        if self.args.dynamic:
            weights, spans = self._chain_weights(chain, gates, group, micro_batch)
            if chain is not None:
                chain.weights, chain.spans = weights, spans

            def linear(name, inp):
                return torch.bmm(inp, weights[name].transpose(1, 2))
        else:
            tasks = {n: self.step_reuse.get(f"task.{n}", lambda n=n: self._task_vectors(n, group), micro_batch)[0]
                     for n in self.shapes}

            def linear(name, inp):
                return Fn.merged_linear(inp, self.base[name], tasks[name], gates, self.args.alpha)

        out = Fn.ffn(x.reshape(-1, seg, dim), add_biases(linear, self.bias), self.activation)
        return out.reshape(bsz, length, dim), l_aux, counts


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
