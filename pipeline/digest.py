"""The content hashes: sha256 of sorted-key JSON (:func:`digest`), and of a file's bytes.

Config hashes, stage keys, unit keys, SSL fingerprints and bench cell keys all hash through
:func:`digest`, so two places can never disagree on how a value is serialised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(obj: Any, *, spaced: bool = False) -> str:
    """sha256 hex digest of ``obj`` as JSON with sorted keys (non-JSON values via ``str``).

    ``spaced=True`` keeps json's default ``", "``/``": "`` separators: the form the SSL arm
    fingerprints were first written in, kept so finished arms keep their keys.
    """
    separators = (", ", ": ") if spaced else (",", ":")
    text = json.dumps(obj, sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (not cached: shards are verified with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
