"""Ablation report: several runs side by side, the parameter they differ in on the x-axis.

The varied parameters are found by comparing the runs' ``config.json`` (flattened to dotted
keys, leaving out where and how runs ran), or named with ``vary=``. One table (HTML, Markdown
and CSV) with a row per run, plus plots of error per arm, the augmented-minus-baseline (and
augmented-minus-control) difference and the synthetic-quality figures against the varied
parameter. Differences carry n paired seeds, 95% CI and p (``pipeline.evaluate.paired``; none below 3
pairs), and ``budget_short`` marks runs whose SSL baseline did not beat supervised training.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_text
from pipeline.config import LEGACY_META_KEYS, META_KEY, RUNTIME_FIELDS
from pipeline.evaluate.paired import MIN_REPETITIONS
from pipeline.report import plots
from pipeline.report.data import ARM_ORDER, RunData, load_run
from pipeline.report.render import md_table, render
from pipeline.report.tables import outcome_columns

# Fields that say where/how a run ran (the config's runtime fields) or identify it (a saved
# config's metadata, also in its older top-level form), never what it computed.
IGNORED_KEYS = {*RUNTIME_FIELDS, META_KEY, *LEGACY_META_KEYS}
IGNORED_PREFIXES = tuple(f"{k}." for k in (META_KEY, *LEGACY_META_KEYS))
CAVEAT = (f"delta_*: augmented minus baseline, vs_control_*: augmented minus control, in points, "
          f"paired by seed; the 95% CI and p need at least {MIN_REPETITIONS} paired seeds (blank "
          "with fewer: too few to say whether the synthetic data helped). The seeds of one run "
          "share one labeled split and one set of synthetic images, so an interval covers seed "
          "noise only. budget_short: the SSL baseline did not beat supervised training, so the "
          "budget is too short for an SSL comparison.")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def varied_keys(configs: Sequence[dict]) -> list[str]:
    """Dotted config keys whose values are not the same in every run (sorted)."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for k in keys:
        if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES):
            continue
        values = {json.dumps(f.get(k), sort_keys=True) for f in flat}
        if len(values) > 1:
            out.append(k)
    return out


def _scalar(v: Any) -> Any:
    """A one-element list (e.g. ``sampling.mask_ratios: [0.3]``) reads as its element."""
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def _label(v: Any) -> str:
    v = _scalar(v)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


ABLATION_NAMES = {"error": "{arm}_error_pct", "std": "{arm}_std_pct", "seeds": "{arm}_seeds"}


def ablation_row(run: RunData, vary: Sequence[str]) -> dict[str, Any]:
    flat = flatten(run.config or {})
    row: dict[str, Any] = {"run": run.name}
    for k in vary:
        row[k] = _scalar(flat.get(k))
    row.update(outcome_columns(run, ABLATION_NAMES, digits=4))
    return row


def _x_axis(rows: list[dict], vary: list[str]) -> tuple[str, list[float], list[str] | None]:
    """Numeric x when one numeric parameter varies; otherwise one category per run."""
    if len(vary) == 1 and all(isinstance(r[vary[0]], (int, float)) and
                              not isinstance(r[vary[0]], bool) for r in rows):
        return vary[0], [float(r[vary[0]]) for r in rows], None
    labels = [", ".join(f"{k}={_label(r[k])}" for k in vary) or r["run"] for r in rows]
    return " / ".join(vary) or "run", list(range(len(rows))), labels


def build_ablation_report(run_dirs: Sequence[str | Path], out_dir: str | Path,
                          vary: Sequence[str] | str | None = None) -> Path:
    """Write ablation.html, ablation.md and ablation.csv into ``out_dir``; return the HTML path.

    ``vary``: dotted config keys to put on the x-axis (default: every key that differs).
    """
    if not run_dirs:
        raise ValueError("build_ablation_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if isinstance(vary, str):
        vary = [vary]
    vary = list(vary) if vary else varied_keys([r.config or {} for r in runs])
    for k in vary:
        if all(k not in flatten(r.config or {}) for r in runs):
            raise ValueError(f"vary={k!r} is not a config key of any of these runs; use a dotted "
                             "key from config.json, e.g. sampling.mask_ratios")
    rows = [ablation_row(r, vary) for r in runs]
    if rows and vary:
        rows.sort(key=lambda r: tuple(_label(r[k]) if not isinstance(r[k], (int, float))
                                      else f"{float(r[k]):020.6f}" for k in vary))
    x_label, xs, cats = _x_axis(rows, vary)

    def series(key: str, err: str | None = None, scale: float = 1.0):
        return [(x, None if r[key] is None else r[key] * scale,
                 None if err is None or r[err] is None else r[err] * scale)
                for x, r in zip(xs, rows, strict=True)]

    def diff_series(prefix: str):  # error bars: half the 95% CI (symmetric t interval)
        return [(x, r[f"{prefix}_pp"],
                 None if r[f"{prefix}_ci_low_pp"] is None else
                 (r[f"{prefix}_ci_high_pp"] - r[f"{prefix}_ci_low_pp"]) / 2)
                for x, r in zip(xs, rows, strict=True)]

    figures = []
    arms = {a: series(f"{a}_error_pct", f"{a}_std_pct") for a in ARM_ORDER
            if any(r[f"{a}_error_pct"] is not None for r in rows)}
    if arms:
        figures.append(("Top-1 test error per arm (mean ± std over seeds)",
                        plots.metric_lines(x_label, arms, "test error %", cats)))
    if any(r["delta_pp"] is not None for r in rows):
        diffs = {"augmented − baseline": diff_series("delta")}
        if any(r["vs_control_pp"] is not None for r in rows):
            diffs["augmented − control"] = diff_series("vs_control")
        title = (f"Paired differences in error (negative = fewer errors; bars: 95% CI where "
                 f"a run has at least {MIN_REPETITIONS} paired seeds, none with fewer)")
        figures.append((title, plots.metric_lines(x_label, diffs, "change in error, pp",
                                                  cats)))
    qual = {k: series(k) for k in ("label_consistency", "diversity_synthetic",
                                   "within_condition_diversity")
            if any(r[k] is not None for r in rows)}
    if qual:
        figures.append(("Synthetic quality: label consistency and diversity",
                        plots.metric_lines(x_label, qual, "share / cosine distance", cats)))
    if any(r["kid"] is not None for r in rows):
        figures.append(("KID to real same-class images (lower = closer)",
                        plots.metric_lines(x_label, {"KID": series("kid")}, "KID", cats)))

    out_dir = Path(out_dir)
    columns = list(rows[0]) if rows else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "ablation.csv", buf.getvalue())
    md = (f"# Ablation over {', '.join(vary) or 'runs'}\n\n{len(rows)} runs. {CAVEAT}\n\n"
          + md_table(rows, columns))
    atomic_write_text(out_dir / "ablation.md", md)
    html = render("ablation.html.j2", title=f"anl-augment ablation: {', '.join(vary) or 'runs'}",
                  vary=vary, rows=rows, columns=columns, caveat=CAVEAT,
                  figures=[(t, plots.data_uri(png)) for t, png in figures])
    return atomic_write_text(out_dir / "ablation.html", html)
