"""A pool of truly unlabeled images (labels ``UNLABELED`` = -1), whole or in part: every
figure that compares a prediction with a pool label is scored on the rows that have one,
recorded as not computed when none do, and the report says "needs labels; not computed"
instead of failing or inventing a number; FixMatch never reads -1 as a class."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from report_fixtures import TINY_REFERENCE
from torch_helpers import anl_one_thread as one_thread

from pipeline.data.datasets import UNLABELED
from pipeline.data.pool_labels import NO_POOL_LABELS, agreement, check_class_labels
from pipeline.report.render import NEEDS_LABELS


def hide_pool_labels(dataset, pool: np.ndarray, share: float = 1.0):
    """The dataset with the first ``share`` of ``pool``'s labels (in index order) set to
    UNLABELED: a folder of unlabeled images in place of a benchmark's hidden labels."""
    labels = dataset.train_labels.copy()
    labels[np.sort(pool)[:round(share * len(pool))]] = UNLABELED
    return dataclasses.replace(dataset, train_labels=labels)


def test_agreement_scores_known_rows_and_records_the_rest():
    pred, true = np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0])
    assert agreement(pred, true).record("p") == {"p": 0.75}  # a benchmark's record, as before
    part = agreement(pred, np.array([0, UNLABELED, 1, UNLABELED]))
    assert part.record("p") == {"p": 0.5, "p_scored": 2, "p_of": 4}
    none = agreement(pred, np.full(4, UNLABELED))
    assert none.value is None
    assert none.record("p") == {"p": None, "p_not_computed": NO_POOL_LABELS,
                                "p_scored": 0, "p_of": 4}
    assert agreement(pred[:0], true[:0]).record("p") == {"p": None}  # nothing to score
    check_class_labels(np.array([0, 2]), 3, "rows")
    with pytest.raises(ValueError, match="1 of them UNLABELED"):
        check_class_labels(np.array([0, UNLABELED, 3]), 3, "rows")


def test_control_precision_needs_labels():
    from pipeline.evaluate.control import control_rows

    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)

    def judge(x):
        return x[:, 0, 0, 0].astype(np.int64) % 2, np.ones(len(x))

    pool = np.arange(10, 40)
    unlabeled = np.full(40, UNLABELED)
    rows = control_rows(images, unlabeled, pool, {0: 3, 1: 3}, judge, 30, seed=0)
    assert len(rows.labels) == 6 and rows.precision is None
    assert rows.scored_precision.record("control_precision")[
        "control_precision_not_computed"] == NO_POOL_LABELS
    mixed = np.where(np.arange(40) % 3 == 0, UNLABELED, np.arange(40) % 2)
    part = control_rows(images, mixed, pool, {0: 3, 1: 3}, judge, 30, seed=0).scored_precision
    assert part.value == 1.0 and 0 < part.scored < part.of == 6


def test_labeled_rows_and_the_loss_refuse_unlabeled(ssl_fm_subset, tmp_path):
    import torch

    from pipeline.data.splits import LabeledSplit, make_split
    from pipeline.ssl import run_arm
    from pipeline.ssl.algorithms.base import weighted_ce
    from pipeline.ssl.arms import ArmError, build_train_data
    from pipeline.ssl.config import SSLConfig

    with pytest.raises(RuntimeError, match="unlabeled image"):
        weighted_ce(torch.zeros(2, 3), torch.tensor([0, UNLABELED]), torch.ones(2))
    split = make_split(ssl_fm_subset.train_labels, 4, seed=0)
    ds = hide_pool_labels(ssl_fm_subset, split.unlabeled_idx)
    split = dataclasses.replace(split, labels=ds.train_labels)
    cfg = SSLConfig(net="cnn-tiny", steps=4, batch_size=8, mu=1, eval_every=2,
                    checkpoint_every=100, seed=0, device="cpu", eval_size=100)
    # FixMatch on a pool with no labels trains (the pool's labels are never read) ...
    with one_thread():
        m = json.loads(run_arm("baseline", ds, split, tmp_path / "arm", cfg,
                               progress=False).read_text())
    assert m["num_unlabeled"] >= len(split.unlabeled_idx) and m["steps"] == 4
    # ... and a labeled row without a label stops before training, naming the problem.
    bad = LabeledSplit(split.unlabeled_idx[:4], split.labeled_idx, split.labels, 4, 0)
    with pytest.raises(ArmError, match="UNLABELED=-1"):
        build_train_data(ds, bad, cfg, torch.device("cpu"))


