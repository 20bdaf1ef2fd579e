"""The run report: numbers equal the stage outputs, it renders in a real browser, gaps read
"not run"."""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.report.build import artifacts, build_run_report, markdown_summary
from pipeline.report.tables import results_table

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.

_DIRECTION = re.compile(r"lowered|raised", re.IGNORECASE)
T_975_DF2 = 4.302653  # Student t 97.5% quantile, 2 degrees of freedom



class _Attrs(HTMLParser):
    """Collects the attributes of every element that carries data-value."""

    def __init__(self):
        super().__init__()
        self.values: list[dict] = []
        self.body: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-value" in a:
            self.values.append(a)
        if tag == "body":
            self.body = a


def _parse(html: str) -> _Attrs:
    p = _Attrs()
    p.feed(html)
    return p


def _metrics(run_dir: Path) -> dict[tuple[str, int], dict]:
    return {(p.parent.parent.name, int(p.parent.name.split("-")[1])): json.loads(p.read_text())
            for p in run_dir.glob("ssl/*/seed-*/metrics.json")}


def test_report_errors_equal_the_metrics_files(report_run_copy):
    html_path, md_path = build_run_report(report_run_copy)
    metrics = _metrics(report_run_copy)
    assert len(metrics) == 6  # 3 arms x 2 seeds
    attrs = _parse(html_path.read_text()).values
    per_seed = {(a["data-arm"], int(a["data-seed"])): float(a["data-value"])
                for a in attrs if "data-seed" in a}
    assert per_seed == {k: m["top1_error"] for k, m in metrics.items()}  # exact, not rounded
    means = {a["data-arm"]: float(a["data-value"]) for a in attrs
             if a.get("data-metric") == "mean_top1_error"}
    for arm in ("supervised", "baseline", "augmented"):
        errs = [m["top1_error"] for (a, _), m in metrics.items() if a == arm]
        assert means[arm] == pytest.approx(np.mean(errs), abs=1e-12)
    diff = next(float(a["data-value"]) for a in attrs
                if a.get("data-comparison") == "augmented-baseline")
    paired = [metrics[("augmented", s)]["top1_error"] - metrics[("baseline", s)]["top1_error"]
              for s in (0, 1)]
    assert diff == pytest.approx(np.mean(paired), abs=1e-12)
    md = md_path.read_text()
    for m in metrics.values():  # the Markdown shows each seed's error as written
        assert f"{100 * m['top1_error']:.2f}%" in md
    table = {r["arm"]: r for r in results_table(report_run_copy)}
    assert table["baseline"]["error_pct"] == round(100 * means["baseline"], 4)
    assert table["baseline"]["n_seeds"] == 2 and table["augmented"]["std_pct"] is not None
    # Two seeds: the per-seed figures, no direction, no interval.
    assert table["augmented"]["delta_n"] == 2 and table["augmented"]["delta_ci_low_pp"] is None
    assert "2 paired runs are too few to say whether the synthetic data helped" in md
    assert not _DIRECTION.search(md) and not _DIRECTION.search(html_path.read_text())


