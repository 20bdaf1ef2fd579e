"""The sweep's report: a heatmap of each pair's gain per cell, and the per-cell tables.

Every figure comes from the repetition records (``pipeline.sweep.run``) through
``pipeline.sweep.stats``; the report writes ``summary.json`` (all of it), ``report.html``
(self-contained: the heatmaps are embedded) and ``report.md``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.report.plots import _png, data_uri
from pipeline.report.render import render
from pipeline.sweep.run import load_records
from pipeline.sweep.spec import SweepSpec
from pipeline.sweep.stats import cell_summary, verdict

# What each pair's gain means, for the headings.
MEANINGS = {
    "augmented - baseline": "what the synthetic rows add to FixMatch",
    "supervised+synthetic - supervised": "what the synthetic rows add to the labeled images "
                                         "alone (few-shot augmentation)",
    "pool-oracle - baseline": "what the base's pretraining images would add as real "
                              "unlabeled data (an evaluation arm: the task does not have them)",
    "augmented - pool-oracle": "the synthetic rows against the oracle's real images",
    "augmented - replay": "the synthetic rows beyond the labeled images drawn again",
    "augmented - control": "the synthetic rows beyond the encoder's pseudo-labels",
    "baseline - supervised": "what FixMatch's unlabeled pool adds",
}


def _axes(spec: SweepSpec) -> tuple[list[str], list[tuple], list[Any], str | None]:
    """Rows (all grid keys but the last, as tuples) and columns (the last key's values)."""
    keys = list(spec.grid)
    if not keys:
        return [], [()], [None], None
    col_key = keys[-1]
    rows = list(itertools.product(*(spec.grid[k] for k in keys[:-1])))
    return keys[:-1], rows, spec.grid[col_key], col_key


def _show(v: Any) -> str:
    return "all" if v is None else str(v)


def heatmap(spec: SweepSpec, by_cell: dict[str, dict], pair: str, split: str) -> bytes | None:
    """PNG: one square per cell, coloured by the mean gain (accuracy points), annotated with
    its 95% CI; '*' where the CI excludes 0, '†' where the doubling rule failed, '?' where
    convergence was not checked. None when no cell ran the pair."""
    row_keys, rows, cols, col_key = _axes(spec)
    # Keyed by repr: grid values may be lists (e.g. sampling.mask_ratios), which do not hash.
    cells = {repr(tuple(c.point.get(k) for k in (*row_keys, col_key) if k is not None)): c
             for c in spec.cells()}
    grid = np.full((len(rows), len(cols)), np.nan)
    notes = [["not run"] * len(cols) for _ in rows]
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            cell = cells.get(repr((*row, col) if col_key else row))
            entry = by_cell.get(cell.slug, {}).get("pairs", {}).get(pair, {}).get(split) \
                if cell else None
            if not entry:
                continue
            d = entry["diff"]
            grid[i, j] = d["mean"]
            ci = f"[{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]" if d["ci_low"] is not None \
                else "no CI"
            mark = "*" if d["direction"] in ("positive", "negative") else ""
            conv = (entry.get("doubling") or {}).get("converged")
            mark += "" if conv else "†" if conv is False else "?"
            notes[i][j] = f"{d['mean']:+.2f}{mark}\n{ci}\nn={d['n']}"
    if np.isnan(grid).all():
        return None
    span = max(3.0, float(np.nanmax(np.abs(grid))))
    fig = Figure(figsize=(1.9 + 1.7 * len(cols), 1.2 + 1.0 * len(rows)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=-span, vmax=span,
                   aspect="auto")
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [_show(c) for c in cols])
    ax.set_yticks(range(len(rows)),
                  [", ".join(f"{k.split('.')[-1]}={_show(v)}" for k, v in zip(row_keys, r,
                                                                              strict=True))
                   or "" for r in rows])
    ax.set_xlabel(col_key or "")
    ax.set_title(f"{pair} ({split}), accuracy points", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def _cell_rows(spec: SweepSpec, by_cell: dict[str, dict]) -> list[dict]:
    out = []
    for cell in spec.cells():
        s = by_cell.get(cell.slug)
        arms = {a: v.get("test") for a, v in (s or {}).get("arms", {}).items()}
        out.append({"cell": cell.label, "slug": cell.slug, "reps": (s or {}).get("reps", []),
                    "arms": {a: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1
                                 else None) for a, v in arms.items() if v},
                    "pairs": [{"pair": name, "split": split, **e["diff"],
                               "doubling": e.get("doubling"), "verdict": verdict(e)}
                              for name, by_split in (s or {}).get("pairs", {}).items()
                              for split, e in by_split.items()]})
    return out


def build_sweep_report(spec: SweepSpec, folder: Path) -> dict[str, Path]:
    """Write summary.json, report.html and report.md in ``folder`` from its records."""
    folder = Path(folder)
    records = load_records(folder, spec)
    pairs = [tuple(p) for p in spec.pairs]
    points = {c.slug: c for c in spec.cells()}
    # unit_keys: what each repetition's arms computed, so a run report can tell when one of
    # its units *is* a map repetition (pipeline.report.gain_map.map_doubling).
    by_cell = {slug: {"point": points[slug].point, "label": points[slug].label,
                      **cell_summary(recs, pairs),
                      "unit_keys": {str(r): rec.get("unit_keys", {}) for r, rec in recs.items()}}
               for slug, recs in records.items() if recs}
    pair_names = [f"{a} - {b}" for a, b in pairs
                  if any(f"{a} - {b}" in s["pairs"] for s in by_cell.values())]
    maps = []
    for name in pair_names:
        png = heatmap(spec, by_cell, name, "test")
        if png is not None:
            maps.append({"pair": name, "meaning": MEANINGS.get(name, ""), "uri": data_uri(png),
                         "png": png})
    cells = _cell_rows(spec, by_cell)
    context = {"title": f"Sweep {spec.name}", "spec": spec.model_dump(mode="json"),
               "cells": cells, "maps": maps, "folder": str(folder),
               "total_reps": sum(len(r) for r in records.values()),
               "planned_reps": len(spec.cells()) * len(spec.repetitions)}
    out = {"summary": atomic_write_json(folder / "summary.json",
                                        {"spec": context["spec"], "cells": by_cell}),
           "html": atomic_write_text(folder / "report.html", render("sweep.html.j2", **context)),
           "md": atomic_write_text(folder / "report.md", render("sweep.md.j2", **context))}
    for m in maps:
        slug = m["pair"].replace(" ", "").replace("+", "p")
        out[f"map:{m['pair']}"] = atomic_write_bytes(folder / f"map-{slug}.png", m["png"])
    return out
