"""Segment router: noisy top-k gating over segment summaries and the load-balancing loss (spec §2)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions.normal import Normal

from . import functional as Fn


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation; 0 for a single expert."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 statistics in fp32, float64 stays float64
    return x.var() / (x.mean() ** 2 + 1e-10)


def _smooth_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """Shazeer et al.'s differentiable load: P(expert i stays in the top k under fresh noise), per segment."""
    top = noisy.topk(top_k + 1, dim=-1).values
    threshold_in, threshold_out = top[..., top_k:top_k + 1], top[..., top_k - 1:top_k]
    is_in = noisy > threshold_in
    normal = Normal(torch.zeros((), dtype=clean.dtype, device=clean.device), torch.ones((), dtype=clean.dtype,
                                                                                          device=clean.device))
    prob_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(is_in, prob_in, prob_out)


class SegmentRouter(nn.Module):
    """One router per MoE layer, shared by every matrix of the expert FFN."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, causal: bool, first_segment: str,
                 noisy_gating: bool, aux_loss_coef: float, init_std: float = 0.02):
        super().__init__()
        self.top_k, self.causal, self.first_segment = top_k, causal, first_segment
        self.noisy_gating, self.aux_loss_coef = noisy_gating, aux_loss_coef
        self.w_gate = nn.Parameter(torch.randn(hidden_size, num_experts) * init_std)
        self.w_noise = nn.Parameter(torch.zeros(hidden_size, num_experts)) if noisy_gating else None
        self.last_stats: dict = {}

    def forward(self, x: Tensor, segment_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """`x [B,L,d]` -> gates `[B·S, N]` (segment-major), the auxiliary loss, and per-expert segment counts."""
        summary = Fn.summarize_segments(x, segment_len)
        clean = summary @ self.w_gate
        logits, load = clean, None
        if self.noisy_gating and self.training:
            noise_std = nn.functional.softplus(summary @ self.w_noise) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
            if self.top_k < clean.shape[-1]:
                load = _smooth_load(clean, logits, noise_std, self.top_k).sum((0, 1))
        gates = Fn.topk_softmax(logits, self.top_k)
        counts = (gates > 0).sum((0, 1))
        with torch.no_grad():  # read by the trainer's metrics: how peaked and how balanced routing is
            entropy = -(gates * gates.clamp_min(1e-20).log()).sum(-1).mean()
            self.last_stats = {"entropy": entropy, "max_load": (counts / counts.sum().clamp_min(1)).max()}
        if load is None:
            load = counts.to(gates.dtype)
        aux = self.aux_loss_coef * (cv_squared(gates.sum((0, 1))) + cv_squared(load))
        if self.causal:
            gates = Fn.causal_shift(gates, self.first_segment)
        return gates.reshape(-1, gates.shape[-1]), aux.to(x.dtype), counts
