"""``augment init DIR`` writes a sized, commented preset for one's own folder; ``--dry-run``
prints counts by role and a time per stage from rates timed here."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.cli import main
from pipeline.config import load_config
from pipeline.data.datasets import ImageDataset
from pipeline.estimate import data_counts, format_counts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 grey classes of 20, 24 and 30 28x28 PNGs."""
    root = tmp_path_factory.mktemp("init") / "shapes"
    rng = np.random.default_rng(0)
    for c, n in (("a", 20), ("b", 24), ("c", 30)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root


def test_init_writes_a_cpu_sized_preset_and_refuses_to_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert main(["init", str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    data = yaml.safe_load(text)
    assert data["dataset"] == "image-folder" and data["dataset_root"] == str(folder)
    # Smallest class 20 (test images taken out by the loader first): validation a fifth of
    # what is left, labels a quarter of the rest; the values carry their reasons.
    cfg = load_config(out)
    assert cfg.preset == "mine" and cfg.image_size == 32 and cfg.device == "cpu"
    assert 1 <= cfg.labels_per_class <= 40 and cfg.validation_per_class >= 1
    assert "# a quarter of the smallest class" in text and "# held out" in text
    # Never the library's 2^20 SSL steps or 1,000 tuning steps.
    assert 256 <= cfg.ssl.steps <= 8192 and cfg.ssl.steps & (cfg.ssl.steps - 1) == 0
    assert 20 <= cfg.tuning.steps <= 300 and cfg.ssl.recipe == "cpu-short"
    assert cfg.ssl.arms == ["supervised", "baseline", "augmented"]
    assert main(["init", str(folder), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["init", str(folder), "--out", str(out), "--gpu", "--force"]) == 0
    gpu = load_config(out)
    assert gpu.device == "cuda" and gpu.ssl.steps == 16384 and "control" in gpu.ssl.arms


def test_init_names_a_missing_folder(tmp_path, capsys):
    assert main(["init", str(tmp_path / "nope"), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_counts_by_role_with_unlabeled_images():
    img = np.zeros((1, 8, 8, 1), np.uint8)
    labels = np.array([0] * 6 + [1] * 9 + [-1] * 50)
    ds = ImageDataset("t", ("cat", "dog"), np.repeat(img, len(labels), 0), labels,
                      np.repeat(img, 7, 0), np.zeros(7, np.int64))
    cfg = load_config("demo", ["labels_per_class=4", "validation_per_class=3",
                               "ssl.unlabeled_pool=null"])
    c = data_counts(cfg, ds)
    assert c.per_class == [6, 9] and c.labeled == [4, 4]
    assert c.validation == 2 + 3 and c.unlabeled == 50 + 0 + 2 and c.test == 7
    assert format_counts(c)[0] == "classes (2): cat 6, dog 9"


def test_dry_run_prints_counts_and_a_time_per_stage(folder, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["init", str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "classes (3): a " in printed and "unlabeled pool" in printed
    for stage in ("tune", "sample", "ssl", "total"):
        assert f"  {stage} " in printed
    assert "measured" in printed


@pytest.mark.parametrize("sizes", [(64, 64), (48, 64)], ids=["larger", "mixed"])
def test_init_resizes_images_that_do_not_fit_and_the_dry_run_reads_them_so(
        tmp_path, capsys, sizes):
    """Images larger than the base (or of several sizes) get `resize: true` in the preset,
    so pre-flight passes, and the dry run reads them with the preset's loader options."""
    root = tmp_path / "big"
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            side = sizes[i % 2]
            Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    out = tmp_path / "big.yaml"
    assert main(["init", str(root), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["resize"] is True
    capsys.readouterr()
    assert main(["run", str(out), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "[32, 32, 1]" in printed and "total" in printed
