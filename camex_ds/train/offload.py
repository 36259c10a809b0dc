"""ZeRO-Offload of the optimizer (`zero_optimization.offload_optimizer: {device: cpu}`): which DeepSpeed configs can
run it with our MoE parameter groups, checked before any process talks, each refusal one line that says why.

What works (tests/integration/test_offload.py, fp32): ZeRO 1 and 2, ep 1 and 2, with the expert and non-expert, decay, no-decay
and curvature groups of `camex_ds.model.optim` (the curvature's own lr scale included), save, resume and reshard;
bf16 at ZeRO 2 gave the losses of the run without offload too (measured once, not a test). DeepSpeed then steps the fp32
master partition on the CPU with its CPU Adam (`DeepSpeedCPUAdam`, the `cpu_adam` op, built by JIT at the first run
when DeepSpeed was installed without it: about 90 s on two cores, then cached in `~/.cache/torch_extensions`; set
`DS_BUILD_CPU_ADAM=1` when installing DeepSpeed to build it then), or with torch's Adam/AdamW when the optimizer's
params say `"torch_adam": true`.
"""
from __future__ import annotations

from ..config import ConfigError
from ..deepspeed_adapter import cpu_adam_ready
from ..ds_config import DeepSpeedSettings

#: Optimizer types DeepSpeed steps on the CPU with a CPU implementation of its own (or torch's with `torch_adam`).
CPU_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion")


def check_offload(ds: dict) -> None:
    """Refuse, in one line, an optimizer offload that cannot run (call before the engine is built)."""
    settings = DeepSpeedSettings.from_dict(ds)
    device = settings.offload_optimizer
    if device == "none":
        return
    if device != "cpu":
        raise ConfigError(f"zero_optimization.offload_optimizer.device={device!r} is not supported: use \"cpu\" "
                          "(NVMe offload belongs to ZeRO 3, which MoE merge layers cannot use)")
    if settings.zero_stage not in (1, 2):
        raise ConfigError(f"zero_optimization.offload_optimizer needs ZeRO stage 1 or 2, got stage "
                          f"{settings.zero_stage!r}: without ZeRO the optimizer steps the parameters where they live, "
                          "not on the CPU")
    optimizer = settings.optimizer
    kind = "" if optimizer is None else optimizer.type.lower()
    if kind not in CPU_OPTIMIZERS:
        raise ConfigError(f"zero_optimization.offload_optimizer needs an optimizer DeepSpeed can step on the CPU "
                          f"(optimizer.type one of Adam, AdamW, Adagrad, Lion), got "
                          f"{None if optimizer is None else optimizer.type!r}")
    if kind in ("adam", "adamw") and not optimizer.params.get("torch_adam") and not cpu_adam_ready():
        raise ConfigError("zero_optimization.offload_optimizer: DeepSpeed's CPU Adam (op cpu_adam) is not built and "
                          "no C++ compiler and ninja are here to build it: reinstall DeepSpeed with "
                          "DS_BUILD_CPU_ADAM=1, or set optimizer.params.torch_adam=true")
