"""Jinja2 environment and number formats shared by the run, ablation and history reports.

Formats in one place so every page writes an error, a difference or a time the same way;
a missing value (None, NaN) always reads "not run" or a dash, never "nan".
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES = Path(__file__).parent / "templates"
NOT_RUN = "not run"
# A figure scored against the unlabeled pool's own labels, where the pool has none
# (pipeline.data.pool_labels): the cell says so instead of a dash or a made-up number.
NEEDS_LABELS = "needs labels; not computed"


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and not math.isfinite(x))


def pct(x, nd: int = 2) -> str:
    """A fraction as a percentage: 0.1234 -> '12.34%'."""
    return f"{100 * float(x):.{nd}f}%" if _ok(x) else NOT_RUN


def pct_or(x, default: str = "—", nd: int = 2) -> str:
    return pct(x, nd) if _ok(x) else default


def pct_labels(x, reason=None, default: str = "—", nd: int = 2) -> str:
    """A pool-label figure: NEEDS_LABELS when its record gives a reason it was not computed."""
    return NEEDS_LABELS if reason else pct_or(x, default, nd)


def pp(x, nd: int = 2) -> str:
    """A difference of fractions in signed percentage points: -0.0123 -> '−1.23 pp'."""
    if not _ok(x):
        return NOT_RUN
    v = 100 * float(x)
    return f"{'+' if v > 0 else '−' if v < 0 else '±'}{abs(v):.{nd}f} pp"


def pp_or(x, default: str = "—") -> str:
    return pp(x) if _ok(x) else default


def pp_abs_or(x, default: str = "—") -> str:
    return f"{100 * float(x):.2f} pp" if _ok(x) else default


def ci_pp(lo, hi, default: str = "—") -> str:
    """A 95% interval of a difference of fractions, in points: '−7.48 to −2.52 pp'."""
    if not (_ok(lo) and _ok(hi)):
        return default
    return f"{pp(lo)[:-3]} to {pp(hi)}"


def pval(p, default: str = "—") -> str:
    """A p-value: '0.0123', '< 0.001'."""
    if not _ok(p):
        return default
    return "< 0.001" if float(p) < 0.001 else f"{float(p):.3f}"


def num(x, nd: int = 3) -> str:
    if not _ok(x):
        return "—"
    return f"{x:,}" if isinstance(x, int) else f"{float(x):,.{nd}f}"


def seconds(x) -> str:
    if not _ok(x):
        return "—"
    x = float(x)
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.2f} h"


def duration(x, default: str = "—") -> str:
    """A wall time in hours and minutes, or minutes and seconds: 200 -> '3 min 20 s',
    3900 -> '1 h 05 min'."""
    if not _ok(x):
        return default
    h, rem = divmod(round(float(x)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def mb(x) -> str:
    if not _ok(x):
        return "—"
    return f"{float(x):,.0f} MB" if float(x) < 10240 else f"{float(x) / 1024:.1f} GB"


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html", "html.j2"]),  # .md.j2: Markdown
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, pct_or=pct_or, pct_labels=pct_labels, pp=pp, pp_or=pp_or, pp_abs_or=pp_abs_or,
                       num=num, seconds=seconds, duration=duration, mb=mb, pval=pval,
                       ci_pp=ci_pp)
    return env


def render(template: str, **context) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        gen = version("anl-augment")
    except PackageNotFoundError:
        gen = "dev"
    context.setdefault("generated", time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    context.setdefault("generator_version", gen)
    return environment().get_template(template).render(**context)


def md_table(rows: Sequence[dict] | Sequence[Sequence], columns: Sequence[str] | None = None
             ) -> str:
    """A GitHub-flavoured Markdown table (None -> '—'): rows are flat dicts, whose keys
    ``columns`` picks and orders, or sequences of cells under the ``columns`` header."""
    if not rows:
        return "_none_\n"
    columns = list(columns or rows[0])

    def cell(v) -> str:
        if not _ok(v):
            return "—"
        return (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    def cells(row) -> list:
        return [row.get(c) for c in columns] if isinstance(row, dict) else list(row)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
