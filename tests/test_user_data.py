"""A user's own data: image-folder layouts with unlabeled and test folders, Hugging Face
datasets (save_to_disk and Parquet), unlabeled images in the split, the split keyed by the
files' contents, and the pre-flight checks of channels and size against the base U-Net."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import UNLABELED, DatasetError, load_dataset
from pipeline.data.splits import load_split, make_split, save_split

RNG = np.random.default_rng(0)


def _png(path, size=(28, 28), mode="L", value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    arr = RNG.integers(0, 256, shape, dtype=np.uint8) if value is None else \
        np.full(shape, value, np.uint8)
    Image.fromarray(arr, mode).save(path)


def _folder(root, classes=("cat", "dog"), per_class=6, unlabeled=10, test=0, mode="L",
            nested_unlabeled=False, train=False):
    base = root / "train" if train else root
    for cls in classes:
        for i in range(per_class):
            _png(base / cls / f"{i}.png", mode=mode)
        for i in range(test):
            _png(root / "test" / cls / f"{i}.png", mode=mode)
    for i in range(unlabeled):
        sub = f"batch{i % 2}/" if nested_unlabeled else ""
        _png(root / "unlabeled" / f"{sub}{i}.png", mode=mode)
    return root


# --------------------------------------------------------------------------- image folder


def test_unlabeled_folder_is_not_a_class_and_stays_in_training(tmp_path):
    _folder(tmp_path, unlabeled=10, nested_unlabeled=True)
    ds = load_dataset("image-folder", tmp_path, test_fraction=0.5, seed=0)
    assert ds.class_names == ("cat", "dog")
    assert ds.num_unlabeled == 10 and (ds.train_labels == UNLABELED).sum() == 10
    # The held-out test split is a fraction of the labeled images only.
    assert np.bincount(ds.test_labels).tolist() == [3, 3]
    assert np.bincount(ds.train_labels[ds.train_labels != UNLABELED]).tolist() == [3, 3]


def test_test_folder_is_the_test_set(tmp_path):
    _folder(tmp_path, unlabeled=4, test=2)
    ds = load_dataset("image-folder", tmp_path)
    assert ds.class_names == ("cat", "dog")
    assert len(ds.test_labels) == 4 and sorted(ds.test_labels.tolist()) == [0, 0, 1, 1]
    assert len(ds.train_labels) == 12 + 4  # every labeled image trains; none held out


def test_train_test_layout_with_unlabeled_beside_train(tmp_path):
    _folder(tmp_path, unlabeled=3, test=1, train=True)
    ds = load_dataset("image-folder", tmp_path)
    assert ds.class_names == ("cat", "dog")
    assert ds.num_unlabeled == 3 and len(ds.test_labels) == 2


def test_test_folder_with_an_unknown_class_is_refused(tmp_path):
    _folder(tmp_path, unlabeled=0, test=1)
    _png(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(DatasetError, match="bird"):
        load_dataset("image-folder", tmp_path)


def test_only_reserved_folders_is_refused(tmp_path):
    _png(tmp_path / "unlabeled" / "0.png")
    with pytest.raises(DatasetError, match="reserved"):
        load_dataset("image-folder", tmp_path)


def test_mixed_channels_become_rgb_whichever_comes_first(tmp_path):
    _png(tmp_path / "a" / "0.png", mode="RGB")
    for i in range(1, 4):
        _png(tmp_path / "a" / f"{i}.png")
        _png(tmp_path / "b" / f"{i}.png")
    ds = load_dataset("image-folder", tmp_path, test_fraction=0.0)
    assert ds.image_shape == (28, 28, 3)
    grey = load_dataset("image-folder", tmp_path, test_fraction=0.0, image_mode="grey")
    assert grey.image_shape == (28, 28, 1)


def test_mixed_sizes_name_the_resize_key(tmp_path):
    _png(tmp_path / "a" / "0.png", size=(28, 28))
    _png(tmp_path / "b" / "0.png", size=(40, 36))
    with pytest.raises(DatasetError, match="resize: true"):
        load_dataset("image-folder", tmp_path, test_fraction=0.0)
    ds = load_dataset("image-folder", tmp_path, test_fraction=0.0, image_size=32)
    assert ds.image_shape == (32, 32, 1)


def test_benchmark_options_convert_and_resize(data_fashion_mnist):
    from pipeline.data.image_dataset import ImageDataset, conform

    small = ImageDataset("t", ("a",), data_fashion_mnist.train_images[:3],
                         np.zeros(3, np.int64), data_fashion_mnist.test_images[:2],
                         np.zeros(2, np.int64))
    assert conform(small) is small  # defaults: the arrays untouched
    out = conform(small, "rgb", (32, 32))
    assert out.image_shape == (32, 32, 3) and out.test_images.shape == (2, 32, 32, 3)


# --------------------------------------------------------------------------- hf-dataset


def _hf_rows(n_labeled=4, n_unlabeled=3, classes=("ant", "bee"), class_label=True):
    import datasets

    images = [Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8))
              for _ in range(n_labeled * len(classes) + n_unlabeled)]
    labels = [c for c in range(len(classes)) for _ in range(n_labeled)] + [-1] * n_unlabeled
    label_feature = datasets.ClassLabel(names=list(classes)) if class_label else \
        datasets.Value("int64")
    if not class_label:
        labels = [None if v == -1 else 10 + v for v in labels]
    features = datasets.Features({"img": datasets.Image(), "labels": label_feature})
    return datasets.Dataset.from_dict({"img": images, "labels": labels}, features=features)


def test_hf_dataset_from_save_to_disk_with_a_test_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": _hf_rows(), "test": _hf_rows(2, 0)})
    dd.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset("hf-dataset", tmp_path / "saved")
    assert ds.class_names == ("ant", "bee")
    assert ds.num_unlabeled == 3 and len(ds.train_labels) == 11
    assert sorted(ds.test_labels.tolist()) == [0, 0, 1, 1]
    assert ds.image_shape == (28, 28, 1)


def test_hf_dataset_from_parquet_without_class_label(tmp_path):
    rows = _hf_rows(5, 4, class_label=False)
    (tmp_path / "pq").mkdir()
    rows.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    ds = load_dataset("hf-dataset", str(tmp_path / "pq"), test_fraction=0.2, seed=0)
    assert ds.class_names == ("10", "11")  # sorted distinct values
    assert ds.num_unlabeled == 4
    assert np.bincount(ds.test_labels).tolist() == [1, 1]  # stratified, labeled rows only
    glob = load_dataset("hf-dataset", str(tmp_path / "pq" / "*.parquet"), test_fraction=0.2)
    np.testing.assert_array_equal(glob.train_labels, ds.train_labels)


def test_hf_dataset_columns_named_by_config_keys(tmp_path):
    import datasets

    rows = _hf_rows().rename_columns({"img": "picture", "labels": "kind"})
    rows.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match="label_column"):
        load_dataset("hf-dataset", tmp_path / "saved")
    with pytest.raises(DatasetError, match="image_column='photo'"):
        load_dataset("hf-dataset", tmp_path / "saved", image_column="photo", label_column="kind")
    ds = load_dataset("hf-dataset", tmp_path / "saved", label_column="kind",
                      image_mode="rgb", image_size=32)
    assert ds.image_shape == (32, 32, 3) and ds.num_unlabeled == 3
    assert isinstance(rows.features["picture"], datasets.Image)


def test_hf_dataset_config_needs_a_root_and_columns_need_it():
    from pipeline.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="dataset_root"):
        validate_config({"dataset": "hf-dataset"})
    with pytest.raises(ConfigError, match="image_column"):
        validate_config({"dataset": "cifar10", "image_column": "x"})


# --------------------------------------------------------------------------- split


def test_split_never_draws_unlabeled_images_and_round_trips_them(tmp_path):
    labels = np.array([0, 0, 0, UNLABELED, 1, 1, 1, UNLABELED, UNLABELED, 0, 1], np.int64)
    for seed in range(5):
        split = make_split(labels, 2, seed, 2, val_per_class=1)
        unl = np.flatnonzero(labels == UNLABELED)
        assert not np.isin(unl, split.labeled_idx).any() and not np.isin(unl, split.val_idx).any()
        assert np.isin(unl, split.unlabeled_idx).all()
    again = load_split(save_split(split, tmp_path / "split.parquet"))
    np.testing.assert_array_equal(again.labels, labels)
    np.testing.assert_array_equal(again.unlabeled_idx, split.unlabeled_idx)


def test_split_counts_ignore_unlabeled_images():
    from pipeline.data.splits import SplitError

    labels = np.array([0, 0, 1] + [UNLABELED] * 20, np.int64)
    with pytest.raises(SplitError, match="class 1 has only 1 labeled"):
        make_split(labels, 2, 0)


# --------------------------------------------------------------------------- keys


def _cfg(root, **extra):
    from pipeline.config import validate_config

    return validate_config({"dataset": "image-folder", "dataset_root": str(root),
                            "labels_per_class": 2, **extra})


def test_split_key_follows_the_folder_contents(tmp_path):
    from pipeline.config import stage_key
    from pipeline.stages.split import run_split

    _folder(tmp_path / "data", unlabeled=3)
    cfg = _cfg(tmp_path / "data")
    run = tmp_path / "run"
    first = run_split(run, cfg)
    assert not first.get("skipped") and first["metrics"]["unlabeled"] >= 3
    assert run_split(run, cfg).get("skipped")  # nothing changed: reused
    # Same size, new bytes, a later mtime: one file changed -> another key, the split reruns.
    target = tmp_path / "data" / "cat" / "0.png"
    _png(target, value=7)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stage_key(cfg, "split") != first["key"]
    again = run_split(run, cfg)
    assert not again.get("skipped") and again["key"] != first["key"]
    _png(tmp_path / "data" / "dog" / "extra.png")  # an added image: a new key again
    assert stage_key(cfg, "split") != again["key"]


def test_new_keys_leave_old_hashes_and_enter_the_split_key(tmp_path):
    from pipeline.config import config_hash, load_config, stage_key

    demo = load_config("demo")
    assert load_config("demo", ["image_mode=auto", "resize=false"]).model_dump() == \
        demo.model_dump()
    assert config_hash(load_config("demo", ["resize=false"])) == config_hash(demo)
    for change in (["image_mode=grey"], ["resize=true"], ["resize=true", "image_size=64"]):
        assert stage_key(load_config("demo", change), "split") != stage_key(demo, "split")
    assert stage_key(load_config("demo", ["resize=true", "image_size=64"]), "split") != \
        stage_key(load_config("demo", ["resize=true"]), "split")


def test_dataset_for_passes_the_loader_keys(tmp_path):
    from pipeline.stages.inputs import dataset_for

    _png(tmp_path / "a" / "0.png", size=(20, 20), mode="RGB")
    _png(tmp_path / "b" / "0.png", size=(40, 40), mode="RGB")
    ds = dataset_for(_cfg(tmp_path, resize=True, image_mode="grey", image_size=16,
                          labels_per_class=1))
    assert ds.image_shape == (16, 16, 1)
