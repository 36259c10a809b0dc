"""MoE layers: the CAMEx merge layer (`CAMExMoE`) and the token-routing baselines, over a functional core."""
from . import functional
from .chain import MergeChain
from .layer import CAMExMoE
from .step_reuse import MicroBatch

__all__ = ["functional", "CAMExMoE", "MergeChain", "MicroBatch"]