def test_quality_and_report_with_a_pool_without_labels(report_run_copy, report_dataset,
                                                       tmp_path):
    from pipeline.data.splits import load_split, save_split
    from pipeline.evaluate.quality import QualityConfig, evaluate_run_quality
    from pipeline.report.build import build_run_report

    run = report_run_copy
    split = load_split(run / "split.parquet")
    ds = hide_pool_labels(report_dataset, split.unlabeled_idx)
    save_split(dataclasses.replace(split, labels=ds.train_labels), run / "split.parquet")
    with one_thread():
        path = evaluate_run_quality(run, ds, QualityConfig(max_real_per_class=60,
                                                           reference=TINY_REFERENCE),
                                    reference=None, cache_dir=tmp_path / "ref", progress=False)
    q = json.loads(path.read_text())
    o = q["overall"]
    assert o["label_consistency"] is None
    assert o["label_consistency_not_computed"].startswith(NO_POOL_LABELS)
    # The reference learned from the 40 labeled images alone, and says so.
    assert q["reference"]["train_images"] == len(split.labeled_idx)
    assert q["reference"]["unlabeled_left_out"] == len(split.unlabeled_idx)
    # No held-out labeled image (no validation split): KID is against the labeled images,
    # the near-copy comparison is not made, and the record says which images were used.
    assert q["real_images"] and {c["real_source"] for c in q["per_class"]} == {"labeled"}
    assert all(c["label_consistency"] is None and c.get("top_confusion") is None
               and c["nn_rmse_real"] is None and c["kid"] is not None for c in q["per_class"])
    assert all(m["label_consistency"] is None for m in q["by_mask_ratio"])
    html_path, md_path = build_run_report(run)
    md, html = md_path.read_text(), html_path.read_text()
    assert f"| label consistency (reference classifier) | {NEEDS_LABELS} |" in md
    assert html.count(NEEDS_LABELS) >= 1 + len(q["per_class"]) + len(q["by_mask_ratio"])
    assert "nan" not in md.lower().replace("fashion", "")


def test_quality_on_a_partly_labeled_pool_scores_the_labeled_part(report_run_copy,
                                                                  report_dataset, tmp_path):
    from pipeline.data.splits import load_split, save_split
    from pipeline.evaluate.quality import QualityConfig, evaluate_run_quality

    run = report_run_copy
    split = load_split(run / "split.parquet")
    ds = hide_pool_labels(report_dataset, split.unlabeled_idx, share=0.5)
    save_split(dataclasses.replace(split, labels=ds.train_labels), run / "split.parquet")
    with one_thread():
        path = evaluate_run_quality(run, ds, QualityConfig(max_real_per_class=60,
                                                           reference=TINY_REFERENCE),
                                    reference=None, cache_dir=tmp_path / "ref", progress=False)
    q = json.loads(path.read_text())
    hidden = int((ds.train_labels == UNLABELED).sum())
    assert q["reference"]["unlabeled_left_out"] == hidden
    assert q["reference"]["train_images"] == len(ds.train_labels) - hidden
    assert 0.0 <= q["overall"]["label_consistency"] <= 1.0
    assert "label_consistency_not_computed" not in q["overall"]
    assert {c["real_source"] for c in q["per_class"]} == {"held-out"} and not q["real_images"]


