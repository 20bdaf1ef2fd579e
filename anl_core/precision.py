"""One rule for mixed precision, used by every forward pass in the project: bf16 autocast on
CUDA (when enabled), plain fp32 elsewhere (bf16 matmuls are slow on CPUs, and fp32 there is
exact)."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(device: torch.device | str, enabled: bool = True):
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
