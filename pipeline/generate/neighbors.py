"""Unlabeled neighbours of the labeled images: extra tuning targets for their conditions.

Tuned on its class's few labeled images alone, an adapter learns to redraw them: near-copies
grow with tuning steps (bench/RESULTS.md, faithfulness sweep). With ``neighbors.per_image = k``, each
labeled image's condition tokens are also paired with up to k unlabeled training images
close to it, so the adapter learns "images like this condition", not "this image".

Closeness is cosine similarity of the encoder's mean token. A pool image is only a
candidate for a labeled image of class c when c is also the class whose labeled images it
is most similar to on average (a prototype pseudo-label): on Fashion-MNIST with 4 labels
per class and EfficientNet-Lite0 at 128 px this keeps 80% of the chosen neighbours in the
condition's class at k = 8, against 75% unfiltered. The rest are wrong-class targets, the
price of the extra diversity; ``neighbors.self_share`` keeps part of every batch on the
labeled images themselves.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def neighbor_pool(unlabeled_idx: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded random subset of the unlabeled training indices, ascending."""
    size = min(size, len(unlabeled_idx))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(unlabeled_idx, size, replace=False))


def pooled_features(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) encoder tokens -> (N, D) unit vectors of their mean."""
    return F.normalize(tokens.float().mean(dim=1), dim=1)


def class_similarity(sim: torch.Tensor, labeled_labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present, (C, N) mean similarity to each class's labeled images).

    ``sim`` is (L, N): labeled images x query images. Averaging over a class's labeled
    images (not taking the nearest one) is what keeps a query that resembles a single
    labeled image of the wrong class from being claimed by it.
    """
    classes = torch.unique(labeled_labels)
    return classes, torch.stack([sim[labeled_labels == c].mean(dim=0) for c in classes])


def find_neighbors(labeled_feats: torch.Tensor, labeled_labels: torch.Tensor,
                   pool_feats: torch.Tensor, k: int) -> torch.Tensor:
    """(L, k) positions in the pool of each labeled image's nearest same-class candidates.

    Candidates for a labeled image of class c are the pool images whose mean similarity to
    the labeled images of c beats every other class's; rows with fewer than k candidates
    are padded with -1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sim = labeled_feats @ pool_feats.T  # (L, P)
    classes, prototype_sim = class_similarity(sim, labeled_labels)
    pool_class = classes[prototype_sim.argmax(dim=0)]  # (P,)
    candidate = pool_class[None, :] == labeled_labels[:, None]
    sim = sim.masked_fill(~candidate, -torch.inf)
    k_eff = min(k, sim.shape[1])
    top = sim.topk(k_eff, dim=1)
    out = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1))
    if k_eff < k:
        out = torch.cat([out, out.new_full((out.shape[0], k - k_eff), -1)], dim=1)
    return out


def tuning_pairs(rows: torch.Tensor, neighbors: torch.Tensor | None, labeled_idx: torch.Tensor,
                 self_share: float) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """(training indices of the targets, token row of each target, sampling weights).

    ``rows`` are the labeled rows (token rows) an adapter is tuned on; ``neighbors`` (L, k)
    holds training indices of each labeled row's neighbours (-1 = none), or None. Each
    labeled image is drawn with total probability ``self_share`` / len(rows), its
    neighbours share the rest equally; weights are None when there are no neighbours.
    """
    targets = [labeled_idx[rows]]
    token_rows = [rows]
    if neighbors is not None:
        nb = neighbors[rows]  # (R, k)
        keep = nb >= 0
        targets.append(nb[keep])
        token_rows.append(rows[:, None].expand_as(nb)[keep])
    targets_t = torch.cat(targets)
    token_rows_t = torch.cat(token_rows)
    n_self, n_nb = len(rows), len(targets_t) - len(rows)
    if n_nb == 0:
        return targets_t.numpy(), token_rows_t, None
    weights = torch.cat([torch.full((n_self,), self_share / n_self),
                         torch.full((n_nb,), (1.0 - self_share) / n_nb)])
    return targets_t.numpy(), token_rows_t, weights