def run_with_unlabeled_folder(tmp_path, base, folder, keep_per_class: int):
    """Every stage through the report on a copy of the flow folder (10 training images per
    class) whose images after the first ``keep_per_class`` of each class are moved to its
    ``unlabeled/`` folder, as a user's would be; the run directory and the records."""
    import shutil

    from flow_fixtures import flow_config

    from pipeline import stages
    from pipeline.runs import init_run_dir

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    (root / "unlabeled").mkdir()
    for cls in sorted((root / "train").iterdir()):
        for png in sorted(cls.glob("*.png"))[keep_per_class:]:
            png.rename(root / "unlabeled" / f"{cls.name}-{png.name}")
    cfg = flow_config(tmp_path / "runs", base, root, **{
        "loop.rounds": 2, "loop.threshold": 0.0, "loop.per_class": 2,
        "ssl.arms": ["baseline", "augmented", "control"], "validation_per_class": 2,
        "neighbors.per_image": 2, "neighbors.pool": 8, "quality.enabled": True,
        "quality.reference": TINY_REFERENCE, "quality.max_real_per_class": 20})
    run_dir = init_run_dir(cfg)
    with one_thread():
        return run_dir, stages.run_all(run_dir, cfg)


def test_a_run_on_a_pool_without_labels_reports_what_needs_labels(tmp_path, flow_tiny_base,
                                                                  flow_image_folder):
    """4 labeled images per class (2 labeled, 2 validation), the other 6 unlabeled:
    neighbours, control judge, round-2 pseudo-labels and quality record "not computed",
    and the report says so."""
    from pipeline.runs import read_json

    run_dir, records = run_with_unlabeled_folder(tmp_path, flow_tiny_base, flow_image_folder,
                                                 keep_per_class=4)
    encode = records["encode"]["metrics"]
    assert encode["neighbor_purity"] is None and encode["neighbors"] > 0
    assert encode["neighbor_purity_not_computed"] == NO_POOL_LABELS
    pseudo = records["loop"]["metrics"]["pseudo"]
    assert pseudo["precision"] is None and pseudo["precision_not_computed"] == NO_POOL_LABELS
    assert pseudo["pseudo_labeled"] > 0
    unit = read_json(run_dir / "ssl/control/seed-0/unit.json")["metrics"]
    assert unit["control_precision"] is None and unit["control_rows"] > 0
    assert unit["control_precision_not_computed"] == NO_POOL_LABELS
    q = read_json(run_dir / "quality/quality.json")
    assert q["overall"]["label_consistency_not_computed"].startswith(NO_POOL_LABELS)
    # Validation images are held-out labeled images: the real side of each class.
    assert {c["real_source"] for c in q["per_class"]} == {"held-out"}
    md, html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    assert f"how many of them are right: {NEEDS_LABELS}, as {NO_POOL_LABELS}" in md
    assert f"| label consistency (reference classifier) | {NEEDS_LABELS} |" in md
    assert f"how often the judge's labels were right: {NEEDS_LABELS}" in md
    assert html.count(NEEDS_LABELS) >= 4


def test_a_run_on_a_partly_labeled_pool_scores_the_labeled_part(tmp_path, flow_tiny_base,
                                                                 flow_image_folder):
    """7 labeled images per class: 4 in the labeled and validation sets, 3 in the pool beside
    3 unlabeled ones. Pool figures are scored on the pool images with a label, and say on
    how many."""
    from pipeline.runs import read_json

    run_dir, records = run_with_unlabeled_folder(tmp_path, flow_tiny_base, flow_image_folder,
                                                 keep_per_class=7)
    pseudo = records["loop"]["metrics"]["pseudo"]
    for rec, name, rows in ((records["encode"]["metrics"], "neighbor_purity", "neighbors"),
                            (pseudo, "precision", "pseudo_labeled"),
                            (read_json(run_dir / "ssl/control/seed-0/unit.json")["metrics"],
                             "control_precision", "control_rows")):
        assert 0 < rec[f"{name}_scored"] < rec[f"{name}_of"] == rec[rows], (name, rec)
        assert 0.0 <= rec[name] <= 1.0 and f"{name}_not_computed" not in rec
    q = read_json(run_dir / "quality/quality.json")
    assert 0.0 <= q["overall"]["label_consistency"] <= 1.0
    assert q["reference"]["unlabeled_left_out"] == 6
    md = (run_dir / "report.md").read_text()
    assert f"of the {pseudo['precision_scored']} of them with a known label are right" in md
    assert "of them with a known label)" in md  # the control judge's precision
    assert NEEDS_LABELS not in md
