"""One rule for mixed precision, used by every forward pass in the project: bf16 autocast on
CUDA (when enabled); on the CPU fp32, unless the caller opts in (``cpu=True``) *and* the
processor has native bf16 (AVX512-BF16 or AMX), where a small conv net trains about twice as
fast (bench/ssl_step.py). Without native bf16 the CPU emulates it and is slower than fp32,
so the opt-in falls back to fp32 there."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Set to 0 to turn the CPU bf16 path off on a processor that has it (e.g. to compare).
CPU_BF16_ENV = "ANL_CPU_BF16"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Does this CPU run bf16 matmuls and convolutions natively (AVX512-BF16 or AMX)?"""
    if os.environ.get(CPU_BF16_ENV, "1") == "0":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # a build without the probe's kernels
            continue
    return False


def uses_bf16(device: torch.device | str, enabled: bool = True, cpu: bool = False) -> bool:
    """Whether ``autocast_for(device, enabled, cpu)`` autocasts to bf16."""
    device = torch.device(device)
    if not enabled:
        return False
    if device.type == "cuda":
        return True
    return cpu and device.type == "cpu" and cpu_has_native_bf16()


def autocast_for(device: torch.device | str, enabled: bool = True, cpu: bool = False):
    """bf16 autocast where :func:`uses_bf16` says so, else a no-op context."""
    device = torch.device(device)
    if uses_bf16(device, enabled, cpu):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
