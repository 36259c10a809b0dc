"""What the hardware can do: the datasheet peak FLOP/s of known GPUs, a measured matmul peak on CPU, and
`peak_flops`, which picks between them for a device; MFU (`camex_ds.analysis.flops.mfu`) divides by it."""
from __future__ import annotations

import re
import time
from typing import Optional

import torch

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets; the datasheets print Tensor Core rates
# "with sparsity", these are half of those. fp32 = CUDA cores (no TF32). None: no such Tensor Core path.
# Sources are listed in docs/flops.md. Matched against torch.cuda.get_device_name() in order (first hit wins).
GPU_PEAKS_TFLOPS = [
    # (name, regular expressions that must all match the upper-cased device name, {dtype: TFLOP/s})
    ("GH200", (r"\bGH200\b",), {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    ("H200 NVL", (r"\bH200\b", r"\bNVL\b"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200 SXM", (r"\bH200\b",), {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    ("H100 NVL", (r"\bH100\b", r"\bNVL\b"), {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100 PCIe", (r"\bH100\b", r"\bPCIE\b"), {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}),
    ("H100 SXM", (r"\bH100\b",), {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}),
    ("A100", (r"\bA100\b",), {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", (r"\bL40S\b",), {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05}),
    ("L40", (r"\bL40\b",), {"fp32": 90.5, "tf32": 90.5, "bf16": 181.05, "fp16": 181.05}),
    ("L4", (r"\bL4\b",), {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("A10G", (r"\bA10G\b",), {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("A10", (r"\bA10\b",), {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("V100 PCIe", (r"\bV100\b", r"\bPCIE\b"), {"fp32": 14.0, "tf32": None, "bf16": None, "fp16": 112.0}),
    ("V100 SXM2", (r"\bV100\b",), {"fp32": 15.7, "tf32": None, "bf16": None, "fp16": 125.0}),
    ("T4", (r"\bT4\b",), {"fp32": 8.1, "tf32": None, "bf16": None, "fp16": 65.0}),
]
DTYPES = ("fp32", "tf32", "bf16", "fp16")
_CPU_PEAK_CACHE: dict = {}


def match_gpu(name: str) -> Optional[tuple]:
    """The table row for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    upper = name.upper()
    for row in GPU_PEAKS_TFLOPS:
        if all(re.search(pattern, upper) for pattern in row[1]):
            return row
    return None


def cpu_matmul_peak(dtype: str = "fp32", size: int = 1024, seconds: float = 0.5) -> float:
    """Measured FLOP/s of a `size³` matmul on this CPU with `torch.get_num_threads()` threads (cached):
    an achievable peak for this process, not a datasheet number."""
    key = (dtype, size, torch.get_num_threads())
    if key in _CPU_PEAK_CACHE:
        return _CPU_PEAK_CACHE[key]
    tdtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(tdtype)
    b = torch.randn(size, size, generator=gen).to(tdtype)
    out = torch.empty(size, size, dtype=tdtype)
    torch.mm(a, b, out=out)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    peak = 2.0 * size ** 3 * runs / elapsed
    _CPU_PEAK_CACHE[key] = peak
    return peak


def peak_flops(device=None, dtype: str = "fp32", override: Optional[float] = None) -> float:
    """Peak FLOP/s of `device` (default: the current CUDA device if any, else the CPU) for `dtype`
    ('fp32', 'tf32', 'bf16', 'fp16'): datasheet dense peaks for known GPUs, a measured matmul probe on CPU.
    `override` (FLOP/s) wins over both; an unknown GPU without `override` is an error."""
    if override is not None:
        if not isinstance(override, (int, float)) or isinstance(override, bool) or override <= 0:
            raise ValueError(f"override={override!r} is invalid: expected a positive number of FLOP/s")
        return float(override)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cpu":
        return cpu_matmul_peak(dtype)
    if device.type != "cuda":
        raise ValueError(f"no peak known for device type {device.type!r}: pass override (FLOP/s)")
    name = torch.cuda.get_device_name(device)
    row = match_gpu(name)
    if row is None:
        raise ValueError(f"GPU {name!r} is not in camex_ds.analysis.hardware.GPU_PEAKS_TFLOPS: pass override (FLOP/s)")
    value = row[2][dtype]
    if value is None:
        raise ValueError(f"{row[0]} has no {dtype} Tensor Core path; use fp32/fp16 or pass override")
    return value * 1e12


__all__ = ["GPU_PEAKS_TFLOPS", "DTYPES", "match_gpu", "cpu_matmul_peak", "peak_flops"]
