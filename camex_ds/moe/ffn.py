"""The bias-free expert FFN of spec §1 as a module: dense layers, SMoE experts and upcycling share it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import ffn


def matrix_shapes(hidden_size: int, ffn_hidden_size: int, activation: str) -> dict:
    """`name -> (out, in)` for the FFN's matrices (§1)."""
    h, d = ffn_hidden_size, hidden_size
    if activation == "gelu":
        return {"w_in": (h, d), "w_out": (d, h)}
    if activation == "swiglu":
        return {"w_gate": (h, d), "w_up": (h, d), "w_down": (d, h)}
    raise ValueError(f"activation={activation!r} is invalid: expected one of gelu, swiglu")


class FFN(nn.Module):
    """`gelu`: `gelu(x w_inᵀ) w_outᵀ`; `swiglu`: `(silu(x w_gateᵀ) ⊙ x w_upᵀ) w_downᵀ`."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        self.activation = activation
        for name, shape in matrix_shapes(hidden_size, ffn_hidden_size, activation).items():
            setattr(self, name, nn.Parameter(torch.randn(shape) * init_std))

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, lambda name, inp: F.linear(inp, getattr(self, name)), self.activation)
