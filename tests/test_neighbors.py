"""Unlabeled neighbours as tuning targets: the prototype filter, padding, draw weights, and
the encode and tune stages that use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.generate.neighbors import find_neighbors, neighbor_pool, pooled_features, tuning_pairs


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_neighbors_are_nearest_among_pool_images_of_the_same_prototype_class():
    # Two labeled images per class; class 0 lies along x, class 1 along y.
    labeled = _unit([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]])
    labels = torch.tensor([0, 0, 1, 1])
    # Pool 2 sits between the classes, a little nearer class 1 on average (its prototype
    # class), though it is the third nearest pool image to labeled image 0.
    pool = _unit([[1, -0.2], [1, 0.5], [0.68, 0.73], [0, 1]])
    nb = find_neighbors(labeled, labels, pool, k=2)
    assert nb.shape == (4, 2)
    assert nb[0].tolist() == [0, 1] and nb[1].tolist() == [0, 1]
    assert nb[2].tolist() == [3, 2] and nb[3].tolist() == [3, 2]
    padded = find_neighbors(labeled, labels, pool, k=3)
    assert padded[0].tolist() == [0, 1, -1]  # pool 2 is filtered out, not taken third
    assert padded[2].tolist() == [3, 2, -1]
    with pytest.raises(ValueError, match="k must be >= 1"):
        find_neighbors(labeled, labels, pool, k=0)


def test_pool_is_seeded_unlabeled_and_capped():
    unlabeled = np.arange(100, 200)
    a, b = neighbor_pool(unlabeled, 10, seed=3), neighbor_pool(unlabeled, 10, seed=3)
    assert np.array_equal(a, b) and len(set(a)) == 10 and set(a) <= set(unlabeled)
    assert not np.array_equal(a, neighbor_pool(unlabeled, 10, seed=4))
    assert len(neighbor_pool(unlabeled, 500, seed=0)) == 100
    tokens = torch.randn(5, 3, 4)
    f = pooled_features(tokens)
    assert torch.allclose(f.norm(dim=1), torch.ones(5))
    assert torch.allclose(f, F.normalize(tokens.mean(1), dim=1))


def test_tuning_pairs_give_labeled_images_their_self_share():
    labeled_idx = torch.tensor([10, 11, 12, 13])
    neighbors = torch.tensor([[50, 51], [52, -1], [60, 61], [62, 63]])
    rows = torch.tensor([0, 1])  # one class's labeled rows
    targets, token_rows, weights = tuning_pairs(rows, neighbors, labeled_idx, self_share=0.4)
    assert targets.tolist() == [10, 11, 50, 51, 52]
    assert token_rows.tolist() == [0, 1, 0, 0, 1]  # a neighbour carries its condition's tokens
    assert weights[:2].sum().item() == pytest.approx(0.4)
    assert weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(weights[2:], torch.full((3,), 0.2, dtype=weights.dtype))
    targets, token_rows, weights = tuning_pairs(rows, None, labeled_idx, self_share=0.4)
    assert targets.tolist() == [10, 11] and token_rows.tolist() == [0, 1] and weights is None


def test_bad_neighbor_settings_name_the_field():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="neighbors.per_image"):
        load_config("demo", {"neighbors.per_image": -1})
    with pytest.raises(ConfigError, match="neighbors.self_share"):
        load_config("demo", {"neighbors.self_share": 1.5})
    full = load_config("fashion-mnist-40labels")
    assert full.neighbors.per_image > 0  # tunes on neighbours (bench/RESULTS.md, F10)
