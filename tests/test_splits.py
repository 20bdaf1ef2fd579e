"""Labeled split protocol on the real Fashion-MNIST labels."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.splits import SplitError, load_split, make_split, save_split

# Fashion-MNIST, 4 labels per class, seed 0. Pinned so that a numpy or platform change that
# would silently pick other images (and break "same seed, same split everywhere") fails here.
GOLDEN_SEED0_N4 = [43968, 59943, 43863, 415, 58926, 5596, 3256, 8103, 45329, 41323,
                   30144, 9585, 24513, 34443, 36411, 21171, 11774, 2241, 57517, 41794,
                   17123, 25660, 25306, 13125, 43108, 30556, 11619, 27928, 9416, 14205,
                   20480, 31716, 39660, 49035, 50679, 22302, 16146, 8083, 17512, 20417]


@pytest.fixture(scope="module")
def labels(data_fashion_mnist):
    return data_fashion_mnist.train_labels


def test_split_is_balanced_disjoint_and_covers_train(labels):
    split = make_split(labels, 25, seed=3)
    assert len(split.labeled_idx) == 250
    assert np.bincount(split.labeled_labels, minlength=10).tolist() == [25] * 10
    assert len(np.unique(split.labeled_idx)) == 250
    assert np.intersect1d(split.labeled_idx, split.unlabeled_idx).size == 0
    everything = np.sort(np.concatenate([split.labeled_idx, split.unlabeled_idx]))
    np.testing.assert_array_equal(everything, np.arange(len(labels)))
    # Indices address the training set only, so the test split can never leak in.
    assert split.labeled_idx.max() < len(labels)
    np.testing.assert_array_equal(split.labels[split.labeled_idx], labels[split.labeled_idx])


def test_class_subsets_hold_their_class(labels):
    split = make_split(labels, 7, seed=0)
    subsets = split.class_subsets()
    assert sorted(subsets) == list(range(10))
    for c, idx in subsets.items():
        assert len(idx) == 7 and (labels[idx] == c).all()


def test_same_seed_same_split_other_seed_other_split(labels):
    a, b = make_split(labels, 25, seed=11), make_split(labels, 25, seed=11)
    np.testing.assert_array_equal(a.labeled_idx, b.labeled_idx)
    np.testing.assert_array_equal(a.unlabeled_idx, b.unlabeled_idx)
    c = make_split(labels, 25, seed=12)
    assert np.intersect1d(a.labeled_idx, c.labeled_idx).size < 25  # ~0.1 expected by chance


def test_split_matches_pinned_indices(labels):
    assert make_split(labels, 4, seed=0).labeled_idx.tolist() == GOLDEN_SEED0_N4


def test_save_load_round_trip(tmp_path, labels):
    split = make_split(labels, 10, seed=5)
    path = save_split(split, tmp_path / "run" / "split.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.parquet"]  # no temp left
    table = pq.read_table(path)
    assert table.column_names == ["index", "label", "role"]
    roles = table["role"].to_pylist()
    assert roles.count("labeled") == 100 and roles.count("unlabeled") == len(labels) - 100
    back = load_split(path)
    np.testing.assert_array_equal(back.labeled_idx, split.labeled_idx)  # draw order kept
    np.testing.assert_array_equal(back.unlabeled_idx, split.unlabeled_idx)
    np.testing.assert_array_equal(back.labels, labels)
    assert (back.n_per_class, back.seed) == (10, 5)


def test_too_many_labels_per_class_is_refused(tmp_path):
    labels = np.array([0] * 5 + [1] * 3 + [2] * 8)
    with pytest.raises(SplitError, match=r"class 1 has only 3 .* at most 3"):
        make_split(labels, 4, seed=0)
    with pytest.raises(SplitError, match=">= 1"):
        make_split(labels, 0, seed=0)
    assert make_split(labels, 3, seed=0).labeled_idx.size == 9  # the edge case works


def test_load_split_refuses_missing_and_corrupt_files(tmp_path, labels):
    with pytest.raises(SplitError, match="run the split stage"):
        load_split(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SplitError, match="cannot read"):
        load_split(tmp_path / "junk.parquet")
    split = make_split(labels[:100], 2, seed=0)
    path = save_split(split, tmp_path / "split.parquet")
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 50), tmp_path / "cut.parquet")  # indices no longer 0..N-1
    with pytest.raises(SplitError, match="corrupt"):
        load_split(tmp_path / "cut.parquet")


def test_preflight_names_a_validation_split_the_data_cannot_hold():
    """Fashion-MNIST has 6,000 training images per class: 4 labels + 5,997 held out do not fit,
    and pre-flight says so (naming the field and the largest value that fits) in seconds."""
    from pinned_presets import FROZEN_DEMO  # the whole training set, 4 labels per class

    from pipeline.config import load_config
    from pipeline.preflight import PreflightError, preflight

    cfg = load_config(FROZEN_DEMO, {"validation_per_class": 5997, "device": "cpu"})
    with pytest.raises(PreflightError, match=r"validation_per_class=5997.*at most 5996"):
        preflight(cfg)
