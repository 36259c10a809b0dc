"""How the optimizer sees the model's parameters: decay groups, split by DeepSpeed into its MoE groups."""
from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module) -> list:
    """Weight decay on matrices only: not on norms, and not on curvature factors (it would pull them to 0, not I)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and ".curvature." not in name else no_decay).append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)
