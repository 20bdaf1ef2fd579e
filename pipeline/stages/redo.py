"""``augment run PRESET --redo STAGE``: move a stage's outputs aside so the run makes them
again, never deleting them.

Stage keys hash the config, never the bytes of upstream outputs, so a record made from the
old outputs would still match after they are remade. A remade output is not always
bit-identical to the one it replaces (GPU kernels, a damaged input that was read before it
was caught), so whatever was made from it cannot be trusted either: the redo moves the stage
*and every stage downstream of it* (``pipeline.stage_graph``), outputs and records, into one
``RUN_DIR/.trash/<stage>-<UTC time>/`` folder, keeping their paths. The rerun then makes them
again (adopting a sibling run's copy only where that passes its checks). This costs the
downstream work, and in exchange needs no change to how keys are made; nothing is lost: a
user who knows better can move files back from ``.trash/``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from pipeline.stage_graph import BY_NAME, STAGE_ORDER, STAGE_UPSTREAM, STAGES
from pipeline.stages.pseudo import ROUND_TWO_ARMS

TRASH = ".trash"


def with_downstream(stages: list[str]) -> list[str]:
    """``stages`` and every stage that depends on one of them, in run order."""
    unknown = [s for s in stages if s not in BY_NAME]
    if unknown:
        raise ValueError(f"no stage {', '.join(unknown)}; stages: {', '.join(STAGE_ORDER)}")
    chosen = set(stages)
    for name in STAGE_ORDER:  # a topological order: upstream stages come first
        if any(u in chosen for u in STAGE_UPSTREAM[name]):
            chosen.add(name)
    return [s for s in STAGE_ORDER if s in chosen]


def _shared_outputs() -> set[str]:
    """Declared output paths that more than one stage writes into (``ssl/``: round 1's arms
    and the loop's round-2 arms)."""
    seen: dict[str, int] = {}
    for s in STAGES:
        for p in s.outputs.values():
            seen[p] = seen.get(p, 0) + 1
    return {p for p, n in seen.items() if n > 1}


def stage_paths(run_dir: Path, stage: str) -> list[Path]:
    """What redoing ``stage`` moves: its record and its declared outputs; of a folder
    another stage writes into too (``ssl/``), only this stage's part: the loop's round-2
    arms, or everything else in it."""
    shared = _shared_outputs()
    paths = [run_dir / "stages" / f"{stage}.json"]
    for rel in BY_NAME[stage].outputs.values():
        if rel not in shared:
            paths.append(run_dir / rel.rstrip("/"))
        elif stage == "loop":
            paths += [run_dir / rel / arm for arm in ROUND_TWO_ARMS]
        else:
            paths += [p for p in sorted((run_dir / rel).glob("*")) if p.name not in ROUND_TWO_ARMS]
    return paths


def redo(run_dir: str | Path, stages: list[str], now: datetime | None = None,
         dry_run: bool = False) -> tuple[Path, list[str], list[Path]]:
    """Move the outputs and records of ``stages`` and their downstream stages into
    ``run_dir/.trash/<stages>-<time>/`` (same relative paths). Returns (that folder, the
    stages redone, the paths moved); ``dry_run`` moves nothing."""
    run_dir = Path(run_dir)
    todo = with_downstream(list(stages))
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    trash = run_dir / TRASH / f"{'+'.join(dict.fromkeys(stages))}-{stamp}"
    found = {p for s in todo for p in stage_paths(run_dir, s) if p.exists() or p.is_symlink()}
    # A path inside another one that moves (round-2/pseudo.parquet in round-2/) goes with it.
    moved = sorted(p for p in found if not any(a in found for a in p.parents))
    for path in [] if dry_run else moved:
        dest = trash / path.relative_to(run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)  # inside the run directory: one filesystem, a rename
    return trash, todo, moved
