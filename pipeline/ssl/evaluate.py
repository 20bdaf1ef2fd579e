"""Top-1 error, per-class accuracy and the confusion matrix of a classifier on uint8 images,
and the BatchNorm recalibration every EMA evaluation starts with.

Why recalibrate: the EMA model's weights are an average over many steps, so the running
statistics the raw model collected (from its own last batches, many of them strongly
augmented views) do not describe the activations of the EMA weights. With cnn-small's BN
momentum 0.1 those copied buffers overstated the error by about 4 points on average along a
run (``bench/bn_recalibration.py``). The EMA model's statistics are therefore recomputed, for its own weights, on
a fixed set of clean training images before each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anl_core.precision import autocast_for

from .randaugment import to_unit

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class EvalResult:
    top1_error: float
    per_class_accuracy: list[float]  # NaN for a class absent from the evaluated images
    confusion: np.ndarray            # int64 (true class, predicted class)

    @property
    def top1_accuracy(self) -> float:
        return 1.0 - self.top1_error




@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
                   amp: bool = False, channels_last: bool = False) -> int:
    """Recompute every BatchNorm's running mean and variance of ``model`` on uint8 (N, H, W, C)
    ``images`` (already on its device): the plain average over the batches (momentum None),
    in train mode, no gradients. Weights are untouched. Returns the number of BN layers."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns or len(images) == 0:
        return len(bns)
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            x = to_unit(images[start:start + batch_size])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(images.device, amp, cpu=True):
                model(x)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(bns)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int = 1024, amp: bool = False, channels_last: bool = False) -> EvalResult:
    """Evaluate ``model`` (in eval mode) on uint8 (N, H, W, C) images already on its device.

    ``amp`` is the caller's resolved choice (``anl_core.precision.uses_bf16``)."""
    if len(images) == 0:
        raise ValueError("cannot evaluate on zero images")
    was_training = model.training
    model.eval()
    device = images.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    try:
        for start in range(0, len(images), batch_size):
            x = to_unit(images[start:start + batch_size])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, amp, cpu=True):
                pred = model(x).argmax(dim=-1)
            y = labels[start:start + batch_size]
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2)
    finally:
        model.train(was_training)
    cm = confusion.view(num_classes, num_classes).cpu().numpy()
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    error = 1.0 - float(np.trace(cm)) / float(cm.sum())
    return EvalResult(error, [float(v) for v in per_class], cm)
