"""FixMatch (Sohn et al. 2020): confident weak-view predictions supervise the strong view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, SSLAlgorithm, StepOutput, weighted_ce


class FixMatch(SSLAlgorithm):
    name = "fixmatch"

    def logits(self, model: nn.Module, batch: Batch):
        # One forward over labeled + both unlabeled views, as USB does: BatchNorm then sees
        # the whole step's data at once (and one big kernel launch set beats three).
        b, u = batch.x_lb.shape[0], batch.x_ulb_w.shape[0]
        out = model(torch.cat([batch.x_lb, batch.x_ulb_w, batch.x_ulb_s])).float()
        return out[:b], out[b:b + u], out[b + u:]

    def pseudo_labels(self, logits_w: torch.Tensor, batch: Batch):
        """Targets and per-row mask for the strong view; subclasses change the threshold.

        As USB's FixMatch: the weak-view probabilities are computed once (softmax, no
        temperature); the mask is max prob >= tau; hard targets are their argmax, soft
        targets are those same probabilities. USB hands the probabilities to its
        pseudo-label hook with ``softmax=False``, and the hook then returns them as they
        are: the temperature T is never applied in FixMatch, hard or soft.
        """
        probs = torch.softmax(logits_w.detach(), dim=-1)
        conf, hard = probs.max(dim=-1)
        mask = (conf >= self.config.tau).float()
        return (hard if self.config.hard_labels else probs), mask

    def train_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits_lb, logits_w, logits_s = self.logits(model, batch)
        sup = weighted_ce(logits_lb, batch.y_lb, batch.w_lb)
        targets, mask = self.pseudo_labels(logits_w, batch)
        unsup = (F.cross_entropy(logits_s, targets, reduction="none") * mask).mean()
        loss = sup + self.config.lambda_u * unsup
        return StepOutput(loss, {"loss": loss.detach(), "sup_loss": sup.detach(),
                                 "unsup_loss": unsup.detach(), "mask_ratio": mask.mean()})
