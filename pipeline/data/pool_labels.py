"""Figures scored against the unlabeled pool's own labels, where the pool may have none.

A benchmark's "unlabeled" pool is labeled images with their labels hidden, so a few
evaluation figures (pseudo-label precision, the control judge's precision, neighbour
purity, label consistency) compare a prediction with the hidden label. A user's own pool
is truly unlabeled: its rows carry ``UNLABELED`` (-1), and a mixed pool (a benchmark plus
a folder of unlabeled images) has both. Each such figure is therefore scored on the rows
whose label is known, says how many those were, and is recorded as not computed, with the
reason, when there are none: a report must not invent a figure nor fail for lack of one.

Record convention (flat keys, so stage and unit records keep scalar metrics):
``<figure>`` is the value or None; ``<figure>_not_computed`` the reason when it is None
for lack of labels; ``<figure>_scored`` / ``<figure>_of`` the rows scored and the rows
there were, present only when some rows had no label (benchmark records stay as they were).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.datasets import UNLABELED

NO_POOL_LABELS = "the unlabeled pool has no labels"
NOT_COMPUTED = "_not_computed"


def has_label(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose label is known (not ``UNLABELED``)."""
    return np.asarray(labels) != UNLABELED


def pool_has_labels(split_labels: np.ndarray, pool_idx: np.ndarray) -> bool:
    """Whether any image of the pool carries a label (an empty pool counts as labeled:
    nothing is missing from it)."""
    pool_idx = np.asarray(pool_idx, np.int64)
    return not len(pool_idx) or bool(has_label(np.asarray(split_labels)[pool_idx]).any())


@dataclass(frozen=True)
class Scored:
    """A share of right predictions over the rows whose true label is known."""

    value: float | None
    scored: int  # rows with a known label, the share's denominator
    of: int      # rows predicted
    reason: str | None = None  # why value is None; None when it was computed (or no rows)

    def record(self, name: str, ndigits: int = 4) -> dict:
        """The figure under ``name`` in the record convention of the module docstring."""
        out: dict = {name: None if self.value is None else round(self.value, ndigits)}
        if self.reason:
            out[name + NOT_COMPUTED] = self.reason
        if self.scored < self.of:
            out[f"{name}_scored"], out[f"{name}_of"] = self.scored, self.of
        return out


def agreement(predicted: np.ndarray, true: np.ndarray) -> Scored:
    """Share of ``predicted == true`` over the rows whose ``true`` label is known."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    known = has_label(true)
    if not known.any():
        return Scored(None, 0, len(true), NO_POOL_LABELS if len(true) else None)
    return Scored(float((predicted[known] == true[known]).mean()), int(known.sum()), len(true))


def check_class_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    """Raise ValueError unless every label is a class in 0..num_classes-1: the guard before
    labels become cross-entropy targets, where ``UNLABELED`` would be read as a class index."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        unl = int((labels == UNLABELED).sum())
        raise ValueError(f"{what}: {int(bad.sum())} of {len(labels)} labels are outside the "
                         f"{num_classes} classes ({unl} of them UNLABELED={UNLABELED}); an "
                         "unlabeled image can only join the unlabeled pool, never a labeled row")
