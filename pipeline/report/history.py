"""Benchmark history: one Parquet row per benchmark run, and a page that shows the trend.

``append_history`` reads a finished run directory (same readers as the run report) and
adds its row to the table (atomically; a row for the same run and finish time is replaced,
so re-reporting a run never duplicates it). ``render_history`` draws, per preset, the arms'
errors, the augmented-minus-baseline difference and the stage wall times over the runs.
Each difference keeps its n paired seeds, 95% CI and p (none below 3 pairs; see
:mod:`pipeline.evaluate.paired`), and ``budget_short`` marks runs whose SSL baseline did not beat
supervised training.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.report import plots
from pipeline.report.data import ARM_ORDER, load_run
from pipeline.report.render import md_table, render
from pipeline.report.tables import outcome_columns
from pipeline.stage_graph import STAGE_ORDER

TREND_COLUMNS = ["date", "commit", "preset", "run", *[f"error_{a}_pct" for a in ARM_ORDER],
                 "delta_n", "delta_pp", "delta_ci_low_pp", "delta_ci_high_pp", "delta_p",
                 "vs_control_pp", "budget_short", "label_consistency", "kid",
                 "sampling_images_per_s", "total_wall_s"]


def history_row(run_dir: str | Path, commit: str | None = None) -> dict[str, Any]:
    """The history row of one run: date, commit, preset, arms' errors, quality, stage times."""
    run = load_run(run_dir)
    finished = [float(r["finished"]) for r in run.stages.values()
                if isinstance(r.get("finished"), (int, float))]
    when = max(finished) if finished else dt.datetime.now(dt.UTC).timestamp()
    row: dict[str, Any] = {
        "run_id": f"{run.name}@{int(when)}",
        "date": dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit or run.versions.get("git_commit"),
        "preset": run.preset, "config_hash": run.config_hash, "run": run.name,
        "device": (run.stages.get("ssl") or run.stages.get("sample") or {}).get("device"),
    }
    # Column names are those of history files already written: keep them.
    row.update(outcome_columns(run, {"error": "error_{arm}_pct", "std": "std_{arm}_pct",
                                     "seeds": "seeds_{arm}"}))
    row["tune_steps_per_s"] = ((run.stages.get("tune") or {}).get("metrics") or {}).get(
        "steps_per_s")
    for stage in STAGE_ORDER:
        rec = run.stages.get(stage)
        row[f"wall_{stage}_s"] = None if rec is None else rec.get("wall_s")
    row["total_wall_s"] = sum(float(r.get("wall_s") or 0) for r in run.stages.values())
    return row


def read_history(history_path: str | Path) -> pd.DataFrame:
    path = Path(history_path)
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"benchmark history {path} is unreadable ({e}); move it aside and "
                         "rebuild it with append_history for each run directory") from e


def append_history(history_path: str | Path, run_dir: str | Path,
                   commit: str | None = None) -> dict[str, Any]:
    """Add (or replace) this run's row in the Parquet table at ``history_path``; return it."""
    path = Path(history_path)
    row = history_row(run_dir, commit)
    old = read_history(path)
    if len(old) and "run_id" in old:
        old = old[old["run_id"] != row["run_id"]]
    new = pd.DataFrame([row])
    table = new if old.empty else pd.concat([old, new], ignore_index=True)
    table = table.sort_values("date", kind="stable").reset_index(drop=True)
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    return row


def _records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    cols = [c for c in columns if c in frame]
    sub = frame[cols].astype(object).where(frame[cols].notna(), None)
    return sub.to_dict("records")


def render_history(history_path: str | Path, out_dir: str | Path) -> Path:
    """Write history.html and history.md (trends per preset) into ``out_dir``."""
    table = read_history(history_path)
    if table.empty:
        raise ValueError(f"no benchmark history at {history_path}; the benchmark deployment "
                         "appends a row per run (append_history), run it at least once")
    sections, md = [], [f"# Benchmark history\n\n{len(table)} runs from {history_path}.\n"]
    for preset, frame in table.groupby("preset", sort=True):
        frame = frame.sort_values("date", kind="stable").reset_index(drop=True)
        xs = list(range(len(frame)))
        ticks = [f"{d[5:10]} {str(c or '')[:7]}".strip() for d, c in
                 zip(frame["date"], frame["commit"], strict=True)]

        def pts(col: str, err: str | None = None, frame=frame, xs=xs):
            if col not in frame:
                return []
            return [(x, None if pd.isna(v) else float(v),
                     None if err is None or err not in frame or pd.isna(frame[err][i])
                     else float(frame[err][i]))
                    for i, (x, v) in enumerate(zip(xs, frame[col], strict=True))]

        figures = []
        arms = {a: pts(f"error_{a}_pct", f"std_{a}_pct") for a in ARM_ORDER
                if f"error_{a}_pct" in frame and frame[f"error_{a}_pct"].notna().any()}
        if arms:
            figures.append(("Test error per arm", plots.metric_lines(
                "run (date, commit)", arms, "test error %", ticks)))
        if "delta_pp" in frame and frame["delta_pp"].notna().any():
            figures.append(("Augmented − baseline", plots.metric_lines(
                "run (date, commit)", {"augmented − baseline": pts("delta_pp")},
                "change in error, pp", ticks)))
        stages = {s: pts(f"wall_{s}_s") for s in STAGE_ORDER
                  if f"wall_{s}_s" in frame and frame[f"wall_{s}_s"].notna().any()}
        if stages:
            figures.append(("Stage wall times", plots.metric_lines(
                "run (date, commit)", stages, "seconds", ticks)))
        rows = _records(frame.iloc[::-1], TREND_COLUMNS)
        sections.append({"preset": preset, "rows": rows,
                         "columns": [c for c in TREND_COLUMNS if c in frame],
                         "figures": [(t, plots.data_uri(p)) for t, p in figures]})
        md.append(f"## {preset}\n\n" + md_table(rows, [c for c in TREND_COLUMNS if c in frame]))
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "history.md", "\n".join(md))
    html = render("history.html.j2", title="anl-augment benchmark history", sections=sections,
                  source=str(history_path), total=len(table))
    return atomic_write_text(out_dir / "history.html", html)
