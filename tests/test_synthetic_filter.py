"""The prototype filter on synthetic rows: margins, the keep rule, its config keys, and the
shards stage that applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flow_fixtures import rerecord_unit

from pipeline import stages
from pipeline.config import config_hash, with_overrides
from pipeline.generate.synthetic_filter import (
    copy_thresholds,
    keep_mask,
    not_copies,
    prototype_margin,
)
from pipeline.runs import StageError, init_run_dir
from pipeline.stages.inputs import dataset_for, split_for
from pipeline.stages.keys import stage_keys


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_margin_is_own_class_mean_similarity_minus_the_best_other_class():
    # Classes 0, 1, 2 lie along x, y and z; two labeled images each.
    labeled = _unit([[1, 0.2, 0], [1, -0.2, 0], [0, 1, 0.2], [0, 1, -0.2], [0.2, 0, 1],
                     [-0.2, 0, 1]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = _unit([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0]])
    margin = prototype_margin(labeled, labels, queries, torch.tensor([0, 1, 1]))
    sim = labeled @ queries.T
    means = torch.stack([sim[labels == c].mean(0) for c in range(3)])
    expected = torch.tensor([means[0, 0] - means[1:, 0].max(),
                             means[1, 1] - torch.stack([means[0, 1], means[2, 1]]).max(),
                             means[1, 2] - torch.stack([means[0, 2], means[2, 2]]).max()])
    assert torch.allclose(margin, expected)
    assert margin[0] > 0 and margin[1] < 0 and margin[2] > 0  # 0.8 y beats 0.6 x
    assert keep_mask(margin, 0.0).tolist() == [True, False, True]
    # A stricter margin drops the borderline row too.
    assert keep_mask(margin, float(margin[2]) + 1e-4).tolist() == [True, False, False]


def test_margin_refuses_labels_without_labeled_images():
    labeled = _unit([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"labels \[5\] have no labeled images"):
        prototype_margin(labeled, torch.tensor([0, 1]), _unit([[1, 0]]), torch.tensor([5]))


def test_copies_are_closer_to_a_labeled_image_than_most_real_images_of_its_class():
    # Labeled: class 0 is black, class 1 is grey 200.
    labeled = np.zeros((2, 4, 4, 1), np.uint8)
    labeled[1] = 200
    labels = np.array([0, 1])
    # Real unlabeled images: 10 near class 0 at 10..100 /255, 10 near class 1 at 2..20 /255.
    near0 = [np.full((4, 4, 1), v, np.uint8) for v in range(10, 101, 10)]
    near1 = [np.full((4, 4, 1), 200 + v, np.uint8) for v in range(2, 21, 2)]
    t = copy_thresholds(np.stack(near0 + near1), labeled, labels, 0.1)
    assert t[0] == pytest.approx(np.quantile(np.arange(10, 101, 10) / 255, 0.1))
    assert t[1] == pytest.approx(np.quantile(np.arange(2, 21, 2) / 255, 0.1))
    samples = np.stack([np.full((4, 4, 1), v, np.uint8) for v in (0, 8, 30, 199, 190)])
    # 0 and 199 copy a labeled image; 8/255 is a copy for class 0 (real ones start at 10)
    # though it would not be one for class 1; 30 and 190 are as far as real images are.
    assert not_copies(samples, labeled, labels, t).tolist() == [False, False, True, False, True]
    # A class with too few real images near it takes the quantile over all of them.
    t_small = copy_thresholds(np.stack(near0 + near1[:3]), labeled, labels, 0.1)
    assert t_small[1] == pytest.approx(np.quantile(
        np.r_[np.arange(10, 101, 10), np.arange(2, 7, 2)] / 255, 0.1))
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        copy_thresholds(near0[0][None], labeled, labels, 0.0)
    with pytest.raises(ValueError, match="needs a non-empty pool"):
        not_copies(samples, labeled[:0], labels[:0], t)


def test_filter_keys_only_the_shards_stage_and_keeps_hashes_when_off(flow_cfg):
    plain = stage_keys(flow_cfg)
    off = with_overrides(flow_cfg, {"filter.margin": 0.3})  # method none: the option is off
    assert stage_keys(off) == plain and config_hash(off) == config_hash(flow_cfg)
    on = with_overrides(flow_cfg, {"filter.method": "prototype"})
    keys = stage_keys(on)
    assert config_hash(on) != config_hash(flow_cfg)
    assert all(keys[s] == plain[s] for s in ("split", "encode", "tune", "sample"))
    assert keys["shards"] != plain["shards"]
    stricter = with_overrides(on, {"filter.margin": 0.05})
    assert stage_keys(stricter)["shards"] != keys["shards"]
    copies = with_overrides(flow_cfg, {"filter.copy_quantile": 0.05})  # on without a method
    assert stage_keys(copies)["shards"] != plain["shards"]
    with pytest.raises(ValueError, match="filter.method"):
        with_overrides(flow_cfg, {"filter.method": "clip"})


def _plant(run_dir, labeled, lab):
    """Class 0's first sample part becomes three known rows: its two labeled images (right
    class, exact copies) and class 1's first labeled image (wrong class, an exact copy)."""
    part = run_dir / "samples/class-00/part-00-00000.npz"
    with np.load(part) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["images"] = np.stack([labeled[lab == 0][0], labeled[lab == 0][1], labeled[lab == 1][0]])
    with open(part, "wb") as f:
        np.savez(f, **arrays)
    rerecord_unit(part.parent)


