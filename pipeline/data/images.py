"""Conversions between stored images (uint8 NHWC) and model space (float NCHW in [-1, 1]),
and the pixel distance between stored images.

Diffusion U-Nets here work at a power-of-two size (32x32); 28x28 Fashion-MNIST is
padded with its background value (black, -1) rather than resized, so that cropping
the centre back out gives synthetic images at the real pixel grid.
"""

from __future__ import annotations

import math

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


def nearest_rmse(queries: np.ndarray, pool: np.ndarray, batch: int = 1024) -> np.ndarray:
    """For each uint8 query image, the pixel RMSE (in [0, 1] units) to its nearest pool image."""
    return nearest_pool_image(queries, pool, batch)[0]


def nearest_pool_image(queries: np.ndarray, pool: np.ndarray, batch: int = 1024
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(pixel RMSE in [0, 1] units, pool index) of each uint8 query's nearest pool image."""
    if len(pool) == 0:
        raise ValueError("the nearest-image search needs a non-empty pool of images")
    p = torch.as_tensor(pool.reshape(len(pool), -1), dtype=torch.float32) / 255.0
    dist, idx = [], []
    for i in range(0, len(queries), batch):
        q = torch.as_tensor(queries[i:i + batch].reshape(-1, p.shape[1]), dtype=torch.float32) / 255
        d, j = torch.cdist(q, p).min(dim=1)
        dist.append(d / math.sqrt(p.shape[1]))
        idx.append(j)
    if not dist:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return torch.cat(dist).numpy(), torch.cat(idx).numpy()
