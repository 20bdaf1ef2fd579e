"""Drop synthetic images that do not look like their label's class, or that copy a labeled one.

Two tests, each optional (``filter:`` in the config), applied by the shards stage:

* prototype (``filter.method``): an adapter tuned on four images of a class still draws some
  images of other classes (a third at the demo's budget, bench/RESULTS.md F11), and those
  rows teach the classifier wrong labels. Each sample is scored by its margin: its mean
  similarity to the labeled images of its own label minus the best such mean over the other
  classes, in the condition encoder's pooled-token space (the same test that picks unlabeled
  neighbours, ``pipeline.generate.neighbors``). Samples with a margin at or below ``filter.margin``
  are dropped.
* copies (``filter.copy_quantile``): a sample closer in pixels to a labeled image than all
  but that share of the real unlabeled images near that image's class are is a near-copy
  of a condition: it adds nothing the labeled image does not, and it is dropped.

Only the labeled images' labels are read; the unlabeled images are used without theirs.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.images import nearest_pool_image, to_model_space
from pipeline.generate.neighbors import class_similarity, neighbor_pool, pooled_features


def prototype_margin(labeled_feats: torch.Tensor, labeled_labels: torch.Tensor,
                     feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) own-class minus best other-class mean cosine similarity of each query.

    ``labeled_feats`` (L, D) and ``feats`` (N, D) are unit vectors (``pooled_features``);
    ``labels`` are the queries' labels, each of which must have labeled images.
    """
    classes, class_sim = class_similarity(labeled_feats @ feats.T, labeled_labels)  # (C, N)
    missing = set(torch.unique(labels).tolist()) - set(classes.tolist())
    if missing:
        raise ValueError(f"labels {sorted(missing)} have no labeled images to compare with")
    own_row = torch.searchsorted(classes, labels)
    own = class_sim.gather(0, own_row[None]).squeeze(0)
    others = class_sim.scatter(0, own_row[None], -torch.inf).max(dim=0).values
    return own - others if len(classes) > 1 else own


def keep_mask(margin: torch.Tensor | np.ndarray, threshold: float) -> np.ndarray:
    """Rows to keep: margin strictly above the threshold (0 = the label's class wins)."""
    return np.asarray(margin) > threshold


def copy_thresholds(unlabeled: np.ndarray, labeled: np.ndarray, labeled_labels: np.ndarray,
                    quantile: float) -> np.ndarray:
    """(C,) pixel RMSE per class below which only ``quantile`` of the real unlabeled images lie.

    Each unlabeled image is grouped by the class of its nearest labeled image, and each
    group's threshold is that quantile of its distances: how close real images of a class
    come to the labeled ones differs a lot between classes (bags are far apart, trousers
    near), so one threshold for all would miss the copies of some classes. A class with
    fewer than 1/quantile images in its group takes the quantile over all of them.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    labeled_labels = np.asarray(labeled_labels)
    dist, idx = nearest_pool_image(unlabeled, labeled)
    group = labeled_labels[idx]
    overall = float(np.quantile(dist, quantile))
    out = np.full(int(labeled_labels.max()) + 1, overall)
    for c in np.unique(labeled_labels):
        d = dist[group == c]
        if len(d) >= 1 / quantile:
            out[c] = np.quantile(d, quantile)
    return out


def not_copies(images: np.ndarray, labeled: np.ndarray, labeled_labels: np.ndarray,
               thresholds: np.ndarray) -> np.ndarray:
    """Rows at least their nearest labeled image's class threshold away from it (pixel RMSE)."""
    dist, idx = nearest_pool_image(images, labeled)
    return dist >= np.asarray(thresholds)[np.asarray(labeled_labels)[idx]]


def build_filter(f, ds, split, encoder, labeled_tokens: torch.Tensor | None, device: str,
                 conditions: tuple[np.ndarray, np.ndarray] | None = None):
    """The filter a ``FilterSection`` describes, over one split: (keep, metrics).

    ``keep(images, labels) -> bool mask``. The prototype test compares each sample with the
    condition images' tokens (``labeled_tokens``) in the same ``encoder``; the copy test
    compares it with the condition images in pixels, against a seeded pool of unlabeled
    images. ``conditions`` = (training indices, labels) of the token rows: by default the
    split's labeled images in split order (round 2 adds its pseudo-labeled ones).
    """
    cond_idx, cond_labels = conditions if conditions is not None else \
        (split.labeled_idx, split.labeled_labels)
    tests, info = [], {"filter": "+".join(
        name for name, on in (("prototype", f.method == "prototype"),
                              ("copies", f.copy_quantile > 0)) if on) or "none"}
    if f.method == "prototype":
        labeled_feats = pooled_features(labeled_tokens)
        labeled_labels = torch.as_tensor(cond_labels, dtype=torch.int64)

        def prototype(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
            feats = pooled_features(encoder.encode(to_model_space(images, device=device)).cpu())
            margin = prototype_margin(labeled_feats, labeled_labels, feats,
                                      torch.as_tensor(labels, dtype=torch.int64))
            return keep_mask(margin, f.margin)

        tests.append(prototype)
    if f.copy_quantile > 0:
        labeled = ds.train_images[cond_idx]
        pool_idx = neighbor_pool(split.unlabeled_idx, f.copy_pool, f.seed)
        # Not the condition images themselves (round 2 conditions on pool images).
        pool = ds.train_images[pool_idx[~np.isin(pool_idx, cond_idx)]]
        thresholds = copy_thresholds(pool, labeled, cond_labels, f.copy_quantile)
        info["copy_rmse_thresholds"] = [round(float(t), 5) for t in thresholds]
        tests.append(lambda images, labels: not_copies(images, labeled, cond_labels, thresholds))

    def keep(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        mask = np.ones(len(labels), bool)
        for test in tests:
            mask &= test(images, labels)
        return mask

    return keep, info
