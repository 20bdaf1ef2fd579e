"""Where the repository is, and how a path in a preset or on the command line is read."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO_ROOT / "data" / "presets"


def resolve_path(value: str | Path) -> Path:
    """Relative paths in presets are relative to the repository root, not the cwd.

    The ``augment`` command makes a path typed on it absolute (against the cwd) first.
    """
    p = Path(value).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p
