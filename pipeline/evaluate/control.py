"""The control arm's rows: real unlabeled images labeled by the synthetic filter's judge.

The augmented arm gets two things from the pipeline: generated images, and the condition
encoder's knowledge (ImageNet features decide which samples the prototype filter keeps,
and the adapters are conditioned on them). The control arm isolates the second: it adds
as many *real* unlabeled images per class as the augmented arm has synthetic rows, each
labeled by the same judge (mean cosine similarity to each class's labeled images in the
encoder's pooled tokens, ``pipeline.generate.neighbors.class_similarity``) and kept by the same
rule (margin above ``filter.margin``), as extra labeled rows in the same way and share.
A gain of augmented over control is the generated images' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.images import to_model_space
from pipeline.data.pool_labels import Scored, agreement
from pipeline.generate.neighbors import class_similarity, neighbor_pool, pooled_features


@dataclass(frozen=True)
class ControlRows:
    images: np.ndarray      # uint8 (N, H, W, C), real training images
    labels: np.ndarray      # int64 (N,), the judge's labels (not the dataset's)
    train_idx: np.ndarray   # int64 (N,), their indices in the training set
    true_labels: np.ndarray  # int64 (N,), the dataset's labels (UNLABELED where it has none):
    #                          for reporting precision only
    shortfall: dict[int, int]  # class -> rows asked for but not found in the pool

    @property
    def scored_precision(self) -> Scored:
        """Share of rows whose judged label is right, over the rows whose true label is known
        (evaluation only: never trained on); not computed when the pool has no labels."""
        return agreement(self.labels, self.true_labels)

    @property
    def precision(self) -> float | None:
        """``scored_precision``'s value (None: no labels to score against; 0.0: no rows)."""
        return self.scored_precision.value if len(self.labels) else 0.0


def judge_pool(encoder, labeled_tokens: torch.Tensor, labeled_labels: np.ndarray,
               images: np.ndarray, device: str, batch_size: int = 256
               ) -> tuple[np.ndarray, np.ndarray]:
    """(judged class, margin) of each image: the prototype judge of the synthetic filter."""
    labeled_feats = pooled_features(labeled_tokens)
    feats = []
    for s in range(0, len(images), batch_size):
        x = to_model_space(images[s:s + batch_size], device=device)
        feats.append(pooled_features(encoder.encode(x).cpu()))
    feats = torch.cat(feats)
    classes, sim = class_similarity(labeled_feats @ feats.T,
                                    torch.as_tensor(labeled_labels, dtype=torch.int64))
    top2 = sim.topk(min(2, len(classes)), dim=0)
    judged = classes[top2.indices[0]].numpy()
    margin = (top2.values[0] - top2.values[1]).numpy() if len(classes) > 1 else \
        top2.values[0].numpy()
    return judged.astype(np.int64), margin


def control_rows(train_images: np.ndarray, train_labels: np.ndarray,
                 unlabeled_idx: np.ndarray, counts: dict[int, int], judge, pool_size: int,
                 seed: int, margin: float = 0.0) -> ControlRows:
    """``counts[c]`` judged rows of each class c from a seeded pool of unlabeled images.

    ``judge(images) -> (class, margin)`` (``judge_pool`` bound to an encoder). Rows whose
    margin is above ``margin`` are candidates for their judged class; each class takes a
    seeded random ``counts[c]`` of its candidates (all of them, and a shortfall, when
    there are fewer).
    """
    pool = neighbor_pool(unlabeled_idx, pool_size, seed)
    judged, m = judge(train_images[pool])
    rng = np.random.default_rng(seed)
    chosen, labels, shortfall = [], [], {}
    for c, n in sorted(counts.items()):
        cand = pool[(judged == c) & (m > margin)]
        take = cand[rng.permutation(len(cand))[:n]]
        if len(take) < n:
            shortfall[int(c)] = int(n - len(take))
        chosen.append(take)
        labels.append(np.full(len(take), c, np.int64))
    idx = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, np.int64)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return ControlRows(train_images[idx], lab, idx, np.asarray(train_labels)[idx].astype(np.int64),
                       shortfall)
