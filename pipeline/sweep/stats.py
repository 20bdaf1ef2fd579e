"""A cell's statistics over its repetitions: each arm's errors, and per pair the paired
difference (``pipeline.evaluate.paired``) with its doubling check.

Differences are in accuracy points, positive where the first arm has the lower error. A pair
(a, b) is checked by the doubling rule when b-2x ran (and a-2x, for the gain at 2K): b at 2K
within 0.5 points of b at K, and the gain at 2K inside the 95% CI of the gain at K.
"""

from __future__ import annotations

from typing import Any

from pipeline.evaluate.paired import doubling_check, paired_difference

SPLITS = {"validation": "val_error", "test": "top1_error"}


def _values(records: dict[int, dict], reps: list[int], arm: str, key: str) -> list[float] | None:
    """Error % of ``arm`` per repetition, or None unless every repetition has it."""
    out = []
    for r in reps:
        m = records[r]["arms"].get(arm)
        if m is None or m.get(key) is None:
            return None
        out.append(100 * float(m[key]))
    return out


def cell_summary(records: dict[int, dict], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """{"reps", "arms": {arm: {split: [error %]}}, "pairs": {"a - b": {split: {"diff",
    "doubling"}}}} over the repetitions that are finished (every arm of a pair must be in
    each repetition used)."""
    reps = sorted(records)
    arms = sorted({a for r in reps for a in records[r]["arms"]})
    summary: dict[str, Any] = {"reps": reps, "arms": {}, "pairs": {}}
    for arm in arms:
        summary["arms"][arm] = {split: v for split, key in SPLITS.items()
                                if (v := _values(records, reps, arm, key)) is not None}
    for a, b in pairs:
        per_split = {}
        for split, key in SPLITS.items():
            ea, eb = _values(records, reps, a, key), _values(records, reps, b, key)
            if ea is None or eb is None:
                continue
            gain = paired_difference([100 - x for x in ea], [100 - x for x in eb])
            entry = {"diff": gain.to_dict(), "doubling": None}
            ea2 = _values(records, reps, f"{a}-2x", key)
            eb2 = _values(records, reps, f"{b}-2x", key)
            if eb2 is not None:
                gain_2k = paired_difference([100 - x for x in ea2], [100 - x for x in eb2]) \
                    if ea2 is not None else None
                entry["doubling"] = doubling_check(eb, eb2, gain, gain_2k).to_dict()
            per_split[split] = entry
        if per_split:
            summary["pairs"][f"{a} - {b}"] = per_split
    return summary


def verdict(entry: dict | None) -> str:
    """One word for a pair on one split: "gain", "loss", "no difference" (CI spans 0),
    "too few" (< 3 repetitions), with "unconverged" when the doubling rule failed and
    "unchecked" when it was not run."""
    if not entry:
        return "not run"
    d = entry["diff"]
    word = "too few" if d.get("ci_low") is None else \
        {"positive": "gain", "negative": "loss"}.get(d.get("direction"), "no difference")
    doubling = entry.get("doubling")
    if doubling is None:
        return f"{word}, convergence unchecked"
    if doubling.get("converged") is False:
        return f"{word}, unconverged"
    if doubling.get("converged") is None:
        return f"{word}, gain at 2K unchecked"
    return word
