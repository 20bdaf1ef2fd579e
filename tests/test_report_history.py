"""Benchmark history: one row per run, idempotent appends, a rendered trend page."""

import json
import shutil

import pandas as pd
import pytest

from pipeline.report.history import append_history, read_history, render_history

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.


def test_history_appends_one_row_per_run_and_renders(report_run, tmp_path):
    hist = tmp_path / "bench" / "history.parquet"
    row = append_history(hist, report_run, commit="1234567abc")
    append_history(hist, report_run, commit="1234567abc")  # re-reported: replaced, not added
    assert len(read_history(hist)) == 1
    errs = [json.loads(p.read_text())["top1_error"]
            for p in report_run.glob("ssl/augmented/seed-*/metrics.json")]
    assert row["error_augmented_pct"] == pytest.approx(100 * sum(errs) / len(errs))
    assert row["commit"] == "1234567abc" and row["preset"] == "report-test"
    base = {json.loads(p.read_text())["seed"]: json.loads(p.read_text())["top1_error"]
            for p in report_run.glob("ssl/baseline/seed-*/metrics.json")}
    aug = {json.loads(p.read_text())["seed"]: json.loads(p.read_text())["top1_error"]
           for p in report_run.glob("ssl/augmented/seed-*/metrics.json")}
    sup = [json.loads(p.read_text())["top1_error"]
           for p in report_run.glob("ssl/supervised/seed-*/metrics.json")]
    assert aug != base  # two arms with their own errors
    assert row["delta_pp"] == pytest.approx(100 * sum(aug[s] - base[s] for s in base) / 2,
                                            abs=1e-4)
    assert row["delta_n"] == 2 and row["delta_ci_low_pp"] is None  # 2 seeds: no interval
    assert row["vs_control_n"] == 0 and row["vs_control_pp"] is None  # no control arm here
    assert row["budget_short"] == (sum(base.values()) >= sum(sup))
    stage = json.loads((report_run / "stages" / "sample.json").read_text())
    assert row["wall_sample_s"] == stage["wall_s"]
    assert row["sampling_images_per_s"] == stage["metrics"]["images_per_s"]

    later = tmp_path / "runs" / "report-test-later"
    shutil.copytree(report_run, later)
    rec = json.loads((later / "stages" / "ssl.json").read_text())
    rec["finished"] += 86400  # the next night's run
    (later / "stages" / "ssl.json").write_text(json.dumps(rec))
    append_history(hist, later)  # commit from the run's config.json versions
    table = read_history(hist)
    assert len(table) == 2 and list(table["commit"]) == ["1234567abc", "abc1234def"]
    assert pd.Series(table["date"]).is_monotonic_increasing

    out = render_history(hist, tmp_path / "page")
    html = out.read_text()
    assert html.count("<img") == 3 and "report-test" in html
    assert (tmp_path / "page" / "history.md").exists()


def test_render_history_without_rows_says_how_to_make_them(tmp_path):
    with pytest.raises(ValueError, match="append_history"):
        render_history(tmp_path / "none.parquet", tmp_path)
