"""The demo runs in a cell of the shipped gain map, at the map's budget, and its report cites
the map's doubling check for that budget (issue 29, item 5)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.paths import SWEEPS_DIR
from pipeline.stages.keys import ssl_unit_key, stage_keys

SUMMARY = SWEEPS_DIR / "gain-map.summary.json"
CELL = {"labels_per_class": 1, "ssl.unlabeled_pool": 0}


def _cell(summary: dict, point: dict) -> dict:
    return next(c for c in summary["cells"].values() if c["point"] == point)


def test_demo_seed_0_units_are_the_map_cells_repetition_0():
    """Seed 0 of the demo's arms has the unit keys of repetition 0 of the map's 1-label,
    no-pool cell: the same split, base, synthetic rows, trainer settings and steps. A change
    to the demo preset that leaves the map's cell breaks this, and the report's claim with it."""
    demo = load_config("demo")
    keys = stage_keys(demo)
    rep0 = _cell(json.loads(SUMMARY.read_text()), CELL)["unit_keys"]["0"]
    for arm in demo.ssl.arms:
        assert ssl_unit_key(demo, keys, arm, 0) == rep0[arm], arm
    assert demo.ssl.seeds[0] == 0 and len(demo.ssl.seeds) >= 3  # >= 3 paired runs


def test_the_map_cell_behind_the_demo_is_converged_with_five_repetitions():
    """What the demo's report cites: the shipped map's doubling check for the demo's cell."""
    cell = _cell(json.loads(SUMMARY.read_text()), CELL)
    entry = cell["pairs"]["supervised+synthetic - supervised"]["test"]
    assert entry["diff"]["n"] >= 5 and entry["doubling"]["converged"] is True
    assert set(cell["unit_keys"]) == {str(r) for r in cell["reps"]}


def _map(tmp_path, doubling: dict | None, unit_key: str = "k-sup-0",
         synthetic_key: str = "k-syn-0"):
    from pipeline.report import gain_map

    cell = {"point": CELL, "label": "labels_per_class=1, ssl.unlabeled_pool=0", "reps": [0, 1],
            "unit_keys": {"0": {"supervised": "k-other"},
                          "1": {"supervised": unit_key, "supervised+synthetic": synthetic_key}},
            "pairs": {"supervised+synthetic - supervised": {"test": {
                "diff": {"mean": 10.9, "ci_low": 3.7, "ci_high": 18.0, "n": 5},
                "doubling": doubling}}}}
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"spec": {"set": {"task_images": "task-half"}},
                                "cells": {"c": cell}}))
    return path, gain_map


DOUBLED = {"baseline_k": 61.27, "baseline_2k": 61.58, "baseline_moved": 0.30,
           "baseline_converged": True, "tolerance": 0.5, "converged": True, "gain_stable": True,
           "gain_k": {"ci_low": 3.70, "ci_high": 18.04}, "gain_2k": {"mean": 10.48}}


@pytest.fixture
def no_2x_run(tmp_path):
    """A run with the supervised pair only (no -2x arms), seed 0's supervised unit keyed."""
    from report_fixtures import fabricated_run, write_json

    errors = {"supervised": [0.67, 0.66, 0.69], "supervised+synthetic": [0.56, 0.54, 0.56]}
    run = fabricated_run(tmp_path, errors, config_extra={
        "task_images": "task-half", "labels_per_class": 1,
        "ssl": {"arms": list(errors), "seeds": [0, 1, 2], "unlabeled_pool": 0, "steps": 2048}})
    write_json(run / "ssl" / "supervised" / "seed-0" / "unit.json", {"key": "k-sup-0"})
    return run


def test_a_run_that_is_a_map_repetition_cites_the_maps_doubling(tmp_path, no_2x_run,
                                                                  monkeypatch):
    from pipeline.report.build import build_run_report

    path, gain_map = _map(tmp_path, DOUBLED)
    monkeypatch.setattr(gain_map, "GAIN_MAP", path)
    md = build_run_report(no_2x_run)[1].read_text()
    assert "its supervised unit for seed 0 is repetition 1 of the gain map's cell " \
           "labels_per_class=1, ssl.unlabeled_pool=0" in md
    assert "from 61.27% to 61.58% (+0.30 points, under 0.5)" in md
    assert "+10.48 accuracy points, inside the 95% interval at this budget (+3.70 to +18.04)" \
        in md
    assert "This budget is converged by the map's check." in md
    assert "Convergence was not checked" not in md


@pytest.mark.parametrize("doubling, key, expected", [
    (DOUBLED, "k-elsewhere", "Convergence was not checked"),   # not a map repetition
    (None, "k-sup-0", "Convergence was not checked"),          # the map did not double it
    ({**DOUBLED, "baseline_moved": 0.9, "baseline_converged": False, "converged": False},
     "k-sup-0", "By the map's check this budget is not converged"),
])
def test_the_map_is_cited_only_for_the_same_unit_and_as_it_found(tmp_path, no_2x_run,
                                                                 monkeypatch, doubling, key,
                                                                 expected):
    from pipeline.report.build import build_run_report

    path, gain_map = _map(tmp_path, doubling, unit_key=key)
    monkeypatch.setattr(gain_map, "GAIN_MAP", path)
    md = build_run_report(no_2x_run)[1].read_text()
    assert expected in md
    if expected.startswith("Convergence"):
        assert "did not double its budget, but" not in md


@pytest.mark.parametrize("synthetic_key, cited", [("k-syn-0", True), ("k-syn-other", False)])
def test_the_arm_must_be_the_maps_too_where_it_is_keyed(tmp_path, no_2x_run, monkeypatch,
                                                        synthetic_key, cited):
    """The same supervised unit beside other synthetic rows is another comparison: the map's
    gain check is cited only when the run's supervised+synthetic unit is the map's as well."""
    from report_fixtures import write_json

    from pipeline.report.build import build_run_report

    write_json(no_2x_run / "ssl" / "supervised+synthetic" / "seed-0" / "unit.json",
               {"key": "k-syn-0"})
    path, gain_map = _map(tmp_path, DOUBLED, synthetic_key=synthetic_key)
    monkeypatch.setattr(gain_map, "GAIN_MAP", path)
    md = build_run_report(no_2x_run)[1].read_text()
    assert ("its supervised and supervised+synthetic units for seed 0 are repetition 1"
            in md) is cited
    assert ("Convergence was not checked" in md) is not cited
