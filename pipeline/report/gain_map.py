"""Where a run sits on the shipped gain map, and what the map says there and elsewhere.

The gain map (`augment sweep data/sweeps/gain-map.yaml`, its ``summary.json`` copied to
``data/sweeps/gain-map.summary.json``) measured each cell over independent repetitions, with
the doubling rule. A run that did not double its own budget can still be converged: when one
of its units *is* a map repetition (the same unit key: the same labeled split, base model,
synthetic rows where the arm reads them, trainer settings and steps), the map's doubling check
was made at exactly this run's budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.paths import SWEEPS_DIR
from pipeline.report.data import RunData

GAIN_MAP = SWEEPS_DIR / "gain-map.summary.json"  # installed too: pipeline.paths
MAP_PAIRS = ("augmented - baseline", "supervised+synthetic - supervised")


def load_map(path: Path | None = None) -> dict | None:
    """The shipped map's summary; None when none ships."""
    path = path or GAIN_MAP
    return json.loads(path.read_text()) if path.is_file() else None


def _cell_sentence(cell: dict) -> str | None:
    parts = []
    for name in MAP_PAIRS:
        e = (cell.get("pairs", {}).get(name) or {}).get("test")
        if not e:
            continue
        d = e["diff"]
        ci = (f" (95% CI {d['ci_low']:+.2f} to {d['ci_high']:+.2f})"
              if d.get("ci_low") is not None else "")
        conv = (e.get("doubling") or {}).get("converged")
        conv = {True: "converged", False: "not converged"}.get(conv, "convergence unchecked")
        reps = f"{d['n']} repetition{'s' if d['n'] != 1 else ''}"
        parts.append(f"{name} {d['mean']:+.2f} points{ci} over {reps}, {conv}")
    return f"{cell['label']}: " + "; ".join(parts) if parts else None


def map_note(run: RunData, path: Path | None = None) -> str | None:
    """Which regime the run is in and what the shipped gain map says there and elsewhere;
    None when no map ships."""
    summary = load_map(path)
    if summary is None:
        return None
    cells = list(summary.get("cells", {}).values())
    config = run.config or {}
    mine = {"labels_per_class": config.get("labels_per_class"),
            "ssl.unlabeled_pool": (config.get("ssl") or {}).get("unlabeled_pool")}
    spec_set = (summary.get("spec") or {}).get("set") or {}
    regime = {"dataset": spec_set.get("dataset", "fashion-mnist"),
              "task_images": spec_set.get("task_images", "all"),
              "half_seed": spec_set.get("half_seed", 0)}
    ours = {"dataset": config.get("dataset"), "task_images": config.get("task_images", "all"),
            "half_seed": config.get("half_seed", 0)}
    same_regime = ours == regime
    here = next((c for c in cells if same_regime and all(
        c["point"].get(k, mine[k]) == mine[k] for k in mine)), None)
    lines = [s for c in cells if (s := _cell_sentence(c))]
    if not lines:
        return None
    differs = ", ".join(f"{k} {ours[k]!r} (the map's: {regime[k]!r})" for k in regime
                        if ours[k] != regime[k])
    where = (f"This run sits in the gain map's cell {here['label']} (data/sweeps/gain-map.yaml, "
             "measured over independent repetitions)." if here else
             "This run is in none of the gain map's cells (data/sweeps/gain-map.yaml)" +
             (f": its {differs}." if differs else
              ": its labels per class or unlabeled pool is not on the map's grid."))
    return (f"{where} Test error differences in accuracy points, positive where the "
            "synthetic rows helped: " + " | ".join(lines) + ".")


def _keys(run: RunData, arm: str) -> dict[int, str]:
    found = run.arms.get(arm)
    return {s.seed: s.unit_key for s in (found.seeds if found else []) if s.unit_key}


def matching_repetitions(run: RunData, arm: str, against: str, summary: dict
                         ) -> tuple[dict, list[tuple[int, str]]] | None:
    """(map cell, [(this run's seed, map repetition)]) for the first cell with a repetition
    whose ``against`` unit has the same unit key as this run's for that seed, and whose
    ``arm`` unit does too where this run's is keyed (an arm the map's cell ran with other
    synthetic rows is another comparison, even beside the same ``against`` unit); None for
    none."""
    ours, theirs = _keys(run, against), _keys(run, arm)
    for cell in summary.get("cells", {}).values():
        matched = sorted((seed, rep) for seed, key in ours.items()
                         for rep, keys in (cell.get("unit_keys") or {}).items()
                         if keys.get(against) == key
                         and (seed not in theirs or keys.get(arm) == theirs[seed]))
        if matched:
            return cell, matched
    return None


def map_doubling(run: RunData, arm: str, against: str, path: Path | None = None) -> str | None:
    """The convergence sentence for a run without its own ``-2x`` arms whose ``against`` units
    are map repetitions: the map's doubling check at this very budget. None when no map ships,
    no unit matches, or the map did not double that cell either."""
    summary = load_map(path)
    found = matching_repetitions(run, arm, against, summary) if summary else None
    if found is None:
        return None
    cell, matched = found
    entry = ((cell.get("pairs") or {}).get(f"{arm} - {against}") or {}).get("test") or {}
    d = entry.get("doubling")
    if not d:
        return None
    seeds = ", ".join(str(s) for s, _ in matched)
    reps = ", ".join(r for _, r in matched)
    n = entry["diff"]["n"]
    both = all(s in _keys(run, arm) for s, _ in matched)
    many = both or len(matched) > 1
    units = f"{against} and {arm} units" if both else f"{against} unit{'s' if many else ''}"
    ours = (f"This run did not double its budget, but its {units} for seed"
            f"{'s' if len(matched) > 1 else ''} {seeds} {'are' if many else 'is'} "
            f"repetition{'s' if len(matched) > 1 else ''} {reps} of the gain map's cell "
            f"{cell['label']}: the same unit key{'s' if many else ''}, so the same labeled "
            "split, base model, synthetic rows, settings and steps (the run's other seeds "
            "differ only in the training seed).")
    moved = (f" There, over {n} independent repetitions, doubling the steps moved the "
             f"{against}'s test error from {d['baseline_k']:.2f}% to {d['baseline_2k']:.2f}% "
             f"({d['baseline_moved']:+.2f} points, "
             f"{'under' if d['baseline_converged'] else 'not under'} {d['tolerance']})")
    g2, gk = d.get("gain_2k"), d.get("gain_k") or {}
    if g2 is None or d.get("gain_stable") is None:
        gain = "; the gain at twice the steps has no 95% interval to hold it against"
    else:
        gain = (f" and left {arm} minus {against} at twice the steps, {g2['mean']:+.2f} "
                f"accuracy points, {'inside' if d['gain_stable'] else 'outside'} the 95% "
                f"interval at this budget ({gk['ci_low']:+.2f} to {gk['ci_high']:+.2f})")
    tail = {True: "This budget is converged by the map's check.",
            False: "By the map's check this budget is not converged: gains before "
                   "convergence are not gains at convergence."}.get(
        d.get("converged"), f"By the map's check the {against} is converged at this budget; "
                            "the gain's convergence is unchecked.")
    return f"{ours}{moved}{gain}. {tail}"
