"""Token-level top-k SMoE baselines: DeepSpeed's own MoE layer (any device) and MegaBlocks dMoE (CUDA)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .. import deepspeed_adapter as ds
from .. import parallel
from ..config import ConfigError, MoEConfig
from .ffn import FFN, matrix_shapes
from .protocol import MoEOutput

# DeepSpeed's MoE keeps at least this many token slots per expert (its `min_capacity`); the FLOPs count reads it.
SMOE_MIN_CAPACITY = 4


def megablocks_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import megablocks  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, ep_size: int, bf16: bool = True, ffn_bias: bool = False) -> str:
    """`moe.backend` as built: 'auto' is MegaBlocks where it can run (CUDA, the package, ep_size 1, bf16:
    its grouped GEMM is bf16-only; experts without biases), else DeepSpeed's MoE; an explicit choice is kept,
    'megablocks' only in bf16."""
    if backend == "megablocks" and not bf16:
        raise ConfigError("moe.backend='megablocks' runs in bf16 only (its grouped GEMM): enable bf16 in the "
                          "DeepSpeed config (\"bf16\": {\"enabled\": true}) or use moe.backend 'deepspeed' or 'auto'")
    if backend != "auto":
        return backend
    return "megablocks" if bf16 and ep_size == 1 and not ffn_bias and megablocks_available() else "deepspeed"


class TokenMoE(ds.MoE):
    """DeepSpeed's top-k gated MoE (capacity-padded, all-to-all under EP) with our FFN as the expert.

    Experts are drawn for all N on every rank and sliced, as in `CAMExMoE`, so a seed gives the same
    model at any `ep_size`; `forward(x, chain=None)` matches the merge layers' signature. With `ep_size` > 1 the
    caller initialises `torch.distributed` first (`parallel.init_distributed`) and wraps the model with
    `deepspeed.initialize`, which gives the layer its expert-parallel group; with `ep_size` 1 it runs anywhere.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, moe: MoEConfig, *, activation: str = "gelu",
                 init_std: float = 0.02, bias: bool = False):
        """`moe`: the layer's `MoEConfig` (num_experts, k, ep_size, capacity_factor, aux_loss_coef)."""
        ep_rank = parallel.expert_parallel_rank(moe.ep_size)  # before DeepSpeed builds anything: a clear error first
        super().__init__(hidden_size, FFN(hidden_size, ffn_hidden_size, activation, init_std, bias), moe.num_experts,
                         ep_size=moe.ep_size, k=moe.k, capacity_factor=moe.capacity_factor,
                         eval_capacity_factor=moe.capacity_factor, min_capacity=SMOE_MIN_CAPACITY, drop_tokens=True,
                         use_rts=False)
        self.aux_loss_coef = moe.aux_loss_coef
        with torch.no_grad():
            ds.token_gate_weight(self).normal_(0.0, init_std)
            for name, shape in matrix_shapes(hidden_size, ffn_hidden_size, activation).items():
                full = torch.randn(moe.num_experts, *shape) * init_std
                for j, expert in enumerate(ds.local_experts(self)):
                    getattr(expert, name).copy_(full[parallel.global_expert(ep_rank, self.num_local_experts, j)])

    def plan(self, segments: int, accumulation: int = 1, spans_in=None) -> None:
        """No work from parameters alone: tokens go to their experts every forward (`MoELayer`)."""
        return None

    def forward(self, hidden_states: Tensor, chain=None, plan=None) -> MoEOutput:
        if self.ep_size > 1 and ds.expert_group(self) is None:  # its all-to-all would span the whole world
            raise RuntimeError(f"TokenMoE with ep_size={self.ep_size} has no expert-parallel group: wrap the model "
                               "with deepspeed.initialize (or call set_deepspeed_parallelism()) before the forward")
        out, l_aux, counts = super().forward(hidden_states)
        return MoEOutput(out, self.aux_loss_coef * l_aux, counts, None)

    @torch.no_grad()
    def stats(self) -> dict:
        """The largest expert's share of the last forward's routed tokens (see `CAMExMoE.stats`)."""
        counts = ds.expert_counts(self)
        if counts is None:
            return {}
        counts = counts.float()
        return {"router/max_load": float(counts.max() / counts.sum().clamp_min(1))}


class MegaBlocksMoE(nn.Module):
    """MegaBlocks dropless MoE (grouped GEMM on CUDA), for the `smoe` baseline on GPUs."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, moe: MoEConfig, *, activation: str = "gelu",
                 init_std: float = 0.02, bf16: bool = False):
        super().__init__()
        if not megablocks_available():
            raise RuntimeError("moe.backend='megablocks' needs CUDA and the `megablocks` package "
                               "(pip install 'camex_ds[gpu]'); use moe.backend='deepspeed' on CPU")
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        gelu = functools.partial(torch.nn.functional.gelu,
                                 approximate="tanh" if activation == "gelu_tanh" else "none")
        self.args = Arguments(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, moe_num_experts=moe.num_experts,
                              moe_top_k=moe.k, mlp_type="glu" if activation == "swiglu" else "mlp",
                              activation_fn=torch.nn.functional.silu if activation == "swiglu" else gelu,
                              mlp_impl="grouped", init_method=lambda w: torch.nn.init.normal_(w, 0.0, init_std),
                              fp16=False, bf16=bf16, moe_loss_weight=moe.aux_loss_coef,
                              device=torch.cuda.current_device())
        self.dmoe = dMoE(self.args)

    def plan(self, segments: int, accumulation: int = 1, spans_in=None) -> None:
        """No work from parameters alone (`MoELayer`)."""
        return None

    def forward(self, hidden_states: Tensor, chain=None, plan=None) -> MoEOutput:
        from megablocks.layers.moe import batched_load_balancing_loss, clear_load_balancing_loss

        if hidden_states.dtype != torch.bfloat16:  # its grouped GEMM would fail deep inside with a CHECK
            raise TypeError(f"moe.backend='megablocks' runs in bfloat16 only (its grouped GEMM), got "
                            f"{hidden_states.dtype}: enable bf16 in the DeepSpeed config or use moe.backend='deepspeed'")
        out = self.dmoe(hidden_states)
        out = out[0] if isinstance(out, tuple) else out
        aux = batched_load_balancing_loss(self.args) if self.training else hidden_states.new_zeros(())
        clear_load_balancing_loss()
        return MoEOutput(out, aux, None, None)

    def stats(self) -> dict:
        return {}  # MegaBlocks keeps its routing statistics to itself