def test_report_renders_in_headless_chromium(report_run_copy, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (scripts/system-deps.sh)")
        pytest.skip("chromium not installed (Debian package `chromium`; CI installs it)")
    html_path, _ = build_run_report(report_run_copy)
    html = html_path.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    n_img = len(re.findall(r"<img\b", html))
    assert n_img >= 10 + 1 + 1 + 3 + 1  # grids, curves, per-class, confusions, tuning loss
    # REPORT_SCREENSHOT_DIR keeps the picture for a person to look at; by default it is temporary.
    shot_dir = Path(os.environ.get("REPORT_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "run-report.png"
    shot.unlink(missing_ok=True)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000",
            "--virtual-time-budget=5000"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    body = _parse(dom).body
    assert body.get("data-ready") == "1", "the page's load handler did not run"
    assert int(body["data-images-total"]) == n_img
    assert int(body["data-images-loaded"]) == n_img  # every embedded PNG decoded
    assert int(body["data-tables"]) >= 8
    subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2000, 1280)
    assert (pixels < 128).mean() > 0.01  # text, tables and figures drawn, not a blank page


def test_missing_stage_outputs_render_as_not_run(report_run, tmp_path):
    run = tmp_path / report_run.name
    (run / "stages").mkdir(parents=True)
    shutil.copy(report_run / "config.json", run / "config.json")
    shutil.copy(report_run / "split.parquet", run / "split.parquet")
    shutil.copy(report_run / "stages" / "split.json", run / "stages" / "split.json")
    html_path, md_path = build_run_report(run)
    html, md = html_path.read_text(), md_path.read_text()
    assert "Augmented vs baseline: not run" in html
    for section in ("Quality: <span class=\"notrun\">not run</span>",
                    "Shards: <span class=\"notrun\">not run</span>"):
        assert section in html
    assert html.count('class="pill notrun"') >= 6  # every stage after split
    assert "not run" in md and "Quality: not run" in md
    rows = {r["arm"]: r for r in results_table(run)}
    assert rows["augmented"]["status"] == "not run" and rows["augmented"]["error_pct"] is None
    # A running arm (no metrics.json yet) is not a result; a finished one shows alone.
    shutil.copytree(report_run / "ssl" / "baseline", run / "ssl" / "baseline")
    (run / "ssl" / "augmented" / "seed-0").mkdir(parents=True)
    html = build_run_report(run)[0].read_text()
    assert "finished SSL arms: baseline" in html


def test_a_bare_directory_still_renders(tmp_path):
    html_path, _ = build_run_report(tmp_path)
    html = html_path.read_text()
    assert "config.json missing" in html and "not run" in html
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_run_report(tmp_path / "nope")


def test_artifacts_for_prefect(report_run):
    md, table = artifacts(report_run)
    assert md == markdown_summary(report_run)
    assert md.startswith("# report-test: run")
    assert [r["arm"] for r in table] == ["supervised", "baseline", "augmented"]
    assert all(set(r) >= {"arm", "error_pct", "std_pct", "n_seeds", "delta_vs_baseline_pp"}
               for r in table)
    json.dumps(table)  # plain JSON values, as create_table_artifact needs


def test_report_says_how_many_samples_the_filter_kept(report_run_copy):
    from report_fixtures import stage_record

    html = build_run_report(report_run_copy)[0].read_text()
    assert "The filter (" not in html  # no filter, no sentence
    rows = json.loads((report_run_copy / "stages" / "shards.json").read_text())["metrics"]["rows"]
    stage_record(report_run_copy, "shards", 0.8, {"shards": "shards"},
                 {"rows": rows, "filter": "prototype", "rows_sampled": 2 * rows,
                  "kept_share": 0.5})
    html = build_run_report(report_run_copy)[0].read_text()
    assert f"The filter (prototype) kept them out of {2 * rows} samples (50%)" in html


# --------------------------------------------------------------------------- the headline
# Fabricated arms (metrics.json with chosen errors): every expected figure is computed here
# by hand, not with pipeline.evaluate.paired.


def _signed_pp(x: float) -> str:
    v = 100 * x
    return f"{'+' if v > 0 else '−' if v < 0 else '±'}{abs(v):.2f}"


def _hand_paired(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """mean, CI low, CI high, two-sided p of a - b over 3 pairs (t with 2 df, closed form)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 3
    sd = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5
    sem = sd / 3 ** 0.5
    t = abs(mean / sem)
    p = 1 - t / (2 + t * t) ** 0.5  # 2 * (1 - F(t)), F the t(2) CDF
    return mean, mean - T_975_DF2 * sem, mean + T_975_DF2 * sem, p


def _power(a: list[float], b: list[float]) -> str:
    """The sentence's spread and detectable-difference clause (pipeline.evaluate.paired)."""
    from pipeline.evaluate.paired import detectable_difference

    d = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    sd = float(np.std(d, ddof=1))
    return (f"; SD of the differences {sd:.2f} pp, so {len(d)} paired runs detect a true "
            f"difference of {detectable_difference(sd, len(d)):.2f} pp or more with 80% power")


def _verdict_text(html: str) -> str:
    return re.search(r'id="verdict">(.*?)</div>', html, re.DOTALL).group(1)


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_paired_runs_state_no_direction(tmp_path, n):
    from report_fixtures import fabricated_run

    errors = {"supervised": [0.50, 0.52][:n], "baseline": [0.41, 0.43][:n],
              "augmented": [0.35, 0.36][:n]}
    assert all(a < b - 0.05 for a, b in zip(errors["augmented"], errors["baseline"]))
    html_path, md_path = build_run_report(fabricated_run(tmp_path, errors))
    html, md = html_path.read_text(), md_path.read_text()
    for text in (md, html):
        assert not _DIRECTION.search(text), "a direction stated from fewer than 3 pairs"
        runs = "1 paired run is" if n == 1 else f"{n} paired runs are"
        assert f"{runs} too few to say whether the synthetic data helped" in text
        assert "seed 0: augmented 35.00% vs baseline 41.00% error (−6.00 pp)" in text
    if n == 2:
        assert "seed 1: augmented 36.00% vs baseline 43.00% error (−7.00 pp)" in md
    assert "| augmented − baseline | " + str(n) + " | " in md
    assert re.search(r"\| augmented − baseline \| \d \| [^|]+ \| [^|]+ \| n<3 \| n<3 \|", md)
    cell = next(a for a in _parse(html).values
                if a.get("data-comparison") == "augmented-baseline")
    assert "data-ci-low" not in cell and int(cell["data-n"]) == n
    # The same arms with a third seed do state a direction: the wording above is the n rule.
    three = {"supervised": [0.50, 0.52, 0.51], "baseline": [0.41, 0.43, 0.42],
             "augmented": [0.35, 0.36, 0.34]}
    assert all(three[k][:n] == v for k, v in errors.items())
    md3 = build_run_report(fabricated_run(tmp_path, three, name="fab-33333333"))[1].read_text()
    assert "the synthetic data lowered the test error" in md3


BASE = [0.40, 0.42, 0.38]


@pytest.mark.parametrize("augmented,word", [
    ([0.35, 0.36, 0.34], "lowered"),   # diffs -5, -6, -4 points: CI below 0
    ([0.45, 0.47, 0.42], "raised"),    # +5, +5, +4: CI above 0
    ([0.35, 0.46, 0.38], None),        # -5, +4, 0: CI includes 0
])
def test_three_paired_runs_give_mean_ci_p_and_direction(tmp_path, augmented, word):
    from report_fixtures import fabricated_run

    errors = {"supervised": [0.50, 0.52, 0.51], "baseline": BASE, "augmented": augmented}
    assert augmented != BASE
    mean, lo, hi, p = _hand_paired(augmented, BASE)
    assert (lo < 0 < hi) == (word is None)  # the cases are what their names say
    html_path, md_path = build_run_report(fabricated_run(tmp_path, errors))
    html, md = html_path.read_text(), md_path.read_text()
    stats = (f"{_signed_pp(mean)} pp (95% CI {_signed_pp(lo)} to {_signed_pp(hi)} pp, "
             f"paired t-test p = {p:.3f}{_power(augmented, BASE)})")
    headline = f"Augmented minus baseline error over 3 paired runs: {stats}: "
    clause = {"lowered": "the synthetic data lowered the test error.",
              "raised": "the synthetic data raised the test error.",
              None: "no clear difference (the interval includes 0)."}[word]
    assert headline + clause in md
    assert (headline + clause).replace("'", "&#39;") in _verdict_text(html)
    other = {"lowered": "raised", "raised": "lowered", None: None}[word]
    for text in (md, html):
        assert "too few to say" not in text
        if other:
            assert other not in text
        if word is None:
            assert not _DIRECTION.search(text)
    cell = next(a for a in _parse(html).values
                if a.get("data-comparison") == "augmented-baseline")
    assert float(cell["data-ci-low"]) == pytest.approx(lo, abs=1e-6)
    assert float(cell["data-ci-high"]) == pytest.approx(hi, abs=1e-6)
    assert float(cell["data-p"]) == pytest.approx(p, abs=1e-6)
    assert "repetitions are training seeds on one labeled split and one set of synthetic " \
        "images (not independent splits)" in md
    row = {r["arm"]: r for r in results_table(md_path.parent)}["augmented"]
    assert row["delta_n"] == 3
    assert row["delta_ci_low_pp"] == pytest.approx(100 * lo, abs=1e-3)


@pytest.mark.parametrize("supervised,short", [
    ([0.4375, 0.5], False),      # mean 0.46875 > baseline 0.40625: FixMatch beat it
    ([0.40625, 0.40625], True),  # equal: not better
    ([0.3125, 0.375], True),     # supervised better
])
def test_budget_too_short_exactly_when_baseline_not_better(tmp_path, supervised, short):
    from report_fixtures import fabricated_run

    errors = {"supervised": supervised, "baseline": [0.375, 0.4375], "augmented": [0.25, 0.3125]}
    base_mean, sup_mean = sum(errors["baseline"]) / 2, sum(supervised) / 2
    assert (base_mean >= sup_mean) == short
    html_path, md_path = build_run_report(fabricated_run(tmp_path, errors))
    html, md = html_path.read_text(), md_path.read_text()
    sentence = ("The budget is too short for an SSL comparison: FixMatch has not beaten "
                f"supervised training (baseline {100 * base_mean:.2f}% vs supervised "
                f"{100 * sup_mean:.2f}% error)")
    for text in (md, html):
        assert (sentence in text) == short
        assert ("Augmented vs baseline (at a budget too short for an SSL comparison), 2 paired "
                "runs:" in text) == short
    assert ("| augmented − baseline | 2 | −12.50 pp | 0.00 pp | n<3 | n<3 | budget too short "
            "for an SSL comparison |" in md) == short
    assert ("| baseline − supervised |" in md) and ("baseline − supervised | 2 |" in md)
    assert not _DIRECTION.search(md)


def test_control_arm_in_tables_and_sentence(tmp_path):
    from report_fixtures import fabricated_run

    errors = {"supervised": [0.50, 0.52, 0.51], "baseline": BASE,
              "augmented": [0.35, 0.36, 0.34], "control": [0.37, 0.41, 0.36]}
    assert len({tuple(v) for v in errors.values()}) == 4  # every arm has its own errors
    html_path, md_path = build_run_report(fabricated_run(tmp_path, errors))
    html, md = html_path.read_text(), md_path.read_text()
    assert [r["arm"] for r in results_table(md_path.parent)] == \
        ["supervised", "baseline", "augmented", "control"]
    attrs = _parse(html).values
    means = {a["data-arm"]: float(a["data-value"]) for a in attrs
             if a.get("data-metric") == "mean_top1_error"}
    assert means["control"] == pytest.approx(sum(errors["control"]) / 3, abs=1e-12)
    comps = {a["data-comparison"]: a for a in attrs if "data-comparison" in a}
    assert {"augmented-baseline", "augmented-control", "baseline-supervised",
            "control-baseline"} <= set(comps)
    mean, lo, hi, p = _hand_paired(errors["augmented"], errors["control"])
    assert lo < 0 < hi
    assert float(comps["augmented-control"]["data-ci-low"]) == pytest.approx(lo, abs=1e-6)
    assert (f"| augmented − control | 3 | {_signed_pp(mean)} pp | 1.73 pp | {_signed_pp(lo)} "
            f"to {_signed_pp(hi)} pp | {p:.3f} |") in md
    assert (f"Augmented minus control error over 3 paired runs: {_signed_pp(mean)} pp (95% CI "
            f"{_signed_pp(lo)} to {_signed_pp(hi)} pp, paired t-test p = {p:.3f}"
            f"{_power(errors['augmented'], errors['control'])}): no clear difference (the "
            "interval includes 0).") in md
    assert 'id="control-note"' in html and "| control | 38 |" in md


@pytest.mark.parametrize("b2x,a2x,converged", [
    ([0.402, 0.398, 0.401], [0.355, 0.362, 0.345], True),   # moved < 0.5, gain inside its CI
    ([0.380, 0.378, 0.382], [0.335, 0.344, 0.327], False),  # the baseline moved 2 points
    ([0.402, 0.398, 0.401], [0.402, 0.399, 0.400], False),  # the gain left its interval
])
def test_convergence_sentence_follows_the_doubling_rule(tmp_path, b2x, a2x, converged):
    from report_fixtures import fabricated_run

    from pipeline.evaluate.paired import doubling_check, paired_difference

    errors = {"supervised": [0.50, 0.51, 0.52], "baseline": [0.40, 0.40, 0.40],
              "augmented": [0.36, 0.35, 0.355], "baseline-2x": b2x, "augmented-2x": a2x}
    run = fabricated_run(tmp_path, errors, curve=[(50, 0.45), (100, 0.40)],
                         curve_split="validation", val_error=0.39)
    html_path, md_path = build_run_report(run)
    html, md = html_path.read_text(), md_path.read_text()
    d = doubling_check([40.0] * 3, [100 * e for e in b2x],
                       paired_difference([100 * e for e in errors["augmented"]], [40.0] * 3),
                       paired_difference([100 * e for e in a2x], [100 * e for e in b2x]))
    assert d.converged == converged
    moved = (f"Doubling the budget moved the baseline's test error from 40.00% to "
             f"{d.baseline_2k:.2f}% ({d.baseline_moved:+.2f} points, "
             f"{'under' if d.baseline_converged else 'not under'} 0.5)")
    assert moved in md and moved.replace("'", "&#39;") in html
    assert (f"augmented minus baseline at twice the steps, {d.gain_2k.mean:+.2f} points, is "
            f"{'inside' if d.gain_stable else 'outside'} the 95% interval") in md
    assert ("The comparison is converged." in md) == converged
    assert ("The comparison is not converged" in md) != converged
    assert "| baseline-2x |" in md and "| augmented-2x |" in md
    assert "Validation error during training" in html  # the curves' split, not "test"
    assert "| arm | error % | val error % |" in md and "| baseline | 40 | 39 |" in md


def test_convergence_unchecked_without_a_doubled_baseline(tmp_path):
    from report_fixtures import fabricated_run

    errors = {"supervised": [0.50], "baseline": [0.40], "augmented": [0.36]}
    run = fabricated_run(tmp_path, errors, curve=[(50, 0.41), (100, 0.40)],
                         curve_split="validation", val_error=0.39)
    _, md_path = build_run_report(run)
    md = md_path.read_text()
    assert ("Convergence was not checked: add baseline-2x (and augmented-2x) to ssl.arms") in md
    assert "settled" not in md


def test_paired_sentence_states_spread_and_detectable_difference(tmp_path):
    """With 5 paired runs the sentence gives the SD of the differences and the smallest true
    difference they detect at 80% power (scipy's noncentral t)."""
    from report_fixtures import fabricated_run

    from pipeline.evaluate.paired import detectable_difference

    base = [0.30, 0.31, 0.29, 0.32, 0.30]
    aug = [0.29, 0.305, 0.28, 0.31, 0.298]
    replay = [0.30, 0.30, 0.29, 0.315, 0.301]
    run = fabricated_run(tmp_path, {"baseline": base, "augmented": aug, "replay": replay})
    _, md_path = build_run_report(run)
    md = md_path.read_text()
    diffs = [100 * (a - b) for a, b in zip(aug, base, strict=True)]
    sd = float(np.std(diffs, ddof=1))
    mde = detectable_difference(sd, 5)
    assert (f"SD of the differences {sd:.2f} pp, so 5 paired runs detect a true difference of "
            f"{mde:.2f} pp or more with 80% power") in md
    assert "Augmented minus replay error over 5 paired runs" in md
    assert "drawn again from the real labeled images" in md


def test_old_runs_without_validation_show_test_curves(tmp_path):
    from report_fixtures import fabricated_run

    run = fabricated_run(tmp_path, {"baseline": [0.40], "augmented": [0.36]},
                         curve=[(25, 0.5), (50, 0.45), (75, 0.42), (100, 0.4)])
    html_path, md_path = build_run_report(run)
    html, md = html_path.read_text(), md_path.read_text()
    assert "Test error during training" in html and "val error" not in md
    assert "budget is too short" not in md  # no supervised arm: nothing to compare with


