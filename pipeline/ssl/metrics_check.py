"""The schema of a classifier unit's ``metrics.json`` (``pipeline.ssl.arms.run_arm`` writes
it), checked wherever one is reused or reported: a truncated or hand-edited file must read
as corrupt, never as "not run" nor as a result.

Only what every writer since the first has written is required, so older runs still pass;
an edit that keeps the schema (one error changed to another value in [0, 1]) is caught by
the sha256 the unit marker records (``pipeline.integrity``), not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.json"
# key -> the types it may hold (bool is not an int here, although Python says it is): what
# a report cannot do without, then what a reader checks the type of where present.
REQUIRED: dict[str, tuple[type, ...]] = {"arm": (str,), "seed": (int,),
                                         "top1_error": (int, float)}
TYPED: dict[str, tuple[type, ...]] = {"steps": (int,), "fingerprint": (str,), "net": (str,)}
# Error rates: a share of images, so in [0, 1]; None where the run had no such split.
ERRORS = ("top1_error", "val_error", "last_top1_error")


def _share(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and 0.0 <= value <= 1.0


def metrics_problem(path: str | Path) -> str | None:
    """What is wrong with the metrics file at ``path`` (None when it passes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON ({e}), truncated or overwritten"
    if not isinstance(data, dict):
        return f"holds a {type(data).__name__}, not an object"
    for key in REQUIRED:
        if key not in data:
            return f"has no {key!r}"
    for key, types in {**REQUIRED, **TYPED}.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            return f"{key!r} is {data[key]!r}, not {' or '.join(t.__name__ for t in types)}"
    for key in ERRORS:
        if data.get(key) is not None and not _share(data[key]):
            return f"{key!r} is {data[key]!r}, not an error rate in [0, 1]"
    if data.get("top1_accuracy") is not None and not (
            _share(data["top1_accuracy"])
            and abs(data["top1_accuracy"] + data["top1_error"] - 1.0) < 1e-6):
        return (f"'top1_accuracy' {data['top1_accuracy']!r} is not 1 - top1_error "
                f"({data['top1_error']!r})")
    evals = data.get("final_evals")
    if evals is not None and not (isinstance(evals, list) and all(
            _share(e) or isinstance(e, dict) for e in evals)):
        return "'final_evals' is not a list of error rates"
    per_class = data.get("per_class_accuracy")
    if per_class is not None and not (isinstance(per_class, dict) and all(
            v is None or _share(v) for v in per_class.values())):
        return "'per_class_accuracy' holds a value outside [0, 1]"
    return None
