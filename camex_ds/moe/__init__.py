"""MoE layers: the CAMEx merge layer (`CAMExMoE`) and the token-routing baselines, over a functional core."""
from . import functional
from .layer import CAMExMoE, MergeChain

__all__ = ["functional", "CAMExMoE", "MergeChain"]
