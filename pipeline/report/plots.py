"""Matplotlib figures for the reports, returned as PNG bytes (embedded as data URIs).

Figures are made with ``matplotlib.figure.Figure``, not pyplot: no global state and no GUI
backend, so reports can be built on headless machines and from several threads at once.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline.report.data import ArmResult

ARM_COLORS = {"supervised": "#7f7f7f", "baseline": "#1f77b4", "augmented": "#d62728",
              "replay": "#2ca02c", "control": "#9467bd", "baseline-2x": "#aec7e8",
              "augmented-2x": "#ff9896", "supervised+synthetic": "#8c564b",
              "pool-oracle": "#17becf"}


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _color(arm: str, i: int) -> str:
    return ARM_COLORS.get(arm, f"C{i + 3}")


def _curve_seeds(arms: dict[str, ArmResult]) -> list:
    return [(arm, s) for arm, res in arms.items() for s in res.seeds
            if s.curve is not None and {"step", "test_error"} <= set(s.curve.columns)
            and len(s.curve)]


def curve_split(arms: dict[str, ArmResult]) -> str:
    """Which split the learning curves were measured on: "validation" (runs with a held-out
    validation split), "test" (older runs) or "test/validation" when they mix."""
    splits = {s.curve_split for _, s in _curve_seeds(arms)}
    return splits.pop() if len(splits) == 1 else ("test/validation" if splits else "test")


def learning_curves(arms: dict[str, ArmResult]) -> bytes | None:
    """Error (%) on the curve's split (validation, or test for older runs) against training
    step, one line per arm and seed."""
    lines = _curve_seeds(arms)
    if not lines:
        return None
    fig = Figure(figsize=(5.0, 3.3))
    ax = fig.subplots()
    labelled = set()
    for i, (arm, s) in enumerate(lines):
        ax.plot(s.curve["step"], 100 * s.curve["test_error"], color=_color(arm, i), alpha=0.85,
                lw=1.4, marker="o" if len(s.curve) < 12 else None, ms=3,
                label=arm if arm not in labelled else None)
        labelled.add(arm)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{curve_split(arms)} error % (EMA model)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _png(fig)


def per_class_change(names: Sequence[str], before: Sequence[float | None],
                     after: Sequence[float | None], label: str) -> bytes:
    """Horizontal bars: accuracy change per class in percentage points."""
    delta = np.array([np.nan if a is None or b is None else 100 * (a - b)
                      for b, a in zip(before, after, strict=True)])
    fig = Figure(figsize=(5.0, 0.28 * len(names) + 1.0))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, np.nan_to_num(delta), color=np.where(delta >= 0, "#2ca02c", "#d62728"))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"accuracy change, percentage points ({label})")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def confusion(matrix: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """Row-normalised confusion matrix (rows: true class), counts as annotations when small."""
    m = np.asarray(matrix, np.float64)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(names)
    fig = Figure(figsize=(0.3 * k + 1.9, 0.3 * k + 1.5))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    return _png(fig)


def tuning_losses(tunes: dict[str, dict], window: int = 20) -> bytes | None:
    """Adapter tuning loss (moving average) per adapter."""
    series = {k: np.asarray(v["loss_history"], np.float64) for k, v in tunes.items()
              if v.get("loss_history")}
    if not series:
        return None
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.subplots()
    for i, (name, loss) in enumerate(series.items()):
        w = max(1, min(window, len(loss) // 5))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, lw=1, color=f"C{i % 10}", label=name)
    ax.set_xlabel("tuning step")
    ax.set_ylabel(f"noise-prediction loss (mean of {w})")
    ax.grid(alpha=0.3)
    if len(series) <= 10:
        ax.legend(fontsize=7, frameon=False, ncol=2)
    return _png(fig)


def metric_lines(x_label: str, series: dict[str, list[tuple[float, float, float | None]]],
                 y_label: str, categorical: list[str] | None = None) -> bytes:
    """Lines with error bars: ``series[name] = [(x, y, yerr or None), ...]``.

    ``categorical`` gives tick labels when x is an index into non-numeric values.
    """
    fig = Figure(figsize=(6.0, 3.4))
    ax = fig.subplots()
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(p for p in pts if p[1] is not None)
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [p[2] or 0.0 for p in pts]
        ax.errorbar(x, y, yerr=err if any(err) else None, marker="o", ms=4, capsize=3,
                    color=_color(name, i), label=name)
    if categorical:
        ax.set_xticks(range(len(categorical)), categorical, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)
