"""Ablation report: finds the varied parameter, tabulates runs by it, plots against it."""

import csv
import json
import shutil

import pytest

from pipeline.report.ablation import build_ablation_report, varied_keys

# Fabricated runs (report_fixtures.fabricated_run): metrics.json files with chosen errors,
# so every figure a row shows has a known answer and belongs to one run only.


# Three runs that differ in sampling.guidance, each with its own hand-picked figures: per-seed
# errors of every arm (two seeds), quality and sampling speed. guidance 2.0 has no SSL.
RUNS = {
    3.0: {"errors": {"supervised": [0.30, 0.34], "baseline": [0.25, 0.29],
                     "augmented": [0.21, 0.24], "control": [0.23, 0.28]},
          "quality": {"kid": 0.031, "label_consistency": 0.81, "diversity_synthetic": 0.41,
                      "within_condition_diversity": 0.21}, "images_per_s": 3.5},
    1.0: {"errors": {"supervised": [0.40, 0.44], "baseline": [0.42, 0.47],
                     "augmented": [0.45, 0.43], "control": [0.44, 0.49]},
          "quality": {"kid": 0.011, "label_consistency": 0.61, "diversity_synthetic": 0.22,
                      "within_condition_diversity": 0.12}, "images_per_s": 1.5},
    2.0: {"errors": None,
          "quality": {"kid": 0.022, "label_consistency": 0.72, "diversity_synthetic": 0.33,
                      "within_condition_diversity": 0.17}, "images_per_s": 2.5},
}


def _run(root, digit: int, guidance: float):
    from report_fixtures import fabricated_run, stage_record, write_json

    spec = RUNS[guidance]
    # The run without SSL is configured like the others (same arms and seeds), then loses ssl/.
    errors = spec["errors"] or {arm: [0.5, 0.5] for arm in RUNS[3.0]["errors"]}
    run = fabricated_run(root, errors, name=f"abl-{str(digit) * 8}",
                         config_extra={"sampling": {"guidance": guidance},
                                       "versions": {"git_commit": f"c{digit}"}})
    if spec["errors"] is None:
        shutil.rmtree(run / "ssl")
    write_json(run / "quality" / "quality.json", {"overall": spec["quality"]})
    stage_record(run, "sample", 10.0, {"samples": []}, {"images_per_s": spec["images_per_s"]})
    return run


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    m = _mean(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def test_ablation_over_a_varied_parameter(tmp_path):
    # Made out of order (3, 1, 2), so a row that keeps its position but not its run shows.
    runs = {g: _run(tmp_path, d, g) for d, g in ((7, 3.0), (4, 1.0), (5, 2.0))}
    configs = [json.loads((r / "config.json").read_text()) for r in runs.values()]
    assert varied_keys(configs) == ["sampling.guidance"]  # versions.* never counts
    out = build_ablation_report(list(runs.values()), tmp_path / "ablation")
    rows = list(csv.DictReader((tmp_path / "ablation" / "ablation.csv").open()))
    assert [r["run"] for r in rows] == [runs[g].name for g in (1.0, 2.0, 3.0)]  # sorted on x
    for row, g in zip(rows, (1.0, 2.0, 3.0), strict=True):
        spec = RUNS[g]
        assert float(row["sampling.guidance"]) == g
        for key, value in spec["quality"].items():
            assert float(row[key]) == value, (g, key)
        assert float(row["sampling_images_per_s"]) == spec["images_per_s"]
        errors = spec["errors"]
        if errors is None:  # its SSL did not run: blanks, not another run's figures
            assert all(row[f"{a}_error_pct"] == "" and row[f"{a}_seeds"] == "0"
                       for a in ("supervised", "baseline", "augmented", "control"))
            assert row["delta_pp"] == row["vs_control_pp"] == row["budget_short"] == ""
            continue
        for arm, errs in errors.items():
            assert float(row[f"{arm}_error_pct"]) == pytest.approx(100 * _mean(errs), abs=1e-4)
            assert float(row[f"{arm}_std_pct"]) == pytest.approx(100 * _std(errs), abs=1e-4)
            assert row[f"{arm}_seeds"] == "2"
        for prefix, against in (("delta", "baseline"), ("vs_control", "control")):
            diffs = [a - b for a, b in zip(errors["augmented"], errors[against], strict=True)]
            assert float(row[f"{prefix}_pp"]) == pytest.approx(100 * _mean(diffs), abs=1e-4)
            assert row[f"{prefix}_n"] == "2" and row[f"{prefix}_ci_low_pp"] == ""  # n<3
        assert row["budget_short"] == str(_mean(errors["baseline"]) >= _mean(errors["supervised"]))
    assert [r["budget_short"] for r in rows] == ["True", "", "False"]
    html = out.read_text()
    assert html.count("<img") == 4  # errors, difference, quality, KID
    assert "sampling.guidance" in html
    md = (tmp_path / "ablation" / "ablation.md").read_text()
    md_rows = [line for line in md.splitlines() if line.startswith("| abl-")]
    assert [line.split(" | ")[0] for line in md_rows] == [f"| {r['run']}" for r in rows]
    for line, g in zip(md_rows, (1.0, 2.0, 3.0), strict=True):
        assert f" {RUNS[g]['quality']['kid']:.4g} " in line
        assert f" {RUNS[g]['images_per_s']:.4g} " in line
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


def test_ablation_vary_must_name_a_config_key(tmp_path):
    with pytest.raises(ValueError, match="not a config key"):
        build_ablation_report([_run(tmp_path, 1, 1.0)], tmp_path, vary="sampling.guidnce")
    with pytest.raises(ValueError, match="at least one"):
        build_ablation_report([], tmp_path)
