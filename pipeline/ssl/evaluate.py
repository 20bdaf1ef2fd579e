"""Top-1 error, per-class accuracy and the confusion matrix of a classifier on uint8 images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from anl_core.precision import autocast_for

from .augment import to_unit


@dataclass(frozen=True)
class EvalResult:
    top1_error: float
    per_class_accuracy: list[float]  # NaN for a class absent from the evaluated images
    confusion: np.ndarray            # int64 (true class, predicted class)

    @property
    def top1_accuracy(self) -> float:
        return 1.0 - self.top1_error




@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int = 1024, amp: bool = False, channels_last: bool = False) -> EvalResult:
    """Evaluate ``model`` (in eval mode) on uint8 (N, H, W, C) images already on its device."""
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
            with autocast_for(device, amp):
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
