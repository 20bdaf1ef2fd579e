"""Where the generated images help (the gain map): the base/task halves, the capped unlabeled
pool, the supervised+synthetic and pool-oracle arms, the disjointness pre-flight, and the
sweep (spec, repetitions, statistics, report) on tiny real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.data.splits import (
    capped_pool,
    halves,
    load_split,
    make_split,
    pretraining_indices,
    save_split,
)
from pipeline.ssl import SSLConfig, run_arm
from pipeline.ssl.arms import ArmError, build_train_data

pytestmark = pytest.mark.usefixtures("ssl_one_thread")


def tiny(**kw) -> SSLConfig:
    base = {"net": "cnn-tiny", "steps": 6, "batch_size": 16, "mu": 1, "eval_every": 3,
            "checkpoint_every": 3, "seed": 0, "device": "cpu", "bn_calibration": 200}
    return SSLConfig(**{**base, **kw})


# --------------------------------------------------------------------------- halves, pool


def test_halves_are_disjoint_stratified_and_fixed_by_their_seed(data_fashion_mnist):
    labels = data_fashion_mnist.train_labels
    h = halves(labels, 0)
    assert not np.intersect1d(h["base"], h["task"]).size
    assert len(h["base"]) + len(h["task"]) == len(labels) == 60000
    assert np.array_equal(np.bincount(labels[h["task"]]), np.full(10, 3000))  # stratified
    assert np.array_equal(halves(labels, 0)["task"], h["task"])
    assert not np.array_equal(halves(labels, 1)["task"], h["task"])
    # The base model's record names its half; the card recomputes the same images from it.
    assert np.array_equal(pretraining_indices(labels, {"half": "base", "half_seed": 0}),
                          h["base"])


def test_a_task_half_split_draws_every_role_from_the_task_half(data_fashion_mnist, tmp_path):
    labels = data_fashion_mnist.train_labels
    task = set(halves(labels, 0)["task"].tolist())
    split = make_split(labels, 4, seed=3, num_classes=10, val_per_class=20, half_seed=0)
    for idx in (split.labeled_idx, split.unlabeled_idx, split.val_idx):
        assert set(idx.tolist()) <= task
    assert len(split.base_idx) == 30000 and not set(split.base_idx.tolist()) & task
    assert len(split.unlabeled_idx) == 30000 - 40 - 200
    back = load_split(save_split(split, tmp_path / "split.parquet"))
    assert np.array_equal(back.base_idx, split.base_idx)
    assert np.array_equal(back.unlabeled_idx, split.unlabeled_idx)
    # Without a half nothing changes: the base role is empty and the pool is the rest.
    whole = make_split(labels, 4, seed=3, num_classes=10)
    assert len(whole.base_idx) == 0 and len(whole.unlabeled_idx) == 60000 - 40


def test_capped_pool_is_seeded_nested_and_reads_no_label(data_fashion_mnist):
    labels = data_fashion_mnist.train_labels
    split = make_split(labels, 4, seed=0, num_classes=10)
    small, large = capped_pool(split, 500), capped_pool(split, 2000)
    assert len(small) == 500 and len(large) == 2000
    assert set(small.tolist()) <= set(large.tolist()) <= set(split.unlabeled_idx.tolist())
    assert capped_pool(split, None) is split.unlabeled_idx and len(capped_pool(split, 0)) == 0
    relabeled = make_split(labels, 4, seed=0, num_classes=10)
    object.__setattr__(relabeled, "labels", np.random.default_rng(1).permutation(labels))
    assert np.array_equal(capped_pool(relabeled, 500), small)  # class-blind
    other = make_split(labels, 4, seed=1, num_classes=10)
    assert not np.array_equal(capped_pool(other, 500), small)  # the split's own seed


def test_the_capped_pool_is_what_trains_and_calibrates(ssl_fm_subset):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    data = build_train_data(ds, split, tiny(unlabeled_pool=100), torch.device("cpu"))
    allowed = set(split.labeled_idx.tolist()) | set(capped_pool(split, 100).tolist())
    assert set(data.unlabeled.tolist()) == allowed  # USB: labeled images in the pool too
    assert set(data.calib_idx.tolist()) <= allowed and len(data.calib_idx) == 140


# --------------------------------------------------------------------------- the two arms


def test_supervised_synthetic_arm_trains_on_labeled_plus_synthetic_rows(ssl_fm_subset,
                                                                         tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0)
    synth = (ds.train_images[split.unlabeled_idx[:30]],
             ds.train_labels[split.unlabeled_idx[:30]])
    cfg = tiny(unlabeled_pool=0)
    m = json.loads(run_arm("supervised+synthetic", ds, split, tmp_path / "ss", cfg,
                           progress=False, synthetic=synth).read_text())
    s = json.loads(run_arm("supervised", ds, split, tmp_path / "s", cfg,
                           progress=False).read_text())
    assert m["algorithm"] == s["algorithm"] == "supervised"
    assert m["num_synthetic"] == 30 and s["num_synthetic"] == 0
    assert m["fingerprint"] != s["fingerprint"]
    with pytest.raises(ArmError, match="needs its extra rows"):
        run_arm("supervised+synthetic", ds, split, tmp_path / "x", cfg, progress=False)


def test_pool_oracle_adds_the_base_half_to_the_pool_only(ssl_fm_subset, tmp_path):
    ds = ssl_fm_subset
    split = make_split(ds.train_labels, 4, seed=0, half_seed=0)
    cfg = tiny(unlabeled_pool=200)
    o = json.loads(run_arm("pool-oracle", ds, split, tmp_path / "o", cfg,
                           progress=False).read_text())
    b = json.loads(run_arm("baseline", ds, split, tmp_path / "b", cfg,
                           progress=False).read_text())
    assert o["algorithm"] == b["algorithm"] == "fixmatch"
    assert o["num_unlabeled"] == b["num_unlabeled"] + len(split.base_idx)
    data = build_train_data(ds, split, cfg, torch.device("cpu"), pool_extra=split.base_idx)
    assert not set(data.calib_idx.tolist()) & set(split.base_idx.tolist())
    whole = make_split(ds.train_labels, 4, seed=0)
    with pytest.raises(ArmError, match="task-half"):
        run_arm("pool-oracle", ds, whole, tmp_path / "w", cfg, progress=False)
    with pytest.raises(ArmError, match="pool is empty"):
        run_arm("baseline", ds, split, tmp_path / "e", tiny(unlabeled_pool=0), progress=False)


def test_config_refuses_ssl_arms_without_a_pool_and_keeps_old_hashes():
    from pinned_presets import FROZEN_DEMO

    with pytest.raises(ConfigError, match="unlabeled_pool=0 leaves no unlabeled images"):
        load_config(FROZEN_DEMO, {"ssl.unlabeled_pool": 0})
    with pytest.raises(ConfigError, match="unlabeled_pool=0 leaves no unlabeled images"):
        load_config("demo", {"ssl.arms": ["supervised", "baseline"]})
    ok = load_config(FROZEN_DEMO, {"ssl.unlabeled_pool": 0,
                                   "ssl.arms": ["supervised", "supervised+synthetic"]})
    assert ok.ssl.arms == ["supervised", "supervised+synthetic"]
    from pipeline.config import config_hash

    plain = load_config(FROZEN_DEMO)
    assert config_hash(load_config(FROZEN_DEMO, {"task_images": "all", "half_seed": 0})) == \
        config_hash(plain)
    assert config_hash(load_config(FROZEN_DEMO, {"ssl.unlabeled_pool": 2000})) != \
        config_hash(plain)


# --------------------------------------------------------------------------- pre-flight


def _base_record(tmp_path, pool: dict):
    base = tmp_path / "base"
    base.mkdir()
    (base / "training.json").write_text(json.dumps({"pool": {"dataset": "fashion-mnist",
                                                             **pool}}))
    return base


def test_preflight_refuses_task_images_the_base_was_pretrained_on(tmp_path):
    from pinned_presets import FROZEN_DEMO  # whole-set task images

    from pipeline.models import PreflightError
    from pipeline.preflight import check_disjoint

    half = _base_record(tmp_path, {"half": "base", "half_seed": 0})
    assert check_disjoint(load_config("demo"), half) == "disjoint"  # the shipped demo
    with pytest.raises(PreflightError, match="set task_images=task-half and half_seed=0"):
        check_disjoint(load_config(FROZEN_DEMO), half)
    with pytest.raises(PreflightError, match="half_seed=0"):
        check_disjoint(load_config("demo", {"half_seed": 1}), half)
    whole = _base_record(tmp_path / "w", {"labels_per_class": 4, "split_seed": 0}) \
        if (tmp_path / "w").mkdir() is None else None
    with pytest.raises(PreflightError, match="augment pretrain --half base"):
        check_disjoint(load_config("demo"), whole)
    assert check_disjoint(load_config(FROZEN_DEMO), whole) == "overlap"  # the whole-set regime
    assert check_disjoint(load_config(FROZEN_DEMO), tmp_path / "nowhere") is None


def test_no_shipped_preset_runs_the_oracle():
    from pipeline.config import available_presets

    for name in available_presets():
        assert "pool-oracle" not in load_config(name).ssl.arms, name


# --------------------------------------------------------------------------- the sweep


def _spec(tmp_path, **kw):
    from pipeline.sweep.spec import SweepSpec

    data = {"name": "t", "preset": "demo", "set": {"ssl.steps": 10},
            "grid": {"labels_per_class": [1, 4], "ssl.unlabeled_pool": [0, 100]},
            "rules": [{"when": {"ssl.unlabeled_pool": 0},
                       "set": {"ssl.arms": ["supervised", "supervised+synthetic"]}}],
            "repetitions": [0, 1, 2], **kw}
    return SweepSpec.model_validate(data)


def test_sweep_cells_are_the_grid_with_its_rules(tmp_path):
    from pipeline.sweep.spec import repetition_config

    spec = _spec(tmp_path)
    cells = spec.cells()
    assert [c.point for c in cells] == [
        {"labels_per_class": 1, "ssl.unlabeled_pool": 0},
        {"labels_per_class": 1, "ssl.unlabeled_pool": 100},
        {"labels_per_class": 4, "ssl.unlabeled_pool": 0},
        {"labels_per_class": 4, "ssl.unlabeled_pool": 100}]
    assert cells[0].overrides["ssl.arms"] == ["supervised", "supervised+synthetic"]
    assert "ssl.arms" not in cells[1].overrides
    assert len({c.slug for c in cells}) == 4
    changed = _spec(tmp_path, set={"ssl.steps": 20}).cells()
    assert all(a.slug != b.slug for a, b in zip(cells, changed, strict=True))
    c = repetition_config(spec, cells[1], 2)  # repetition 2: its own seeds everywhere
    assert (c.split_seed, c.tuning.seed, c.sampling.seed, c.ssl.seeds) == (2, 2, 2, [2])
    assert c.ssl.unlabeled_pool == 100 and c.labels_per_class == 1


def test_sweep_spec_errors_name_the_problem(tmp_path):
    from pipeline.sweep.spec import SweepError, check_spec, load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid: {labels_per_class: []}\n")
    with pytest.raises(SweepError, match="grid.labels_per_class has no values"):
        load_spec(bad)
    bad.write_text("name: x\ngrdi: {}\n")
    with pytest.raises(SweepError, match="unknown parameter 'grdi'"):
        load_spec(bad)
    with pytest.raises(SweepError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    spec = _spec(tmp_path, set={"ssl.bogus": 1})
    with pytest.raises(SweepError, match="ssl.bogus"):
        check_spec(spec)


def test_cell_statistics_pair_the_repetitions_and_apply_the_doubling_rule():
    from pipeline.sweep.stats import cell_summary, verdict

    def rec(errs):
        return {"arms": {a: {"top1_error": e, "val_error": e} for a, e in errs.items()}}

    records = {r: rec({"baseline": 0.30 + d, "augmented": 0.27 + d + 0.004 * (r - 2),
                       "baseline-2x": 0.30 + d, "augmented-2x": 0.27 + d + 0.002 * (r - 2)})
               for r, d in enumerate([0.0, 0.01, -0.01, 0.02, 0.0])}
    s = cell_summary(records, [("augmented", "baseline"), ("pool-oracle", "baseline")])
    e = s["pairs"]["augmented - baseline"]["test"]
    assert e["diff"]["mean"] == pytest.approx(3.0) and e["diff"]["n"] == 5
    assert e["doubling"]["converged"] is True and verdict(e) == "gain"
    assert "pool-oracle - baseline" not in s["pairs"]  # never run: no row, no invented figure
    moved = {r: rec({"baseline": 0.30, "augmented": 0.29 + 0.001 * r, "baseline-2x": 0.25})
             for r in range(3)}
    e = cell_summary(moved, [("augmented", "baseline")])["pairs"]["augmented - baseline"]["test"]
    assert e["doubling"]["converged"] is False and verdict(e).endswith("unconverged")


def _tiny_sweep(tmp_path, base, folder_images) -> dict:
    """A two-cell sweep spec on the tiny image folder and tiny base (seconds per run)."""
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "dataset": "image-folder", "dataset_root": str(folder_images),
        "base_model": str(base), "encoder": "efficientnet-lite0@64",
        "adapter": {"context_dim": 32, "head_dim": 16},
        "tuning": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "sampling": {"per_condition": 2, "num_inference_steps": 2, "chunk_conditions": 1,
                     "batch_size": 8},
        "ssl": {"steps": 4, "batch_size": 4, "mu": 1, "eval_every": 2, "checkpoint_every": 2,
                "net": "cnn-tiny", "bn_calibration": 16},
        "quality": {"enabled": False}, "device": "cpu"}))
    return {
        "name": "tiny", "preset": str(preset), "set": {"labels_per_class": 2},
        "grid": {"ssl.unlabeled_pool": [0, 4]},
        "rules": [{"when": {"ssl.unlabeled_pool": 0},
                   "set": {"ssl.arms": ["supervised", "supervised+synthetic"]}},
                  {"when": {"ssl.unlabeled_pool": 4},
                   "set": {"ssl.arms": ["baseline", "augmented", "baseline-2x"]}}],
        "repetitions": [0, 1, 2], "pairs": [["augmented", "baseline"],
                                            ["supervised+synthetic", "supervised"]]}


def test_sweep_runs_reuses_and_reports(tmp_path, flow_tiny_base, flow_image_folder,
                                       monkeypatch):
    """A two-cell sweep on the tiny image folder: every repetition runs the pipeline's
    stages and arms, the report holds a heatmap per pair, and a rerun reads the records."""
    from pipeline.sweep import run as sweep_run
    from pipeline.sweep.report import build_sweep_report
    from pipeline.sweep.spec import SweepSpec

    spec = SweepSpec.model_validate(_tiny_sweep(tmp_path, flow_tiny_base, flow_image_folder))
    folder = tmp_path / "sweep"
    extra = {"runs_dir": str(folder / "runs"), "progress": False}
    for r in spec.repetitions:
        for cell in spec.cells():
            rec = sweep_run.run_cell_repetition(spec, cell, r, folder, extra, log=lambda _: None)
            assert set(rec["arms"]) == set(cell.overrides["ssl.arms"])
    out = build_sweep_report(spec, folder)
    summary = json.loads(out["summary"].read_text())
    pool_cell, sup_cell = (summary["cells"][c.slug] for c in spec.cells()[::-1])
    assert pool_cell["pairs"]["augmented - baseline"]["test"]["diff"]["n"] == 3
    assert pool_cell["pairs"]["augmented - baseline"]["test"]["doubling"] is not None
    assert sup_cell["pairs"]["supervised+synthetic - supervised"]["test"]["diff"]["n"] == 3
    html = out["html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and "6 of 6 planned" in html
    assert "supervised+synthetic - supervised" in out["md"].read_text()

    def fail(*a, **k):
        raise AssertionError("a finished repetition ran again")

    monkeypatch.setattr(sweep_run, "run_repetition", fail)
    for cell in spec.cells():
        sweep_run.run_cell_repetition(spec, cell, 0, folder, extra)


@pytest.mark.slow
def test_augment_sweep_command_runs_the_prefect_flow(flow_prefect, tmp_path, flow_tiny_base,
                                                     flow_image_folder, capsys):
    """`augment sweep SPEC.yaml`: the dry run validates every cell, the flow runs every
    repetition as a Prefect task (two worker processes) and writes the report; a rerun runs
    nothing again."""
    from flows.cli import main

    spec = {**_tiny_sweep(tmp_path, flow_tiny_base, flow_image_folder), "parallel": 2}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    assert main(["sweep", str(path), "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells x 3 repetitions = 6 runs" in out and not (runs / "sweeps").exists()
    assert main(["sweep", str(path), "--runs-dir", str(runs)]) == 0
    folder = runs / "sweeps" / "tiny"
    assert len(list((folder / "cells").glob("*/rep-*.json"))) == 6
    assert (folder / "report.html").exists() and (folder / "summary.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (folder / "cells").glob("*/rep-*.json")}
    assert main(["sweep", str(path), "--runs-dir", str(runs)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in (folder / "cells").glob("*/rep-*.json")}
    bad = dict(spec, grid={"ssl.unlabeled_pool": [0, 4], "bogus": [1]})
    path.write_text(yaml.safe_dump(bad))
    assert main(["sweep", str(path), "--runs-dir", str(runs), "--dry-run"]) == 2
    assert "bogus" in capsys.readouterr().err


# --------------------------------------------------------------------------- the run report


def test_run_without_a_pool_leads_with_supervised_synthetic_and_names_its_map_cell(
        tmp_path, monkeypatch):
    """A run with the supervised arms only: the verdict compares supervised+synthetic with
    supervised, the doubling rule reads supervised-2x, and the shipped gain map places it."""
    from report_fixtures import fabricated_run

    from pipeline.report import gain_map as gain_map_mod
    from pipeline.report.build import build_run_report

    errors = {"supervised": [0.40, 0.41, 0.42], "supervised+synthetic": [0.35, 0.355, 0.37],
              "supervised-2x": [0.401, 0.409, 0.421],
              "supervised+synthetic-2x": [0.352, 0.356, 0.368]}
    run = fabricated_run(tmp_path, errors, config_extra={
        "task_images": "task-half", "ssl": {"arms": list(errors), "seeds": [0, 1, 2],
                                            "unlabeled_pool": 0, "steps": 100}})
    cell = {"point": {"labels_per_class": 4, "ssl.unlabeled_pool": 0},
            "label": "labels_per_class=4, ssl.unlabeled_pool=0",
            "pairs": {"supervised+synthetic - supervised": {"test": {
                "diff": {"mean": 5.1, "ci_low": 3.0, "ci_high": 7.2, "n": 5},
                "doubling": {"converged": True}}}}}
    other = {**cell, "point": {"labels_per_class": 1, "ssl.unlabeled_pool": 0},
             "label": "labels_per_class=1, ssl.unlabeled_pool=0"}
    gain_map = tmp_path / "map.json"
    gain_map.write_text(json.dumps({"spec": {"set": {"task_images": "task-half"}},
                                    "cells": {"a": cell, "b": other}}))
    monkeypatch.setattr(gain_map_mod, "GAIN_MAP", gain_map)
    md = build_run_report(run)[1].read_text()
    assert "Supervised+synthetic minus supervised error over 3 paired runs" in md
    assert "moved the supervised's test error" in md
    assert "sits in the gain map's cell labels_per_class=4, ssl.unlabeled_pool=0" in md
    assert "labels_per_class=1, ssl.unlabeled_pool=0: supervised+synthetic - supervised " \
           "+5.10 points (95% CI +3.00 to +7.20) over 5 repetitions, converged" in md
    gain_map.unlink()
    assert "gain map" not in build_run_report(run)[1].read_text()


def test_only_cuts_the_grid_to_the_same_cells(tmp_path):
    from pipeline.sweep.spec import SweepError

    spec = _spec(tmp_path)
    cut = spec.only({"ssl.unlabeled_pool": 0})
    assert [c.slug for c in cut.cells()] == [c.slug for c in spec.cells()
                                             if c.point["ssl.unlabeled_pool"] == 0]
    with pytest.raises(SweepError, match="not one of its values"):
        spec.only({"ssl.unlabeled_pool": 7})
    with pytest.raises(SweepError, match="not a grid key"):
        spec.only({"seed": 0})