def _rmse_to_nearest(images, pool):
    """(pixel RMSE in [0, 1] units, index) of each image's nearest pool image, in float64."""
    a = images.reshape(len(images), -1).astype(np.float64) / 255
    b = pool.reshape(len(pool), -1).astype(np.float64) / 255
    d = np.sqrt(((a[:, None] - b[None]) ** 2).mean(-1))
    return d.min(1), d.argmin(1)


def test_shards_stage_writes_only_the_rows_the_filter_keeps(flow_cfg):
    from anl_core.encoders import load_encoder
    from pipeline.data.images import to_model_space
    from pipeline.data.shards import read_shards
    from pipeline.generate.neighbors import neighbor_pool

    on = with_overrides(flow_cfg, {"filter.method": "prototype", "sampling.per_condition": 3})
    run_dir = init_run_dir(on)
    stages.run_all(run_dir, on, until="sample")
    split, ds = split_for(run_dir), dataset_for(on)
    labeled, lab = ds.train_images[split.labeled_idx], split.labeled_labels
    _plant(run_dir, labeled, lab)
    records = stages.run_all(run_dir, on, until="shards")
    metrics = records["shards"]["metrics"]
    parts = [np.load(p) for p in sorted(run_dir.glob("samples/class-*/part-*.npz"))]
    images = np.concatenate([p["images"] for p in parts])
    labels = np.concatenate([p["labels"] for p in parts])
    cond = np.concatenate([p["condition_id"] for p in parts])
    assert len(labels) == metrics["rows_sampled"] == 12  # 2 classes x 2 labeled x 3

    # The prototype margin by hand: mean-token cosine similarity, own class minus other.
    encoder = load_encoder(on.encoder, device="cpu")

    def unit_mean(x):
        m = encoder.encode(to_model_space(x)).double().mean(1).numpy()
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    sim = unit_mean(labeled) @ unit_mean(images).T  # (labeled, samples)
    class_mean = np.stack([sim[lab == c].mean(0) for c in (0, 1)])
    margin = class_mean[labels, np.arange(12)] - class_mean[1 - labels, np.arange(12)]
    assert (np.abs(margin - on.filter.margin) > 1e-4).all(), margin  # no ties to break
    proto = margin > on.filter.margin
    assert proto[:3].tolist() == [True, True, False]  # the planted wrong-class row goes
    shards = read_shards(run_dir / "shards")
    assert np.array_equal(shards.images, images[proto])
    assert np.array_equal(shards.labels, labels[proto])
    assert np.array_equal(shards.frame["condition_id"].to_numpy(), cond[proto])
    assert metrics["filter"] == "prototype" and metrics["rows"] == int(proto.sum())
    assert metrics["rows_per_class"] == {str(c): int(proto[labels == c].sum()) for c in (0, 1)
                                         if proto[labels == c].any()}
    assert metrics["kept_share"] == round(proto.sum() / 12, 4)

    # The copy test by hand: thresholds are per class (of the nearest labeled image) medians
    # of the RMSE of 6 real unlabeled images, the whole pool's when a class has under 2.
    both = with_overrides(on, {"filter.copy_quantile": 0.5, "filter.copy_pool": 6})
    both_dir = init_run_dir(both)
    stages.run_all(both_dir, both, until="sample")
    _plant(both_dir, labeled, lab)
    metrics = stages.run_all(both_dir, both, until="shards")["shards"]["metrics"]
    pool = ds.train_images[neighbor_pool(split.unlabeled_idx, 6, both.filter.seed)]
    d_pool, i_pool = _rmse_to_nearest(pool, labeled)
    group = lab[i_pool]
    limit = np.array([np.quantile(d_pool[group == c] if (group == c).sum() >= 2 else d_pool, 0.5)
                      for c in (0, 1)])
    assert metrics["copy_rmse_thresholds"] == pytest.approx(limit, abs=1e-5)
    assert (limit > 0).all()
    d, i = _rmse_to_nearest(images, labeled)
    assert (np.abs(d - limit[lab[i]]) > 1e-5).all()  # no ties to break
    kept = proto & (d >= limit[lab[i]])
    assert not kept[:3].any()  # the planted copies go, the right-class ones too
    assert metrics["filter"] == "prototype+copies" and metrics["rows"] == int(kept.sum())
    shards = read_shards(both_dir / "shards")
    assert np.array_equal(shards.images, images[kept])
    assert np.array_equal(shards.labels, labels[kept])

    # A margin nothing can clear: a clear error, not an empty shard set.
    none_pass = with_overrides(on, {"filter.margin": 2.0})
    with pytest.raises(StageError, match="dropped all 12 samples; lower filter.margin"):
        stages.run_all(init_run_dir(none_pass), none_pass, until="shards")
