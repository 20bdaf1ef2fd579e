"""The contract between the trainer loop and one SSL algorithm (USB style).

An algorithm is one small class: it receives an augmented batch and the model and
returns the loss plus the named terms to log. The trainer owns everything else
(sampling, augmentation, optimiser, EMA, evaluation, checkpoints), so FlexMatch or
FreeMatch is a subclass with its own ``train_step`` and, if it keeps running statistics,
its own ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    """One training batch, already augmented, float images in [0, 1] on the device."""

    x_lb: torch.Tensor                    # weak-augmented labeled images (B, C, H, W)
    y_lb: torch.Tensor                    # int64 (B,)
    w_lb: torch.Tensor                    # per-row loss weight (B,): 1 real, w synthetic
    x_ulb_w: torch.Tensor | None = None   # weak view of unlabeled images (mu*B, ...)
    x_ulb_s: torch.Tensor | None = None   # strong view of the same images
    idx_ulb: torch.Tensor | None = None   # their indices in the unlabeled pool


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight * cross-entropy (weight 1 for every real row).

    A negative target is an unlabeled image (``UNLABELED``) that reached a labeled row: a
    bug upstream, which cross-entropy would report as an index error (CPU) or an opaque
    device assert (CUDA). The check runs on the device, without a host sync per step.
    """
    torch._assert_async((targets >= 0).all(), "an unlabeled image (label -1) reached the "
                        "labeled cross-entropy; unlabeled images belong in the unlabeled pool")
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).mean()


class SSLAlgorithm:
    name = "base"
    uses_unlabeled = True  # False: the trainer draws and augments no unlabeled batch

    def __init__(self, config, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        raise NotImplementedError

    # Algorithms with running statistics (FlexMatch's class-wise learning status,
    # FreeMatch's thresholds) override these so a resumed run continues them exactly.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Supervised(SSLAlgorithm):
    """Labeled cross-entropy only: the 'supervised' arm, same net and schedule."""

    name = "supervised"
    uses_unlabeled = False

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        loss = weighted_ce(model(batch.x_lb), batch.y_lb, batch.w_lb)
        return StepOutput(loss, {"loss": loss.detach(), "sup_loss": loss.detach()})
