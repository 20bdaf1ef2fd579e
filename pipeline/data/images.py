"""Conversions between stored images (uint8 NHWC) and model space (float NCHW in [-1, 1]).

Diffusion U-Nets here work at a power-of-two size (32x32); 28x28 Fashion-MNIST is
padded with its background value (black, -1) rather than resized, so that cropping
the centre back out gives synthetic images at the real pixel grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model_space(images: np.ndarray | torch.Tensor, size: int | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, size, size) in [-1, 1], padded with -1 when smaller."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {x.dtype} {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if size is not None:
        h, w = x.shape[-2:]
        if h > size or w > size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        elif h < size or w < size:
            top, left = (size - h) // 2, (size - w) // 2
            x = F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
    return x.contiguous()


def from_model_space(x: torch.Tensor, shape: tuple[int, int] | None = None) -> np.ndarray:
    """float (N, C, S, S) in [-1, 1] -> uint8 (N, H, W, C), centre-cropped to ``shape`` when given."""
    if shape is not None:
        h, w = shape
        s_h, s_w = x.shape[-2:]
        if h <= s_h and w <= s_w:
            top, left = (s_h - h) // 2, (s_w - w) // 2
            x = x[..., top:top + h, left:left + w]
        else:
            x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
