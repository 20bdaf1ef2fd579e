"""Synthetic-data quality: the metrics on arrays, and a run directory's quality.json."""

import json
import shutil

import numpy as np
import pytest
from report_fixtures import MASK_RATIOS

from pipeline.data.images import nearest_rmse
from pipeline.evaluate.quality import (
    QUALITY_DIR,
    QUALITY_FILE,
    QualityConfig,
    QualityError,
    evaluate_run_quality,
    kid,
    mean_pairwise_distance,
    within_group_diversity,
)
from pipeline.runs import read_json

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.


def load_quality(run_dir):
    return read_json(run_dir / QUALITY_DIR / QUALITY_FILE)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    same, same_std = kid(a, b, n_subsets=10, subset_size=100)
    shifted, _ = kid(a, b + 1.0, n_subsets=10, subset_size=100)
    assert abs(same) < 0.05 and same_std >= 0
    assert shifted > 10 * max(abs(same), 1e-3)
    # Unbiased: the expectation does not move with the subset size.
    small = np.mean([kid(rng.normal(size=(20, 16)), rng.normal(size=(20, 16)), seed=s)[0]
                     for s in range(30)])
    assert abs(small) < 0.1
    assert np.isnan(kid(a[:1], b[:1])[0])
    with pytest.raises(ValueError, match="equal D"):
        kid(a, b[:, :3])


def test_diversity_measures():
    e = np.eye(4)
    assert mean_pairwise_distance(np.repeat(e[:1], 5, 0)) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_distance(e) == pytest.approx(1.0)  # orthogonal rows
    assert np.isnan(mean_pairwise_distance(e[:1]))
    f = np.concatenate([np.repeat(e[:1], 3, 0), e[1:3]])
    groups = np.array([0, 0, 0, 1, 1])
    assert within_group_diversity(f, groups) == pytest.approx(0.5)  # groups score 0 and 1


def test_nearest_rmse_finds_copies():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    d = nearest_rmse(pool[[3, 1]], pool)
    np.testing.assert_allclose(d, 0.0, atol=1e-6)
    brighter = np.clip(pool[:1].astype(int) + 51, 0, 255).astype(np.uint8)
    assert 0 < nearest_rmse(brighter, pool)[0] <= 0.2 + 1e-6


def test_run_quality_answers_known_questions(report_run):
    q = load_quality(report_run)
    assert q is not None and q["format"] == "anl-augment-quality"
    assert len(q["per_class"]) == 10 and q["mask_ratios"] == list(MASK_RATIOS)
    by = {m["mask_ratio"]: m for m in q["by_mask_ratio"]}
    # 0.2: noised copies of the condition (no diversity); 0.6: other real images of the class.
    assert by[0.2]["within_condition_diversity"] < 0.2 * by[0.6]["within_condition_diversity"]
    o = q["overall"]
    # Half the images are copies of labeled images: closer to them than any real image is.
    assert 0.4 <= o["closer_than_real_share"] <= 0.75
    assert o["nn_rmse_synthetic"] < o["nn_rmse_real"]
    # The stand-ins are real, correctly labeled images: the judge agrees about as often as
    # it does on the real test set.
    assert o["label_consistency"] >= o["reference_test_accuracy"] - 0.15
    for c in q["per_class"]:
        assert (report_run / c["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert c["n_synthetic"] == 16
    json.dumps(q, allow_nan=False)  # strict JSON


def test_label_consistency_catches_wrong_labels(report_run_copy, report_dataset,
                                                report_reference):
    from pipeline.data.shards import ShardWriter, read_shards

    run = report_run_copy
    arr = read_shards(run / "shards")
    shutil.rmtree(run / "shards")
    wrong = (arr.labels + 1) % 10  # every image labelled as the next class
    with ShardWriter(run / "shards", report_dataset.class_names) as w:
        w.write(arr.images, wrong, condition_id=arr.frame["condition_id"].to_numpy(np.int64),
                mask_ratio=arr.frame["mask_ratio"].to_numpy(np.float64))
    evaluate_run_quality(run, report_dataset, QualityConfig(max_real_per_class=60),
                         reference=report_reference, progress=False)
    q = load_quality(run)
    assert q["overall"]["label_consistency"] < 0.3
    confused = [c for c in q["per_class"] if c.get("top_confusion")]
    # Images labelled c+1 are really class c: that is what the judge says most often.
    hits = sum(c["top_confusion"]["class"] == (c["class"] - 1) % 10 for c in confused)
    assert hits >= 7


def test_condition_encoder_features(report_dataset):
    import torch

    from anl_core.encoders import load_encoder
    from pipeline.evaluate.quality import encoder_features

    enc = load_encoder("efficientnet-lite0@128", device="cpu")
    fn = encoder_features(enc)
    x = report_dataset.test_images[:3]
    with torch.no_grad():
        f1, f2 = fn(x), fn(x[::-1].copy())
    assert f1.shape == (3, 1280)  # pooled tokens
    np.testing.assert_allclose(f1[::-1], f2, rtol=1e-4, atol=1e-4)
    assert mean_pairwise_distance(f1) > 0


def test_quality_without_shards_names_the_stage(tmp_path, report_dataset, report_reference):
    with pytest.raises(QualityError, match="shards stage"):
        evaluate_run_quality(tmp_path, report_dataset, reference=report_reference)
    assert load_quality(tmp_path) is None
