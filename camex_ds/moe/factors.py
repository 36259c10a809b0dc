"""How a matrix's Kronecker curvature factors are stored (spec §3): one flat parameter per matrix and expert,
read as views of A, B, C, D; and the reader of the older layout that held the four separately."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as Fn


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
