"""Helpers shared by the faithfulness sweep and SSL gain benches.

Run the benches as modules from the repository root (``python -m bench.faithfulness``), so
that ``bench.common`` imports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write


def upward_moves(curve: Sequence[float]) -> tuple[float, float]:
    """(largest rise between consecutive points, sum of rises) of an error curve."""
    rises = [max(0.0, b - a) for a, b in itertools.pairwise(curve)]
    return (max(rises) if rises else 0.0), float(sum(rises))


def csv_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type for comma-separated lists, e.g. ``--guidance 1,2,3``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value (comma-separated)")
        try:
            return [kind(t) for t in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    return parse


def add_preset_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset,
                   help="preset name in data/presets or a YAML path (default %(default)s)")
    p.add_argument("--base-model", default=None,
                   help="base model folder (default: the preset's, i.e. the shipped model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="preset override, as for `augment run --set` (repeatable)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="default: the preset's (auto = cuda when present)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (keep 1 on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_bench_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """The preset with ``--set``, ``--base-model``, ``--device`` and ``--quiet`` applied."""
    from pipeline.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.base_model:
        overrides["base_model"] = str(Path(args.base_model).resolve())
    if args.device:
        overrides["device"] = args.device
    if args.quiet:
        overrides["progress"] = False
    overrides.update(extra or {})
    return load_config(args.preset, overrides)


def base_model_label(spec: str) -> str:
    """Where the base model is and how long it was trained, for the header of a table."""
    from pipeline.models import resolve_base_model

    unet_dir = resolve_base_model(spec)
    step = None
    for cand in (unet_dir.parent / "training.json", unet_dir / "training.json"):
        if cand.is_file():
            info = json.loads(cand.read_text())
            step = info.get("steps") or info.get("step")
            break
    steps = f"{step} steps" if step is not None else "training steps unknown (no training.json)"
    return f"{unet_dir.parent if unet_dir.name == 'unet' else unet_dir} ({steps}, " \
           f"sha256 {base_fingerprint(spec)[:12]})"


def base_fingerprint(spec: str) -> str:
    """Content hash of the base U-Net (config + weights): what results are keyed on."""
    from pipeline.models import base_model_fingerprint, resolve_base_model

    return base_model_fingerprint(resolve_base_model(spec))


def digest(obj: Any) -> str:
    """A bench cell's key: the pipeline's content hash, shortened."""
    from pipeline.digest import digest as full_digest

    return full_digest(obj)[:16]


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table (it pastes into RESULTS.md as printed): columns are (key, title, fmt)."""
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(key), spec) for key, _, spec in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])


def image_grid_png(rows: Sequence[tuple[str, Any]], path: Path, title: str = "") -> None:
    """Write a PNG with one labelled strip of uint8 (N, H, W, C) images per row (atomically)."""
    from pipeline.data.grids import strips_png

    png = strips_png(rows, title)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))
