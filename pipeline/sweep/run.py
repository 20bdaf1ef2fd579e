"""Run one repetition of one sweep cell: the pipeline's own stages, then its arms.

A repetition is a run directory like any other (``pipeline.runs``): the stages up to the
shards run (or are skipped, or adopted from a sibling run with the same keys: cells that
differ only in the classifier's settings share their synthesis), then each arm is one
classifier unit (``pipeline.stages.ssl.run_ssl_arm``). The repetition's figures
are written last to ``cells/<cell>/rep-<r>.json`` in the sweep's folder, so a rerun reads
them back without opening a run directory; a changed cell has a new folder and reruns
alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import atomic_write_json
from pipeline.config import AugmentConfig
from pipeline.runs import UNIT_MARKER, read_json

from .spec import Cell, SweepSpec

SYNTHESIS_STAGES = ("split", "encode", "tune", "sample", "shards")
# What a repetition's record keeps of each arm's metrics.json.
KEPT = ("top1_error", "val_error", "steps", "train_time_s", "steps_per_s", "num_labeled",
        "num_unlabeled", "num_synthetic", "num_validation", "net", "device", "final_evals",
        "fingerprint")
CURVE_COLUMNS = ("step", "test_error", "eval_images")


def _synthesis_lock(runs_root: Path, key: str):
    """Cells that differ only in the classifier's settings share their synthesis (the same
    stage keys): one worker (thread or process) makes it while the others wait on this file
    lock, then adopt it (pipeline.runs.adopt_stage)."""
    from filelock import FileLock

    locks = Path(runs_root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"synthesis-{key}.lock"))


def unit_keys(config: AugmentConfig) -> dict[str, str]:
    """Each arm's unit key: what its result depends on (split, shards, base model content,
    the ssl settings), so a record is reused only for the same inputs."""
    from pipeline.stages.keys import ssl_unit_key, stage_keys
    from pipeline.stages.pseudo import ROUND_TWO_ARMS

    keys = stage_keys(config)
    (seed,) = config.ssl.seeds
    arms = list(config.ssl.arms) + (list(ROUND_TWO_ARMS) if config.loop.rounds == 2 else [])
    return {arm: ssl_unit_key(config, keys, arm, seed) for arm in arms}


def sweep_dir(spec: SweepSpec, runs_root: Path) -> Path:
    return Path(spec.runs_dir) if spec.runs_dir else Path(runs_root) / "sweeps" / spec.name


def rep_record_path(folder: Path, cell: Cell, r: int) -> Path:
    return Path(folder) / "cells" / cell.slug / f"rep-{r}.json"


def needs_shards(config: AugmentConfig) -> bool:
    from pipeline.ssl.arm_names import EXTRA_ROW_ARMS

    # Round 2 tunes from the round-1 adapters and samples like round 1.
    return config.loop.rounds == 2 or \
        any(a in EXTRA_ROW_ARMS and a != "replay" for a in config.ssl.arms)


def run_repetition(config: AugmentConfig, log: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    """Stages up to the shards (when an arm reads them), then every arm of ``config.ssl``
    with its one seed; returns {"run_dir", "stages", "arms": {arm: kept metrics}}."""
    from pipeline.run_lock import run_lock
    from pipeline.runs import run_dir_for

    if config.pretrains_base:
        raise ValueError("a sweep tunes on a fixed base_model; this config pretrains one "
                         "(remove its pretrain: section, or pretrain once with `augment "
                         "pretrain` and name the folder as base_model)")
    # Each repetition has its own run directory (the seed is in its config hash), so the
    # parallel workers never wait on each other's: this lock keeps out a second sweep or an
    # `augment run` of the same config. It is taken before the synthesis lock, and each
    # worker holds one run lock at most, so no two workers wait on each other in a circle.
    with run_lock(run_dir_for(config)):
        return _run_repetition(config, log)


def _run_repetition(config: AugmentConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from pipeline.runs import init_run_dir
    from pipeline.stages import STAGE_FUNCTIONS
    from pipeline.stages.inputs import ssl_rel
    from pipeline.stages.keys import stage_keys
    from pipeline.stages.loop import run_loop
    from pipeline.stages.pseudo import ROUND_TWO_ARMS
    from pipeline.stages.ssl import run_ssl_arm

    run_dir = init_run_dir(config)
    arms = list(config.ssl.arms)
    stage_log = {}
    todo = SYNTHESIS_STAGES if needs_shards(config) else ("split",)
    with _synthesis_lock(config.runs_root(), stage_keys(config)[todo[-1]]):
        for stage in todo:
            rec = STAGE_FUNCTIONS[stage](run_dir, config)
            stage_log[stage] = ("skipped" if rec.get("skipped") else
                                f"adopted from {rec['adopted_from']}" if rec.get("adopted_from")
                                else f"{rec.get('wall_s', 0):.0f} s")
            log(f"{run_dir.name} {stage}: {stage_log[stage]}")
    (seed,) = config.ssl.seeds
    out = {}

    def collect(arm: str, unit: dict) -> None:
        unit_dir = run_dir / ssl_rel(arm, seed)
        metrics = read_json(unit_dir / "metrics.json") or {}
        curve = pd.read_parquet(unit_dir / "learning_curve.parquet")
        out[arm] = {**{k: metrics.get(k) for k in KEPT},
                    "curve": curve[[c for c in CURVE_COLUMNS if c in curve]].to_dict("list"),
                    **{k: v for k, v in (unit.get("metrics") or {}).items()
                       if k.startswith(("control_", "selftrain_"))}}
        log(f"{run_dir.name} {arm}: test error {100 * metrics['top1_error']:.2f}% "
            f"({metrics.get('train_time_s', 0):.0f} s)")

    for arm in arms:
        collect(arm, run_ssl_arm(run_dir, config, arm, seed))
    if config.loop.rounds == 2:  # pseudo-labels from the baseline, round 2, its two arms
        run_loop(run_dir, config)
        for arm in ROUND_TWO_ARMS:
            collect(arm, read_json(Path(run_dir) / ssl_rel(arm, seed) / UNIT_MARKER) or {})
    return {"run_dir": str(run_dir), "stages": stage_log, "arms": out}


def run_cell_repetition(spec: SweepSpec, cell: Cell, r: int, folder: Path,
                        extra: dict[str, Any] | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """One repetition of one cell; its record is reused when present for the same config."""
    from pipeline.config import config_hash
    from pipeline.sweep.spec import repetition_config

    config = repetition_config(spec, cell, r, extra)
    path = rep_record_path(folder, cell, r)
    keys = unit_keys(config)
    done = read_json(path)
    if done and done.get("unit_keys") == keys:
        return done
    record = {"cell": cell.point, "rep": r, "config_hash": config_hash(config),
              "unit_keys": keys, **run_repetition(config, log)}
    atomic_write_json(path, record)
    return record


def load_records(folder: Path, spec: SweepSpec, extra: dict[str, Any] | None = None
                 ) -> dict[str, dict[int, dict]]:
    """Every finished repetition record of the spec's cells, {cell slug: {r: record}}: only
    records made for the inputs the spec names now (the same unit keys), so a stale record
    (an older base model, a failed rerun) never enters the statistics."""
    from pipeline.sweep.spec import repetition_config

    out: dict[str, dict[int, dict]] = {}
    for cell in spec.cells():
        recs = {}
        for r in spec.repetitions:
            path = rep_record_path(folder, cell, r)
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("unit_keys") == unit_keys(repetition_config(spec, cell, r, extra)):
                recs[r] = record
        out[cell.slug] = recs
    return out
