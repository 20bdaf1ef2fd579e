"""Ablation report: finds the varied parameter, tabulates runs by it, plots against it."""

import csv
import json
import shutil

import pytest

from pipeline.report_ablation import build_ablation_report, varied_keys

# The report_* fixtures (a tiny real run directory, fabricated arms) live in
# report_fixtures.py.
pytest_plugins = ["report_fixtures"]


# Per-arm shifts of a variant's errors, so no two runs (and no two arms) share metrics.
SHIFT = {"supervised": 0.010, "baseline": -0.020, "augmented": -0.050}


def _variant(src, root, guidance: float, keep_ssl: bool = True):
    """A copy of the run whose config differs in sampling.guidance (and its hash/name), and
    whose SSL errors are moved by guidance x SHIFT[arm] (seed s moves by another 0.001 s)."""
    cfg = json.loads((src / "config.json").read_text())
    cfg["sampling"]["guidance"] = guidance
    cfg["config_hash"] = f"{int(guidance * 100):08d}" + cfg["config_hash"][8:]
    cfg["versions"]["git_commit"] = f"commit-{guidance}"  # must not count as varied
    dst = root / f"report-test-{cfg['config_hash'][:8]}"
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    if not keep_ssl:
        shutil.rmtree(dst / "ssl")
    for path in dst.glob("ssl/*/seed-*/metrics.json"):
        m = json.loads(path.read_text())
        m["top1_error"] += guidance * SHIFT[m["arm"]] + 0.001 * m["seed"]
        path.write_text(json.dumps(m))
    return dst


def _errors(run, arm):
    return {json.loads(p.read_text())["seed"]: json.loads(p.read_text())["top1_error"]
            for p in run.glob(f"ssl/{arm}/seed-*/metrics.json")}


def test_ablation_over_a_varied_parameter(report_run, tmp_path):
    runs = [_variant(report_run, tmp_path, g) for g in (3.0, 1.0)]
    runs.append(_variant(report_run, tmp_path, 2.0, keep_ssl=False))
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    assert varied_keys(configs) == ["sampling.guidance"]
    assert _errors(runs[0], "baseline") != _errors(runs[1], "baseline")  # the runs differ
    out = build_ablation_report(runs, tmp_path / "ablation")
    rows = list(csv.DictReader((tmp_path / "ablation" / "ablation.csv").open()))
    assert [float(r["sampling.guidance"]) for r in rows] == [1.0, 2.0, 3.0]  # sorted on x
    by_run = {r["run"]: r for r in rows}
    for run in (runs[1], runs[0]):  # each row holds its own run's figures
        row = by_run[run.name]
        for arm in ("supervised", "baseline", "augmented"):
            errs = _errors(run, arm)
            assert float(row[f"{arm}_error_pct"]) == pytest.approx(
                100 * sum(errs.values()) / len(errs), abs=1e-4)
        aug, base = _errors(run, "augmented"), _errors(run, "baseline")
        diffs = [aug[s] - base[s] for s in base]
        assert float(row["delta_pp"]) == pytest.approx(100 * sum(diffs) / 2, abs=1e-4)
        assert row["delta_n"] == "2" and row["delta_ci_low_pp"] == ""  # n<3: no interval
        sup = _errors(run, "supervised")
        assert row["budget_short"] == str(sum(base.values()) >= sum(sup.values()))
    # guidance 3 lowers augmented by 0.10 and baseline by 0.04 more than guidance 1 does
    assert float(rows[2]["delta_pp"]) - float(rows[0]["delta_pp"]) == pytest.approx(-6.0,
                                                                                    abs=1e-3)
    assert rows[1]["baseline_error_pct"] == ""  # that run's SSL did not run
    html = out.read_text()
    assert html.count("<img") == 4  # errors, difference, quality, KID
    assert "not run" in html and "sampling.guidance" in html
    md = (tmp_path / "ablation" / "ablation.md").read_text()
    assert md.count("\n| report-test-") == 3
    assert "too few to say whether the synthetic data helped" in md
    assert "lowered" not in md and "raised" not in md


def test_ablation_paired_columns_with_three_seeds(tmp_path):
    from report_fixtures import fabricated_run

    base, sup = [0.40, 0.42, 0.38], [0.50, 0.52, 0.51]
    runs = [fabricated_run(tmp_path, {"supervised": sup, "baseline": base,
                                      "augmented": [b + d for b, d in zip(base, diffs,
                                                                          strict=True)]},
                           name=f"fab-{i}{i}{i}{i}{i}{i}{i}{i}",
                           config_extra={"sampling": {"guidance": float(i)}})
            for i, diffs in ((1, [-0.05, -0.06, -0.04]), (2, [0.05, -0.04, 0.0]))]
    build_ablation_report(runs, tmp_path / "ablation")
    rows = list(csv.DictReader((tmp_path / "ablation" / "ablation.csv").open()))
    for row, diffs in zip(rows, ([-0.05, -0.06, -0.04], [0.05, -0.04, 0.0]), strict=True):
        mean = sum(diffs) / 3
        sem = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5
        assert row["delta_n"] == "3"
        assert float(row["delta_pp"]) == pytest.approx(100 * mean, abs=1e-3)
        assert float(row["delta_ci_low_pp"]) == pytest.approx(100 * (mean - 4.302653 * sem),
                                                              abs=1e-3)
        assert float(row["delta_ci_high_pp"]) == pytest.approx(100 * (mean + 4.302653 * sem),
                                                               abs=1e-3)
        assert row["budget_short"] == "False"
    assert float(rows[0]["delta_ci_high_pp"]) < 0 < float(rows[1]["delta_ci_high_pp"])


def test_ablation_vary_must_name_a_config_key(report_run, tmp_path):
    with pytest.raises(ValueError, match="not a config key"):
        build_ablation_report([report_run], tmp_path, vary="sampling.guidnce")
    with pytest.raises(ValueError, match="at least one"):
        build_ablation_report([], tmp_path)
