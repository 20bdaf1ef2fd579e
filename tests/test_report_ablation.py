"""Ablation report: finds the varied parameter, tabulates runs by it, plots against it."""

import csv
import json
import shutil

import pytest

from pipeline.report_ablation import build_ablation_report, varied_keys

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.
pytest_plugins = ["report_fixtures"]


def _variant(src, root, guidance: float, keep_ssl: bool = True):
    """A copy of the run whose config differs in sampling.guidance (and its hash/name)."""
    cfg = json.loads((src / "config.json").read_text())
    cfg["sampling"]["guidance"] = guidance
    cfg["config_hash"] = f"{int(guidance * 100):08d}" + cfg["config_hash"][8:]
    cfg["versions"]["git_commit"] = f"commit-{guidance}"  # must not count as varied
    dst = root / f"report-test-{cfg['config_hash'][:8]}"
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    if not keep_ssl:
        shutil.rmtree(dst / "ssl")
    return dst


def test_ablation_over_a_varied_parameter(report_run, tmp_path):
    runs = [_variant(report_run, tmp_path, g) for g in (3.0, 1.0)]
    runs.append(_variant(report_run, tmp_path, 2.0, keep_ssl=False))
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert varied_keys(configs) == ["sampling.guidance"]
    out = build_ablation_report(runs, tmp_path / "ablation")
    rows = list(csv.DictReader((tmp_path / "ablation" / "ablation.csv").open()))
    assert [float(r["sampling.guidance"]) for r in rows] == [1.0, 2.0, 3.0]  # sorted on x
    metrics = [json.loads(p.read_text())["top1_error"]
               for p in report_run.glob("ssl/baseline/seed-*/metrics.json")]
    assert float(rows[0]["baseline_error_pct"]) == pytest.approx(
        100 * sum(metrics) / len(metrics), abs=1e-4)
    assert rows[1]["baseline_error_pct"] == ""  # that run's SSL did not run
    html = out.read_text()
    assert html.count("<img") == 4  # errors, difference, quality, KID
    assert "not run" in html and "sampling.guidance" in html
    assert (tmp_path / "ablation" / "ablation.md").read_text().count("\n| report-test-") == 3


def test_ablation_vary_must_name_a_config_key(report_run, tmp_path):
    with pytest.raises(ValueError, match="not a config key"):
        build_ablation_report([report_run], tmp_path, vary="sampling.guidnce")
    with pytest.raises(ValueError, match="at least one"):
        build_ablation_report([], tmp_path)
