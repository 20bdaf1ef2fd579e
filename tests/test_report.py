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

from pipeline.report import artifacts, build_run_report, markdown_summary, results_table

# The report_* fixtures (a tiny real run directory) live in report_fixtures.py.
pytest_plugins = ["report_fixtures"]

SCREENSHOT_DIR = Path(os.environ.get("REPORT_SCREENSHOT_DIR", "/tmp/anl-augment-report-shots"))


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
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "run-report.png"
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
