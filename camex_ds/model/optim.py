"""How the optimizer sees the model's parameters: decay groups, split by DeepSpeed into its MoE groups, and the
curvature factors' learning-rate scale."""
from __future__ import annotations

import torch

from ..deepspeed_adapter import split_moe_param_groups, torch_optimizer

#: The param-group key whose value multiplies the group's learning rate at every step (`apply_lr_scales`).
LR_SCALE = "lr_scale"


def param_groups(model: torch.nn.Module) -> list:
    """Weight decay on matrices only: not on norms, and not on curvature factors (it would pull them to 0, not I).

    The curvature factors form groups of their own, carrying `moe.curvature_lr_scale` (`LR_SCALE`). DeepSpeed then
    splits every group into expert and non-expert groups, as its MoE requires, and empty ones are dropped. The
    factors are all expert parameters, so their group takes the place of the expert no-decay group that held them
    (and nothing else) before the option existed: older checkpoints keep their optimizer layout.
    """
    moe = getattr(model.config, "moe", None)
    decay, no_decay, curvature = [], [], []
    for name, p in model.named_parameters():
        if ".curvature." in name:
            curvature.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    if curvature:
        groups.append({"params": curvature, "name": "curvature", "weight_decay": 0.0,
                       LR_SCALE: float(moe.curvature_lr_scale)})
    return [g for g in split_moe_param_groups(groups) if g["params"]]


def apply_lr_scales(optimizer) -> None:
    """Make every param group's `LR_SCALE` multiply the learning rate it steps with, whatever sets that rate.

    DeepSpeed 0.19's schedulers write each group's lr from one schedule: WarmupLR, WarmupDecayLR, OneCycle and
    LRRangeTest give every group the same value, so a scaled lr kept in a group is overwritten at the first step
    (only WarmupCosineLR scales each group's starting lr). So the torch optimizer under DeepSpeed's wrappers (ZeRO
    1/2 step it one group at a time) multiplies `lr` by the scale just before each step and puts the scheduler's
    value back after it: schedules, `get_lr()` and the logged lr stay the unscaled ones, and the group's scale is
    saved with the optimizer state, so a resumed or resharded checkpoint keeps it. Call once per optimizer, after
    `deepspeed.initialize`.
    """
    inner = torch_optimizer(optimizer)
    if not any(group.get(LR_SCALE, 1.0) != 1.0 for group in inner.param_groups):
        return
    scheduled = []  # (group, the lr the scheduler set) during one step

    def scale(opt, args, kwargs) -> None:
        scheduled[:] = [(g, g["lr"]) for g in opt.param_groups if g.get(LR_SCALE, 1.0) != 1.0]
        for group, lr in scheduled:
            group["lr"] = lr * group[LR_SCALE]

    def restore(opt, args, kwargs) -> None:
        for group, lr in scheduled:
            group["lr"] = lr
        scheduled.clear()

    inner.register_step_pre_hook(scale)
    inner.register_step_post_hook(restore)
