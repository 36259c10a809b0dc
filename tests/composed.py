"""Spec §5's whole-merge functions, composed from the library's functional pieces in one process.

The library never calls these: a merge layer splits the same math at the expert-parallel boundary (each rank
curves its own experts, the group all-gathers, the per-step work is reused over micro-batches), so it calls the
pieces one by one. Here they are whole, so `test_functional` can check that the pieces compose to the spec's
math against the independent float64 reference (`reference.py`).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from camex_ds.moe import functional as Fn
from camex_ds.moe.ffn import expert_matrix_names


def segment_gates(x: Tensor, w_gate: Tensor, segment_len: int, top_k: int, causal: bool,
                  first_segment: str = "uniform") -> Tensor:
    """Noise-free routing gates `[B, L//T, N]` from segment means (§2), as `SegmentRouter` computes them."""
    gates = Fn.topk_softmax(Fn.summarize_segments(x, segment_len) @ w_gate, top_k)
    return Fn.causal_shift(gates, first_segment) if causal else gates


def _mask(mask: Union[str, Tensor]) -> tuple:
    """`(kind, multipliers)` of a mask given by name or as DARE's multipliers."""
    return ("dare", mask) if isinstance(mask, Tensor) else (mask, None)


def merge_weights(base: Tensor, experts: Tensor, gates: Tensor, factors: Optional[Fn.Factors] = None,
                  mask: Union[str, Tensor] = "none", alpha: float = 1.0) -> Tensor:
    """Per-segment merged weights `[S,out,in]` (§3; §4 when `base` is per-segment `[S,out,in]`)."""
    kind, multipliers = _mask(mask)
    if base.dim() == 2:
        task = Fn.curved_task_vectors(experts - base, factors, kind, multipliers=multipliers)
        return Fn.merge_rows(base, task.reshape(task.shape[0], -1), gates, alpha)
    if base.dim() != 3 or base.shape[0] != gates.shape[0]:
        raise ValueError(f"base must be [out,in] or [S,out,in] with S={gates.shape[0]}, got {tuple(base.shape)}")
    curved = experts if factors is None else Fn.apply_curvature(experts, factors)
    return Fn.dynamic_merge(base, curved, gates, factors, kind, alpha, raw_experts=experts, multipliers=multipliers)


def merged_ffn(x: Tensor, gates: Tensor, base: dict, experts: dict, factors: Optional[dict] = None,
               mask: Union[str, dict] = "none", alpha: float = 1.0, activation: str = "gelu") -> Tensor:
    """`y_s = FFN(x_s; W_s)` with each matrix merged by `merge_weights`: `x [S,T,d]` -> `[S,T,d]`."""
    names = expert_matrix_names(activation)
    missing = [n for n in names if n not in base or n not in experts]
    if missing:
        raise ValueError(f"activation {activation!r} needs matrices {names}; missing {missing}")

    def linear(name: str, inp: Tensor) -> Tensor:
        m = mask[name] if isinstance(mask, dict) else mask
        f = None if factors is None else factors[name]
        if base[name].dim() == 2:
            kind, multipliers = _mask(m)
            task = Fn.curved_task_vectors(experts[name] - base[name], f, kind, multipliers=multipliers)
            return Fn.merged_linear(inp, base[name], task, gates, alpha)
        return torch.bmm(inp, merge_weights(base[name], experts[name], gates, f, m, alpha).transpose(1, 2))

    return Fn.ffn(x, linear, activation)
