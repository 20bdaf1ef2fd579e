"""The reference classifier: learns real labels, caches by data+config, loads back exactly."""

import os

import numpy as np
import pytest
from report_fixtures import TINY_REFERENCE

from pipeline.evaluate.reference import (
    INFO_FILE,
    MODEL_FILE,
    ReferenceConfig,
    ReferenceError,
    cache_key,
    load_or_train_reference,
    load_reference,
)

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.


def test_reference_learns_real_labels(report_reference, report_dataset):
    ref = report_reference
    # 10 classes: chance is 10%; 2 epochs on 2000 images reach ~70%.
    assert ref.test_accuracy > 0.5
    assert len(ref.per_class_test_accuracy) == 10
    pred = ref.predict(report_dataset.test_images)
    assert np.isclose((pred == report_dataset.test_labels).mean(), ref.test_accuracy)
    feats = ref.features(report_dataset.test_images[:7])
    assert feats.shape == (7, ref.model.feature_dim) and np.isfinite(feats).all()


def test_reference_cache_is_reused_not_retrained(report_reference, report_dataset):
    directory = report_reference.path
    assert (directory / INFO_FILE).exists() and (directory / MODEL_FILE).exists()
    mtime = os.stat(directory / MODEL_FILE).st_mtime_ns
    again = load_or_train_reference(report_dataset, directory.parent,
                                    ReferenceConfig(**TINY_REFERENCE), device="cpu",
                                    progress=False)
    assert again.path == directory
    assert os.stat(directory / MODEL_FILE).st_mtime_ns == mtime  # loaded, not retrained
    x = report_dataset.test_images[:64]
    np.testing.assert_allclose(again.logits(x), report_reference.logits(x), rtol=1e-5,
                               atol=1e-5)
    assert again.test_accuracy == report_reference.test_accuracy


def test_cache_key_depends_on_data_and_config(report_dataset):
    from pipeline.data.datasets import ImageDataset

    cfg = ReferenceConfig(**TINY_REFERENCE)
    k = cache_key(report_dataset, cfg)
    assert k == cache_key(report_dataset, ReferenceConfig(**TINY_REFERENCE))
    assert k != cache_key(report_dataset, ReferenceConfig(**{**TINY_REFERENCE, "epochs": 3}))
    d = report_dataset
    other = ImageDataset(d.name, d.class_names, d.train_images[:-1], d.train_labels[:-1],
                         d.test_images, d.test_labels)
    assert k != cache_key(other, cfg)


def test_load_reference_names_the_fix(tmp_path):
    with pytest.raises(ReferenceError, match="load_or_train_reference"):
        load_reference(tmp_path)


def test_reference_leaves_out_the_validation_images(report_dataset, tmp_path):
    """A run's validation images are never trained on, not even by the evaluation reference."""
    from pipeline.evaluate.reference import train_reference

    cfg = ReferenceConfig(**{**TINY_REFERENCE, "epochs": 1})
    val = np.arange(0, len(report_dataset.train_labels), 4)
    assert cache_key(report_dataset, cfg, val) != cache_key(report_dataset, cfg)
    assert cache_key(report_dataset, cfg, val[:0]) == cache_key(report_dataset, cfg)
    ref = train_reference(report_dataset, cfg, "cpu", progress=False, exclude=val)
    assert ref.info["train_images"] == len(report_dataset.train_labels) - len(val)
    assert ref.info["excluded_images"] == len(val)
