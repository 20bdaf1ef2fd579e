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


def temp_prefix(name: str) -> str:
    """``.<name>.tmp-<pid>-``: hidden, and naming its writer, so the next run of a killed one
    removes it (pipeline.run_lock.remove_leftovers) once that pid is gone."""
    return f".{name}.tmp-{os.getpid()}-"


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int | None = None,
                 fsync: bool = False) -> Path:
    """Call ``write(tmp_path)``, then move the temp file onto ``path``.

    ``mode`` defaults to :func:`new_file_mode`. ``fsync`` flushes the data to disk before the
    rename (for manifests: a rename that survives a power cut must not point at an empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
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


RECORD_BYTES = 4096  # a small record's fixed size on disk: rewritable in place (write_record)


def write_record(path: str | Path, obj: Any, spare: str | Path | None = None) -> Path:
    """A small JSON record that must be written even on a full disk (a run's failure record,
    written as the disk fills up): atomically when there is room, else over the bytes of the
    record already there, or of ``spare`` (reserved with :func:`reserve_record` while there
    was room) renamed onto ``path``. Always padded to ``RECORD_BYTES`` with spaces (valid
    JSON), so a later record fits in its predecessor's blocks; a record that would not fit
    loses the end of its longest text field, never its structure."""
    path = Path(path)
    data = _padded_json(obj)
    try:
        return atomic_write_bytes(path, data)
    except OSError as full:
        target = path if path.is_file() else Path(spare) if spare and Path(spare).is_file() else None
        if target is None:
            raise
        try:
            # r+b: overwrite the blocks the file already has (no new space on ext4, xfs,
            # tmpfs; a copy-on-write filesystem may still refuse).
            with open(target, "r+b") as f:
                f.write(data)
                f.truncate(len(data))
                f.flush()
                os.fsync(f.fileno())
            if target != path:
                os.replace(target, path)
        except OSError:
            raise full from None
        return path


def reserve_record(spare: str | Path) -> None:
    """Set ``RECORD_BYTES`` aside at ``spare`` for a :func:`write_record` on a full disk."""
    spare = Path(spare)
    if not spare.is_file() or spare.stat().st_size < RECORD_BYTES:
        atomic_write_bytes(spare, b" " * (RECORD_BYTES - 1) + b"\n")


def _padded_json(obj: Any) -> bytes:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    while len(text.encode()) >= RECORD_BYTES and isinstance(obj, dict):
        longest = max((k for k, v in obj.items() if isinstance(v, str)),
                      key=lambda k: len(obj[k]), default=None)
        if longest is None or not obj[longest]:
            break
        obj = {**obj, longest: obj[longest][: len(obj[longest]) // 2] + "..."}
        text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    raw = text.encode()
    return raw + b" " * max(0, RECORD_BYTES - 1 - len(raw)) + b"\n"


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
