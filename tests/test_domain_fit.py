"""The fit stage: a base's samples against the task's pool, before any tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import stages
from pipeline.evaluate.domain_fit import domain_fit, manifold_coverage
from pipeline.runs import init_run_dir, read_json


def _blobs(n: int, shift: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, 16))


def test_coverage_separates_a_fitting_from_a_foreign_distribution():
    pool = _blobs(256, 0.0, 0)
    same = domain_fit(_blobs(64, 0.0, 1), pool, k=3)
    far = domain_fit(_blobs(64, 6.0, 2), pool, k=3)
    assert same.fits(0.5) and same.relative_coverage > 0.7
    assert not far.fits(0.5) and far.coverage == 0.0
    # KID: the foreign set is far above the pool's own floor; the fitting one is near it.
    assert far.kid_base_pool > 10 * abs(same.kid_base_pool) + same.kid_pool_pool_std
    rec = far.as_record(0.5)
    assert rec["fits"] is False and rec["min_relative_coverage"] == 0.5
    json.dumps(rec)  # a stage record: plain JSON


def test_manifold_coverage_counts_queries_inside_the_knn_balls():
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    # k=1: each reference point's radius is 1 (its nearest other point).
    assert manifold_coverage(ref, np.array([[0.5], [10.0]]), k=1) == 0.5
    with pytest.raises(ValueError, match="pool images"):
        domain_fit(np.zeros((4, 2)), np.zeros((5, 2)), k=3)


def test_fit_stage_warns_on_a_base_that_knows_nothing_and_reports_it(flow_cfg, log_records):
    from pipeline.stages.fit import STRIP

    cfg = flow_cfg.model_copy(update={"fit": flow_cfg.fit.model_copy(
        update={"samples": 16, "steps": 2, "pool": 16})})
    run_dir = init_run_dir(cfg)
    stages.run_split(run_dir, cfg)
    with log_records("pipeline.stages.fit") as records:
        rec = stages.STAGE_FUNCTIONS["fit"](run_dir, cfg)
    warned = [r for r in records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "pretrain:" in warned[0].getMessage()
    m = rec["metrics"]  # an untrained tiny base: noise, not T-shirts
    assert m["fits"] is False and m["coverage"] < m["pool_coverage"]
    assert (run_dir / STRIP).stat().st_size > 0
    assert read_json(run_dir / "stages" / "fit.json")["metrics"] == m
    again = stages.STAGE_FUNCTIONS["fit"](run_dir, cfg)
    assert again.get("skipped")

    from pipeline.report.data import load_run
    from pipeline.report.verdict import verdict

    notes = {n["id"]: n["text"] for n in verdict(load_run(run_dir))["notes"]}
    assert "does not fit this data" in notes["fit-note"] and "pretrain:" in notes["fit-note"]


def test_fit_stage_passes_a_base_whose_samples_are_the_pool(flow_cfg, monkeypatch):
    import pipeline.models

    cfg = flow_cfg.model_copy(update={"fit": flow_cfg.fit.model_copy(
        update={"samples": 16, "steps": 1, "pool": 16})})
    run_dir = init_run_dir(cfg)
    stages.run_split(run_dir, cfg)
    from pipeline.stages.inputs import dataset_for

    ds = dataset_for(cfg)
    # A base that reproduces the data (its own training images) is the ideal fit.
    monkeypatch.setattr(pipeline.models, "sample_base",
                        lambda unet, sched, n, *a, **k: ds.train_images[:n])
    rec = stages.STAGE_FUNCTIONS["fit"](run_dir, cfg)
    assert rec["metrics"]["fits"] is True


def test_fit_off_records_nothing_and_keeps_the_config_hash(flow_cfg):
    from pipeline.config import config_hash, load_config, result_fields, with_overrides

    off = with_overrides(flow_cfg, ["fit.enabled=false"])
    assert config_hash(off) != config_hash(flow_cfg)
    # The default fit section is left out of the hash: run names from before stay.
    assert "fit" not in result_fields(load_config("demo"))
    run_dir = init_run_dir(off)
    stages.run_split(run_dir, off)
    assert stages.STAGE_FUNCTIONS["fit"](run_dir, off)["metrics"] == {"enabled": False}


def test_fit_stage_says_why_when_the_data_is_too_small_to_measure(flow_cfg):
    cfg = flow_cfg.model_copy(update={"fit": flow_cfg.fit.model_copy(update={"k": 10})})
    run_dir = init_run_dir(cfg)
    stages.run_split(run_dir, cfg)
    metrics = stages.STAGE_FUNCTIONS["fit"](run_dir, cfg)["metrics"]
    assert "too few" in metrics["not_computed"] and "fit.k" in metrics["not_computed"]
