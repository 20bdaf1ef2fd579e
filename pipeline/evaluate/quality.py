"""Quality and diversity of a run's synthetic images, per class and per mask ratio.

Four questions, each answered against real images of the same class:

* fidelity: KID (kernel inception distance: unbiased MMD^2 with a cubic polynomial kernel)
  between synthetic and real features in a pretrained encoder's feature space (the run's
  condition encoder by default, so no network and no Inception weights are needed);
* diversity: mean pairwise cosine distance of features, synthetic vs real, overall and
  within the samples of one condition image (what the mask ratio is meant to raise);
* label consistency: the share of synthetic images that a reference classifier trained on
  real labels (:mod:`pipeline.evaluate.reference`) assigns to the label they inherited;
* memorisation: pixel RMSE from each synthetic image to its nearest labeled image of the
  class, beside the same distance for held-out real images of that class.

The pure functions (``kid``, ``mean_pairwise_distance``, ...) work on arrays;
``evaluate_run_quality`` reads a run directory (shards, split) and writes
``quality/quality.json`` plus sample grids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anl_core.progress import progress_bar
from pipeline.atomic import atomic_write_bytes, atomic_write_json, finite
from pipeline.data.datasets import ImageDataset
from pipeline.data.grids import class_grid_png, grid_picks
from pipeline.data.images import nearest_rmse, to_model_space
from pipeline.data.pool_labels import NO_POOL_LABELS, NOT_COMPUTED, pool_has_labels
from pipeline.data.shard_format import MANIFEST, manifest_path
from pipeline.evaluate.quality_config import QualityConfig

QUALITY_DIR = "quality"
QUALITY_FILE = "quality.json"
FORMAT = "anl-augment-quality"
VERSION = 1
KID_NOTE = ("KID is unbiased in the number of images, but its variance is large for the small "
            "per-class sets used here (std over random subsets is given); compare values only "
            "between runs that used the same encoder and similar sample sizes.")

REAL_IMAGES_NOTE = ("classes without a held-out labeled image (no labeled pool image, no "
                    "validation image) are measured against their labeled images: their KID "
                    "is against the conditions themselves, and the near-copy figures are not "
                    "computed")

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> float (N, D)


class QualityError(RuntimeError):
    """Quality cannot be measured for this run; the message says which input is missing."""


# --------------------------------------------------------------------------- metrics on arrays


def kid(x: np.ndarray, y: np.ndarray, n_subsets: int = 20, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID between feature sets (N, D) and (M, D): mean and std over random subsets.

    Kernel k(a, b) = (a.b / D + 1)^3, the estimator is the unbiased MMD^2 (diagonal terms
    left out), so its expectation does not depend on the subset size; it can be negative.
    When both sets fit in one subset there is nothing to resample and the std is 0.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"kid needs two (N, D) arrays of equal D, got {x.shape} and {y.shape}")
    m = min(len(x), len(y), subset_size)
    if m < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    single = len(x) == m and len(y) == m
    values = []
    for _ in range(1 if single else n_subsets):
        a = x if len(x) == m else x[rng.choice(len(x), m, replace=False)]
        b = y if len(y) == m else y[rng.choice(len(y), m, replace=False)]
        d = a.shape[1]
        kxx = (a @ a.T / d + 1) ** 3
        kyy = (b @ b.T / d + 1) ** 3
        kxy = (a @ b.T / d + 1) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def _unit_rows(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def mean_pairwise_distance(f: np.ndarray, max_items: int = 1000, seed: int = 0) -> float:
    """Mean cosine distance (1 - cos) over all distinct pairs; NaN for fewer than 2 rows."""
    if len(f) < 2:
        return float("nan")
    if len(f) > max_items:
        f = f[np.random.default_rng(seed).choice(len(f), max_items, replace=False)]
    u = _unit_rows(f)
    n = len(u)
    sim = u @ u.T
    return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


def within_group_diversity(f: np.ndarray, groups: np.ndarray) -> float:
    """Mean pairwise distance among rows sharing a group (a condition image), averaged over
    groups with at least two rows; NaN when there are none."""
    groups = np.asarray(groups)
    values = [mean_pairwise_distance(f[groups == g]) for g in np.unique(groups)
              if (groups == g).sum() >= 2]
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------- feature spaces


def encoder_features(encoder, batch_size: int = 256) -> FeatureFn:
    """Pooled condition-encoder tokens: anything with ``encode(x in [-1, 1] NCHW) -> (B, N, D)``."""

    def fn(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = to_model_space(images[i:i + batch_size])
            tokens = encoder.encode(x)
            out.append((tokens.mean(dim=1) if tokens.ndim == 3 else tokens).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)

    return fn


def resolve_features(encoder, device: str | None, reference) -> tuple[str, FeatureFn]:
    """(feature space name, function) from an encoder name, encoder object, callable or None.

    None falls back to the reference classifier's penultimate features.
    """
    if encoder is None:
        return reference.reference_id, reference.features
    if isinstance(encoder, str):
        from anl_core.encoders import load_encoder

        encoder = load_encoder(encoder, device=device)
    if hasattr(encoder, "encode"):
        return str(getattr(encoder, "encoder_id", type(encoder).__name__)), \
            encoder_features(encoder)
    if callable(encoder):
        return getattr(encoder, "__name__", "custom"), encoder
    raise QualityError(f"encoder must be a name, an object with .encode, a callable or None; "
                       f"got {type(encoder).__name__}")


# --------------------------------------------------------------------------- grids


# --------------------------------------------------------------------------- run directory


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _set_metrics(feats: np.ndarray, real_feats: np.ndarray, conds: np.ndarray,
                 pred: np.ndarray | None, label: int, config: QualityConfig) -> dict:
    """``pred`` None: label consistency is not computed (no judge worth the name)."""
    k, k_std = kid(feats, real_feats, config.kid_subsets, config.kid_subset_size, config.seed)
    return {"n": len(feats), "kid": k, "kid_std": k_std,
            "diversity_synthetic": mean_pairwise_distance(feats, seed=config.seed),
            "within_condition_diversity": within_group_diversity(feats, conds),
            "label_consistency": None if pred is None else
            float((pred == label).mean()) if len(pred) else float("nan")}


def _real_of_class(dataset: ImageDataset, c: int, labeled: np.ndarray, lab_idx: np.ndarray,
                   ) -> tuple[np.ndarray, str]:
    """(indices, source) of the real images class c's samples are measured against: the
    training images labeled c outside the labeled set (the pool's, where it has labels, and
    the validation images); the labeled images of c when there are none, as with a pool that
    has no labels and no validation split. Unlabeled images never count: their class is
    unknown."""
    held = np.flatnonzero((dataset.train_labels == c) & ~np.isin(
        np.arange(len(dataset.train_labels)), labeled))
    return (held, "held-out") if len(held) else (np.sort(lab_idx), "labeled")


def evaluate_run_quality(run_dir: str | Path, dataset: ImageDataset,
                         config: QualityConfig | None = None, *, encoder=None, reference=None,
                         cache_dir: str | Path | None = None, device: str | None = None,
                         progress: bool = True) -> Path:
    """Measure ``run_dir/shards`` against the dataset's real images; write quality/quality.json.

    ``encoder``: condition-encoder name (e.g. the run's ``"efficientnet-lite0"``), an encoder
    object, a features callable, or None for the reference classifier's features.
    ``reference``: a trained :class:`pipeline.evaluate.reference.ReferenceClassifier`; by default the
    one cached under ``cache_dir`` (default ``<runs_dir>/_cache/reference``), trained if absent.
    Returns the path of quality.json (written last, atomically).
    """
    from pipeline.data.shards import read_shards
    from pipeline.data.splits import load_split
    from pipeline.evaluate.reference import ReferenceConfig, load_or_train_reference

    run_dir = Path(run_dir)
    config = config or QualityConfig()
    shard_dir = run_dir / "shards"
    if not manifest_path(shard_dir).exists():
        raise QualityError(f"{shard_dir} has no {MANIFEST}; run the shards stage first")
    split = load_split(run_dir / "split.parquet")
    if len(split.labels) != len(dataset.train_labels):
        raise QualityError(f"{run_dir / 'split.parquet'} indexes {len(split.labels)} training "
                           f"images but {dataset.name} has {len(dataset.train_labels)}; "
                           "pass the dataset this run was made from")
    if reference is None:
        cache_dir = Path(cache_dir) if cache_dir else run_dir.parent / "_cache" / "reference"
        settings = ReferenceConfig(**config.reference.model_dump())
        reference = load_or_train_reference(dataset, cache_dir, settings, device, progress,
                                            exclude=split.val_idx)
    space, features = resolve_features(encoder, device, reference)
    # Label consistency needs a judge trained on more than the few labeled images: with a
    # pool that has no labels, the reference learned from those alone, so it is not computed.
    consistency_reason = None if pool_has_labels(split.labels, split.unlabeled_idx) else (
        f"{NO_POOL_LABELS}; the reference classifier could train on the "
        f"{reference.info.get('train_images')} labeled images only")

    shards = read_shards(shard_dir, verify=True)
    frame = shards.frame.reset_index(drop=True)
    # Shards may also hold real rows; only synthetic rows are judged.
    synth_mask = (frame["source"] == "synthetic").to_numpy(bool, na_value=False)
    mask_col = frame["mask_ratio"].to_numpy(np.float64, na_value=np.nan)
    ratios = sorted({float(r) for r in mask_col[synth_mask] if np.isfinite(r)})
    out_dir = run_dir / QUALITY_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    per_class, all_pred, all_labels, by_ratio_rows = [], [], [], {r: [] for r in ratios}

    for c in progress_bar(range(dataset.num_classes), desc="quality", enabled=progress,
                          leave=False, unit="class", logger=__name__):
        name = dataset.class_names[c]
        entry: dict[str, Any] = {"class": c, "name": name}
        lab_idx = split.labeled_idx[split.labeled_labels == c]
        real_idx, real_source = _real_of_class(dataset, c, split.labeled_idx, lab_idx)
        if len(real_idx) > config.max_real_per_class:
            real_idx = np.sort(rng.choice(real_idx, config.max_real_per_class, replace=False))
        rows = np.flatnonzero(synth_mask & (shards.labels == c))
        if len(rows) > config.max_synthetic_per_class:
            rows = np.sort(rng.choice(rows, config.max_synthetic_per_class, replace=False))
        entry.update(n_synthetic=len(rows), n_real=len(real_idx), real_source=real_source,
                     n_labeled=len(lab_idx),
                     reference_accuracy=reference.per_class_test_accuracy[c])
        real_feats = features(dataset.train_images[real_idx])
        entry["diversity_real"] = mean_pairwise_distance(real_feats, seed=config.seed)
        # Held-out images only: a labeled image is its own nearest labeled image.
        real_nn = nearest_rmse(dataset.train_images[real_idx], dataset.train_images[lab_idx]) \
            if len(lab_idx) and len(real_idx) and real_source == "held-out" else np.zeros(0)
        entry["nn_rmse_real"] = float(real_nn.mean()) if len(real_nn) else float("nan")
        synth_grid: dict[float, np.ndarray] = {}
        if len(rows):
            images = shards.images[rows]
            feats = features(images)
            pred = reference.predict(images) if consistency_reason is None else None
            conds = frame["condition_id"].to_numpy(np.int64, na_value=-1)[rows] \
                if "condition_id" in frame else np.zeros(len(rows), np.int64)
            entry.update(_set_metrics(feats, real_feats, conds, pred, c, config))
            entry["n_synthetic"] = entry.pop("n")
            wrong = pred[pred != c] if pred is not None else np.zeros(0, np.int64)
            if len(wrong):
                top = int(np.bincount(wrong, minlength=dataset.num_classes).argmax())
                entry["top_confusion"] = {"class": top, "name": dataset.class_names[top],
                                          "share": float((pred == top).mean())}
            synth_nn = nearest_rmse(images, dataset.train_images[lab_idx]) if len(lab_idx) \
                else np.zeros(0)
            entry["nn_rmse_synthetic"] = float(synth_nn.mean()) if len(synth_nn) else float("nan")
            entry["closer_than_real_share"] = float((synth_nn < real_nn.min()).mean()) \
                if len(synth_nn) and len(real_nn) else float("nan")
            entry["by_mask_ratio"] = []
            for r in ratios:
                sel = mask_col[rows] == r
                if not sel.any():
                    continue
                m = _set_metrics(feats[sel], real_feats, conds[sel],
                                 None if pred is None else pred[sel], c, config)
                entry["by_mask_ratio"].append({"mask_ratio": r, **m})
                by_ratio_rows[r].append(m)
                synth_grid[r] = shards.images[grid_picks(frame, rows[sel], config.grid_per_class)]
            if pred is not None:
                all_pred.append(pred)
                all_labels.append(np.full(len(pred), c))
        grid_name = f"samples-class-{c:02d}.png"
        atomic_write_bytes(out_dir / grid_name, class_grid_png(
            dataset.train_images[np.sort(lab_idx)[:config.grid_per_class]], synth_grid,
            f"{c}: {name}", cols=config.grid_per_class))
        entry["grid"] = f"{QUALITY_DIR}/{grid_name}"
        per_class.append(entry)

    pred = np.concatenate(all_pred) if all_pred else np.zeros(0, np.int64)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
    overall = {
        "n_synthetic": int(sum(e["n_synthetic"] for e in per_class)),
        "kid": _nanmean(e.get("kid") for e in per_class),
        "label_consistency": None if consistency_reason else
        float((pred == labels).mean()) if len(pred) else float("nan"),
        **({"label_consistency" + NOT_COMPUTED: consistency_reason}
           if consistency_reason else {}),
        "diversity_synthetic": _nanmean(e.get("diversity_synthetic") for e in per_class),
        "diversity_real": _nanmean(e.get("diversity_real") for e in per_class),
        "within_condition_diversity": _nanmean(e.get("within_condition_diversity")
                                               for e in per_class),
        "nn_rmse_synthetic": _nanmean(e.get("nn_rmse_synthetic") for e in per_class),
        "nn_rmse_real": _nanmean(e.get("nn_rmse_real") for e in per_class),
        "closer_than_real_share": _nanmean(e.get("closer_than_real_share") for e in per_class),
        "reference_test_accuracy": reference.test_accuracy,
    }
    summary = {
        "format": FORMAT, "version": VERSION, "feature_space": space,
        "reference": {"reference_id": reference.reference_id,
                      "test_accuracy": reference.test_accuracy,
                      "train_images": reference.info.get("train_images"),
                      "unlabeled_left_out": reference.info.get("unlabeled_left_out", 0),
                      "path": str(reference.path) if reference.path else None},
        "config": config.to_dict(), "mask_ratios": ratios,
        # Which real images each class was measured against (per class: real_source).
        "real_images": REAL_IMAGES_NOTE if any(e["real_source"] == "labeled"
                                               for e in per_class) else None,
        "notes": {"kid": KID_NOTE,
                  "diversity": "mean pairwise cosine distance of features (1 - cos)",
                  "label_consistency": "share of synthetic images the reference classifier "
                                       "assigns to their inherited label; read it against "
                                       "reference_accuracy, its accuracy on real test images",
                  "nn_rmse": "pixel RMSE in [0, 1] to the nearest labeled image of the class; "
                             "synthetic well below real suggests copies of the conditions"},
        "overall": overall,
        "by_mask_ratio": [{"mask_ratio": r, "n": int(sum(m["n"] for m in ms)),
                           **{k: _nanmean(m[k] for m in ms) for k in
                              ("kid", "diversity_synthetic", "within_condition_diversity")},
                           "label_consistency": (sum(m["label_consistency"] * m["n"] for m in ms)
                                                 / max(1, sum(m["n"] for m in ms)))
                           if consistency_reason is None else None}
                          for r, ms in by_ratio_rows.items() if ms],
        "per_class": per_class,
    }
    path = out_dir / QUALITY_FILE
    atomic_write_json(path, finite(summary))
    return path
