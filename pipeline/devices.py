"""Which torch device runs the work: a setting's ``device`` ("auto", "cpu", "cuda", "cuda:1")
as a ``torch.device``, checked before any work starts."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names; "auto" is CUDA when there is a card, else the CPU. A CUDA
    device asked for on a machine without one is refused here, with the fix, rather than deep
    inside the first tensor move."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; "
                           "use device='auto' or 'cpu'")
    return device
