"""The expert FFN of spec §1 as a module: dense layers, SMoE experts and upcycling share it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import ffn


def expert_matrix_names(activation: str) -> tuple[str, ...]:
    """The FFN's matrix names for `activation`, in order (§1); the last maps back to the hidden size."""
    if activation in ("gelu", "gelu_tanh"):
        return ("w_in", "w_out")
    if activation == "swiglu":
        return ("w_gate", "w_up", "w_down")
    raise ValueError(f"activation={activation!r} is invalid: expected one of gelu, gelu_tanh, swiglu")


def matrix_shapes(hidden_size: int, ffn_hidden_size: int, activation: str) -> dict:
    """`name -> (out, in)` for the FFN's matrices (§1, names from `expert_matrix_names`): each maps d -> h but
    the last, which maps h -> d."""
    *up, down = expert_matrix_names(activation)
    return {**{name: (ffn_hidden_size, hidden_size) for name in up}, down: (hidden_size, ffn_hidden_size)}


def ffn_biases(shapes: dict) -> nn.ParameterDict:
    """One zero-initialised bias per matrix (`bias.<matrix>`, its output width): GPT-2's FFN biases."""
    return nn.ParameterDict({name: nn.Parameter(torch.zeros(out)) for name, (out, _) in shapes.items()})


def add_biases(linear, bias: Optional[nn.ParameterDict]):
    """`linear(name, input)` followed by the matrix's bias, if the FFN has biases."""
    if bias is None:
        return linear
    return lambda name, inp: linear(name, inp) + bias[name]


class FFN(nn.Module):
    """`gelu`: `gelu(x w_inᵀ) w_outᵀ`; `swiglu`: `(silu(x w_gateᵀ) ⊙ x w_upᵀ) w_downᵀ`; optionally with biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu", init_std: float = 0.02,
                 bias: bool = False):
        super().__init__()
        self.activation = activation
        shapes = matrix_shapes(hidden_size, ffn_hidden_size, activation)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.randn(shape) * init_std))
        self.bias = ffn_biases(shapes) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, add_biases(lambda name, inp: F.linear(inp, getattr(self, name)), self.bias), self.activation)
