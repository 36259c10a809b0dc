"""Where the curvature factors start (spec §3): `M_i = I`, with the R Kronecker terms apart.

Terms that start equal get equal gradients and stay equal for ever, so rank R would compute exactly what rank 1
does, at R times the cost. So B, C, D start as the identity and `A_r = I + ε_r`, `ε_r ~ N(0, σ²)` centred over r:
`(1/R) Σ_r A_r = I`, and `M_i` is the identity up to rounding. For R = 1 the centred ε is exactly 0.

The draw comes from a generator seeded by a peek at torch's global RNG, which is left where it was: every other
initial tensor of a model is the same function of the seed whatever the method, so a camex* model and its
Euclidean twin built from one seed differ only by their curvature factors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .functional import identity_factors


def initial_factors(rank: int, num: int, out_features: int, in_features: int, std: float,
                    generator: Optional[torch.Generator] = None) -> tuple:
    """§3's starting factors `(A, B, C, D)`, each `[R, num, k, k]` (float64) for `num` experts' `[out, in]` matrix."""
    a, b, c, d = identity_factors(rank, num, out_features, in_features, dtype=torch.float64, device="cpu")
    eps = torch.randn(a.shape, generator=generator, dtype=torch.float64, device="cpu") * std
    return a + (eps - eps.mean(0, keepdim=True)), b, c, d


def peeked_generator() -> torch.Generator:
    """A CPU generator seeded by the global RNG's next draw, which stays undrawn (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(2 ** 62, (), device="cpu"))
    return torch.Generator(device="cpu").manual_seed(seed)
