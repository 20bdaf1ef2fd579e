"""The prototype filter on synthetic rows: margins, the keep rule, its config keys, and the
shards stage that applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_stages import flow_cfg, flow_image_folder, flow_tiny_base  # noqa: F401

from pipeline import stages
from pipeline.config import config_hash, with_overrides
from pipeline.runs import init_run_dir
from pipeline.synthetic_filter import copy_thresholds, keep_mask, not_copies, prototype_margin


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


def test_filter_keys_only_the_shards_stage_and_keeps_hashes_when_off(flow_cfg):  # noqa: F811
    plain = stages.stage_keys(flow_cfg)
    off = with_overrides(flow_cfg, {"filter.margin": 0.3})  # method none: the option is off
    assert stages.stage_keys(off) == plain and config_hash(off) == config_hash(flow_cfg)
    on = with_overrides(flow_cfg, {"filter.method": "prototype"})
    keys = stages.stage_keys(on)
    assert config_hash(on) != config_hash(flow_cfg)
    assert all(keys[s] == plain[s] for s in ("split", "encode", "tune", "sample"))
    assert keys["shards"] != plain["shards"]
    stricter = with_overrides(on, {"filter.margin": 0.05})
    assert stages.stage_keys(stricter)["shards"] != keys["shards"]
    copies = with_overrides(flow_cfg, {"filter.copy_quantile": 0.05})  # on without a method
    assert stages.stage_keys(copies)["shards"] != plain["shards"]
    with pytest.raises(ValueError, match="filter.method"):
        with_overrides(flow_cfg, {"filter.method": "clip"})


def test_shards_stage_writes_only_the_rows_the_filter_keeps(flow_cfg):  # noqa: F811
    from pipeline.quality import nearest_pool_image
    from pipeline.shards import read_shards

    on = with_overrides(flow_cfg, {"filter.method": "prototype", "sampling.per_condition": 3})
    run_dir = init_run_dir(on)
    records = stages.run_all(run_dir, on, until="shards")
    metrics = records["shards"]["metrics"]
    assert metrics["filter"] == "prototype" and metrics["rows_sampled"] == 12
    # The shards hold exactly the sampled rows the filter keeps, in order.
    keep, info = stages.synthetic_filter(run_dir, on, "cpu")
    assert info == {"filter": "prototype"}
    kept_images, kept_labels = [], []
    for _, path in stages.sample_parts(run_dir, on):
        part = np.load(path)
        mask = keep(part["images"], part["labels"])
        kept_images.append(part["images"][mask])
        kept_labels.append(part["labels"][mask])
    kept_labels = np.concatenate(kept_labels)
    shards = read_shards(run_dir / "shards")
    assert np.array_equal(shards.images, np.concatenate(kept_images))
    assert np.array_equal(shards.labels, kept_labels)
    assert metrics["rows"] == len(kept_labels) > 0
    assert metrics["rows_per_class"] == {str(c): int((kept_labels == c).sum())
                                         for c in (0, 1) if (kept_labels == c).any()}
    assert metrics["kept_share"] == round(len(kept_labels) / 12, 4)

    # The copy test drops what is closer to a labeled image than the threshold.
    both = with_overrides(on, {"filter.copy_quantile": 0.5, "filter.copy_pool": 6})
    records = stages.run_all(init_run_dir(both), both, until="shards")
    metrics = records["shards"]["metrics"]
    assert metrics["filter"] == "prototype+copies" and len(metrics["copy_rmse_thresholds"]) == 2
    split = stages.split_for(run_dir)
    ds = stages.dataset_for(on)
    near, idx = nearest_pool_image(read_shards(init_run_dir(both) / "shards").images,
                                   ds.train_images[split.labeled_idx])
    assert len(near) == metrics["rows"] <= len(kept_labels)
    limit = np.asarray(metrics["copy_rmse_thresholds"])[split.labeled_labels[idx]]
    assert (near >= limit - 1e-5).all()

    # A margin nothing can clear: a clear error, not an empty shard set.
    none_pass = with_overrides(on, {"filter.margin": 2.0})
    with pytest.raises(stages.StageError, match="dropped all 12 samples; lower filter.margin"):
        stages.run_all(init_run_dir(none_pass), none_pass, until="shards")
