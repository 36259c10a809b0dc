"""Rotary position embeddings of the llama family, computed as Hugging Face's Llama computes them.

The tables are recomputed in fp32 on every forward (an [L, head_dim/2] outer product, negligible next to
attention) rather than stored: a buffer would be cast to bf16 with the model and lose the angles'
precision, and nothing positional has to be checkpointed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, device=None) -> Tensor:
    """`θ^(-2i/head_dim)` for i < head_dim/2, with Llama 3's frequency-dependent scaling when `rope_scaling` is set."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(cfg: ModelConfig, length: int, dtype: torch.dtype, device=None) -> tuple[Tensor, Tensor]:
    """`(cos, sin)`, each `[length, head_dim]` (the half-size angles repeated twice, Hugging Face's layout)."""
    positions = torch.arange(length, device=device).float()
    angles = positions[:, None] * inverse_frequencies(cfg, device)[None, :]  # elementwise: no GEMM to count
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x [B, heads, L, head_dim]` by the position angles: pairs (i, i + head_dim/2), as Hugging Face does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
