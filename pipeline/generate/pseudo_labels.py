"""The second round's pseudo-labels: which unlabeled images join each class's subset.

DPT's loop ("Diffusion Models and Semi-Supervised Learners Benefit Mutually with Few Labels",
NeurIPS 2023) in this method's terms: the baseline classifier labels the unlabeled pool, and
each class's adapter is tuned again on its labeled images plus the pool images the classifier
is most confident belong to it. Selection reads the classifier's probabilities only, never a
label of the pool; the pseudo-labels' precision against the true labels is computed after the
fact, as an evaluation figure that chooses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PseudoLabels:
    train_idx: np.ndarray   # int64, training-set indices of the chosen pool images
    labels: np.ndarray      # int64, the classifier's class for each
    confidence: np.ndarray  # float64, its softmax probability for that class

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def precision(self, true_labels: np.ndarray) -> float | None:
        """Share of pseudo-labels equal to the true label (evaluation only)."""
        if not len(self.labels):
            return None
        return float((true_labels[self.train_idx] == self.labels).mean())


def select_pseudo_labels(probs: np.ndarray, pool_idx: np.ndarray, per_class: int,
                         threshold: float) -> PseudoLabels:
    """Per class, up to ``per_class`` pool images whose top class is that class with
    probability >= ``threshold``, most confident first (ties: lower index first).

    Class-balanced by construction: a class the classifier favours cannot take more than its
    K, so the expanded subsets stay as balanced as the labeled ones.
    """
    probs = np.asarray(probs, dtype=np.float64)
    pool_idx = np.asarray(pool_idx, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(pool_idx):
        raise ValueError(f"probs {probs.shape} must be (len(pool_idx)={len(pool_idx)}, classes)")
    if per_class < 1 or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"per_class={per_class} must be >= 1 and threshold={threshold} in [0, 1]")
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    chosen = []
    for c in range(probs.shape[1]):
        rows = np.flatnonzero((pred == c) & (conf >= threshold))
        order = np.lexsort((pool_idx[rows], -conf[rows]))  # last key first: confidence
        chosen.append(rows[order[:per_class]])
    rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return PseudoLabels(pool_idx[rows], pred[rows].astype(np.int64), conf[rows])
