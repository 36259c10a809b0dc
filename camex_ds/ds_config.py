"""The fields of a DeepSpeed JSON that camex_ds reads, as one typed, frozen view checked once (`DeepSpeedSettings`).

DeepSpeed reads the rest of the JSON itself, and its own config class checks what it reads (the batch sizes against
the world size: `camex_ds.train.configs.deepspeed_batch`); the run still hands DeepSpeed the dict. This view is what
our code asks of it (precision, ZeRO stage, offload, the optimizer and scheduler), with one line naming a bad field
where DeepSpeed would fail later, or with a message about Python.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .config import ConfigError

#: The ZeRO stages a run may use: stage 3 partitions the expert parameters that a merge layer reads whole.
ZERO_STAGES = (0, 1, 2)
#: Where ZeRO may keep the optimizer state (`zero_optimization.offload_optimizer.device`): "none" keeps it here.
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# Fields DeepSpeed reads without checking their types (it would fail later, or with a message about Python)
_COUNTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print")
_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "tensorboard")
# The name an error suggests for a section's `type`
_EXAMPLE_TYPES = {"optimizer": "AdamW", "scheduler": "WarmupCosineLR"}


def _invalid(field: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"--deepspeed_config: {field}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class Component:
    """An `optimizer` or `scheduler` section: DeepSpeed's name for it and its parameters (read-only)."""

    type: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class DeepSpeedSettings:
    """What camex_ds reads of a DeepSpeed JSON. A count left out is None (DeepSpeed derives the batch sizes from
    the others and the world size); a section left out reads as DeepSpeed's default."""

    train_batch_size: Optional[int]
    micro_batch: Optional[int]  # train_micro_batch_size_per_gpu
    accumulation: Optional[int]  # gradient_accumulation_steps
    steps_per_print: Optional[int]
    gradient_clipping: float
    zero_stage: int
    offload_optimizer: str  # zero_optimization.offload_optimizer.device: one of OFFLOAD_DEVICES
    bf16: bool
    fp16: bool
    optimizer: Optional[Component]
    scheduler: Optional[Component]
    tensorboard: bool
    tensorboard_output_path: Optional[str]

    @classmethod
    def from_dict(cls, ds: dict) -> "DeepSpeedSettings":
        """The view of the JSON object `ds`; a field we read that is missing its type or range raises ConfigError."""
        counts = {name: _count(ds, name) for name in _COUNTS}
        clip = ds.get("gradient_clipping", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf:
            raise _invalid("gradient_clipping", clip, "a number >= 0")
        sections = {name: _section(ds, name) for name in _SECTIONS}
        optimizer, scheduler = (_component(sections[name], name) for name in ("optimizer", "scheduler"))
        zero = sections["zero_optimization"]
        stage = zero.get("stage", 0)
        if stage not in ZERO_STAGES or isinstance(stage, bool):
            raise ConfigError(f"zero_optimization.stage={stage!r} is not supported: MoE merge layers need ZeRO stage "
                              "0, 1 or 2 (stage 3 partitions the expert parameters the merge reads whole)")
        fp16 = _enabled(sections["fp16"], "fp16")
        if fp16:
            raise ConfigError("fp16 is not supported: use bf16 (\"bf16\": {\"enabled\": true}) or fp32")
        tensorboard = sections["tensorboard"]
        output_path = tensorboard.get("output_path")
        if output_path is not None and not isinstance(output_path, str):
            raise _invalid("tensorboard.output_path", output_path, "a folder, or \"auto\" (the run's tensorboard/)")
        return cls(train_batch_size=counts["train_batch_size"], micro_batch=counts["train_micro_batch_size_per_gpu"],
                   accumulation=counts["gradient_accumulation_steps"], steps_per_print=counts["steps_per_print"],
                   gradient_clipping=float(clip), zero_stage=stage, offload_optimizer=_offload_device(zero),
                   bf16=_enabled(sections["bf16"], "bf16"), fp16=fp16, optimizer=optimizer, scheduler=scheduler,
                   tensorboard=_enabled(tensorboard, "tensorboard"), tensorboard_output_path=output_path)


def _count(ds: dict, name: str) -> Optional[int]:
    if name not in ds:
        return None
    value = ds[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(name, value, "an integer >= 1")
    return value


def _section(ds: dict, name: str) -> dict:
    section = ds.get(name, {})
    if not isinstance(section, dict):
        raise _invalid(name, section, "a JSON object")
    return section


def _component(section: dict, name: str) -> Optional[Component]:
    """An optimizer or scheduler section; None where the JSON leaves it out (or empty)."""
    if not section:
        return None
    if not isinstance(section.get("type"), str):
        raise _invalid(f"{name}.type", section.get("type"), f"a name such as \"{_EXAMPLE_TYPES[name]}\"")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise _invalid(f"{name}.params", params, "a JSON object")
    return Component(section["type"], MappingProxyType(dict(params)))


def _enabled(section: dict, name: str) -> bool:
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise _invalid(f"{name}.enabled", enabled, "true or false")
    return enabled


def _offload_device(zero: dict) -> str:
    offload = zero.get("offload_optimizer") or {}
    if not isinstance(offload, dict):
        raise _invalid("zero_optimization.offload_optimizer", offload, "a JSON object")
    device = offload.get("device", "none")
    if device not in OFFLOAD_DEVICES:
        raise _invalid("zero_optimization.offload_optimizer.device", device, "one of " + ", ".join(OFFLOAD_DEVICES))
    return device
