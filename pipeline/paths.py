"""Where the shipped data is (presets, sweep specs, base models), and how a path in a preset
or on the command line is read.

In a checkout the shipped data is the repository's ``data/`` folder and relative paths in a
preset are relative to the repository root, as they always were. Installed from a wheel
(``pip install .``) there is no repository: the same files travel inside the wheel as the
package ``anl_augment_data`` (pyproject.toml maps ``data/`` to it), a preset's ``data/...``
path names the shipped copy, and every other relative path (``runs_dir: runs``, a
``dataset_root``) means the working directory's, as a command-line path would.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGE = "anl_augment_data"  # the wheel's name for the repository's data/ folder


def _is_checkout(root: Path) -> bool:
    return (root / "pyproject.toml").is_file() and (root / "data" / "presets").is_dir()


def _installed_data_dir() -> Path | None:
    """The folder of the installed ``anl_augment_data`` package (no ``__init__.py``: a
    namespace package, found without importing anything)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


IN_CHECKOUT = _is_checkout(REPO_ROOT)
# Installed without the data package (a broken or partial install), the checkout layout is
# the one place left to look; the preset lookup then names the folder it searched.
DATA_DIR = REPO_ROOT / "data" if IN_CHECKOUT else (_installed_data_dir() or REPO_ROOT / "data")
PRESETS_DIR = DATA_DIR / "presets"
SWEEPS_DIR = DATA_DIR / "sweeps"
MODELS_DIR = DATA_DIR / "models"


def resolve_path(value: str | Path) -> Path:
    """A path from a preset: relative to the repository root in a checkout; installed, a
    ``data/...`` path that names a shipped file is that file, anything else relative is the
    working directory's.

    The ``augment`` command makes a path typed on it absolute (against the cwd) first.
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    if IN_CHECKOUT:
        return REPO_ROOT / p
    if p.parts[:1] == ("data",) and DATA_DIR.joinpath(*p.parts[1:]).exists():
        return DATA_DIR.joinpath(*p.parts[1:])
    return Path.cwd() / p
