"""MoE layers: the CAMEx merge layer (`CAMExMoE`) and the token-routing baselines, over a functional core."""
from . import functional
from .chain import MergeChain
from .layer import CAMExMoE
from .plan import MergePlan
from .protocol import MoELayer, MoEOutput, StepPlans

__all__ = ["functional", "CAMExMoE", "MergeChain", "MergePlan", "MoELayer", "MoEOutput", "StepPlans"]
