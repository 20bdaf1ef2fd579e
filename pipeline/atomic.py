"""Atomic file writes: write to a temp file in the same folder, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one; every stage writes
its outputs through these so that a rerun can trust whatever file it finds.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask (0o644 under umask 022).

    mkstemp makes 0600 files; outputs are for everyone the umask lets read them.
    """
    umask = os.umask(0o022)  # the only way to read it; 022 (not 0) while another thread looks
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int | None = None,
                 fsync: bool = False) -> Path:
    """Call ``write(tmp_path)``, then move the temp file onto ``path``.

    ``mode`` defaults to :func:`new_file_mode`. ``fsync`` flushes the data to disk before the
    rename (for manifests: a rename that survives a power cut must not point at an empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, new_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=fsync)


def _json_default(obj: Any) -> Any:
    # numpy/torch scalars and arrays as numbers and lists; anything else (paths, ...) as text.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True,
                                              default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_npz(path: str | Path, **arrays) -> Path:
    """numpy arrays into one ``.npz`` file, atomically."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def finite(obj):
    """NaN and inf -> None, through dicts, lists and tuples: strict JSON, and 'not measured'
    reads as such."""
    import math
    import numbers

    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral) \
            and not math.isfinite(obj):
        return None  # float, numpy float32/64
    return obj
