"""ZeRO-Offload of the optimizer (`zero_optimization.offload_optimizer: {device: cpu}`): which DeepSpeed configs can
run it with our MoE parameter groups, checked before any process talks, each refusal one line that says why.

What works (tests/test_offload.py, fp32): ZeRO 1 and 2, ep 1 and 2, with the expert and non-expert, decay, no-decay
and curvature groups of `camex_ds.model.optim` (the curvature's own lr scale included), save, resume and reshard;
bf16 at ZeRO 2 gave the losses of the run without offload too (measured once, not a test). DeepSpeed then steps the fp32
master partition on the CPU with its CPU Adam (`DeepSpeedCPUAdam`, the `cpu_adam` op, built by JIT at the first run
when DeepSpeed was installed without it: about 90 s on two cores, then cached in `~/.cache/torch_extensions`; set
`DS_BUILD_CPU_ADAM=1` when installing DeepSpeed to build it then), or with torch's Adam/AdamW when the optimizer's
params say `"torch_adam": true`.
"""
from __future__ import annotations

import shutil

from ..config import ConfigError

#: Optimizer types DeepSpeed steps on the CPU with a CPU implementation of its own (or torch's with `torch_adam`).
CPU_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")


def offload_device(ds: dict):
    """`zero_optimization.offload_optimizer.device` of a DeepSpeed config, or None when the optimizer stays put."""
    section = ds.get("zero_optimization", {}).get("offload_optimizer")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"zero_optimization.offload_optimizer={section!r} is invalid: expected a JSON object such "
                          "as {\"device\": \"cpu\"}")
    device = section.get("device", "none")
    return None if device == "none" else device


def check_offload(ds: dict) -> None:
    """Refuse, in one line, an optimizer offload that cannot run (call before the engine is built)."""
    device = offload_device(ds)
    if device is None:
        return
    if device != "cpu":
        raise ConfigError(f"zero_optimization.offload_optimizer.device={device!r} is not supported: use \"cpu\" "
                          "(NVMe offload belongs to ZeRO 3, which MoE merge layers cannot use)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ConfigError(f"zero_optimization.offload_optimizer needs ZeRO stage 1 or 2, got stage {stage!r}: "
                          "without ZeRO the optimizer steps the parameters where they live, not on the CPU")
    optimizer = ds.get("optimizer") or {}
    kind = str(optimizer.get("type", "")).lower()
    if kind not in CPU_OPTIMIZERS:
        raise ConfigError(f"zero_optimization.offload_optimizer needs an optimizer DeepSpeed can step on the CPU "
                          f"(optimizer.type one of Adam, AdamW, Adagrad, Lion), got {optimizer.get('type')!r}")
    if kind in ("adam", "adamw") and not (optimizer.get("params") or {}).get("torch_adam") and not cpu_adam_ready():
        raise ConfigError("zero_optimization.offload_optimizer: DeepSpeed's CPU Adam (op cpu_adam) is not built and "
                          "no C++ compiler and ninja are here to build it: reinstall DeepSpeed with "
                          "DS_BUILD_CPU_ADAM=1, or set optimizer.params.torch_adam=true")


def cpu_adam_ready() -> bool:
    """Whether DeepSpeed's CPU Adam is prebuilt or can be built by JIT here (a C++ compiler and ninja)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available

    if installed_ops.get("cpu_adam"):
        return True
    return is_ninja_available() and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
