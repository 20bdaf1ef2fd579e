"""The run store: run directories, their stage records and unit markers, reuse across runs,
and metering. The stages (bound in ``pipeline.stages``) do the work; this module is their
bookkeeping.

A run directory is ``<runs_dir>/<run_name>``, ``<preset>-<dataset>-<confighash8>`` as an ASCII
slug (``run_name``; the Prefect flow run and artifact keys take the same name): the same
config always maps to the same directory, so rerunning it resumes and skips finished stages. A stage writes
``stages/<stage>.json`` last (``run_stage``); a per-class unit writes ``unit.json`` last
(``run_unit``); a sibling run's finished outputs with the same key are hard-linked in
(``adopt_stage``, ``adopt_unit``) instead of recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import unicodedata
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import integrity
from pipeline.atomic import atomic_write_json, reserve_record, write_record
from pipeline.config import AugmentConfig, config_hash, saved_metadata
from pipeline.integrity import ROUND_TWO, UNIT_MARKER, IntegrityError, StageError  # noqa: F401
from pipeline.provenance import Meter, device_label
from pipeline.stage_graph import STAGE_ORDER

LOCK_NAME = "running.json"  # who holds the run's lock (pipeline.run_lock)
FAILED = "failed.json"  # the last failure: its stage and error
FAILED_SPARE = ".failed.json.spare"  # room set aside to write it on a full disk

log = logging.getLogger(__name__)


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``; None when missing, unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def slug(text: str, limit: int = 40) -> str:
    """``text`` as lowercase ASCII letters, digits and dashes (what Prefect artifact keys
    accept, and safe as a folder name anywhere): accents dropped, anything else a dash."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-")


def dataset_label(config: AugmentConfig) -> str:
    """The data a run reads, in a word: the folder's (or saved dataset's) own name where the
    config points at one, else the registered dataset's name."""
    if config.dataset_root:
        return Path(config.dataset_root).name or config.dataset
    return config.dataset


def run_name(config: AugmentConfig) -> str:
    """The one name of a run: its directory, its Prefect flow run, its artifact keys and its
    report title. Preset, data and config hash, because the preset alone is shared by runs
    that differ (``augment run demo --set dataset_root=digits`` once overwrote the demo's
    artifact); the data is left out where the preset's name already says it
    (``fashion-mnist-40labels``). Always ``[a-z0-9-]``, whatever the preset is called."""
    preset = slug(config.preset) or "custom"
    data = slug(dataset_label(config))
    parts = [preset] + ([data] if data and data not in preset else [])
    return "-".join(parts + [config_hash(config)[:8]])


def run_dir_for(config: AugmentConfig) -> Path:
    return config.runs_root() / run_name(config)


def init_run_dir(config: AugmentConfig) -> Path:
    """Create the run directory and save the config in it (``AugmentConfig.save_pretrained``)."""
    run_dir = run_dir_for(config)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(run_dir)
    reserve_record(run_dir / "stages" / FAILED_SPARE)
    return run_dir


def load_run_config(run_dir: str | Path) -> AugmentConfig:
    if not (Path(run_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a run directory?")
    return AugmentConfig.from_pretrained(run_dir)


# --------------------------------------------------------------------------- liveness


def _is_alive(info: dict | None) -> bool:
    if not info or info.get("host") != socket.gethostname():
        return bool(info)  # another host: trust the lock
    try:
        os.kill(int(info["pid"]), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------- listing


@dataclass
class RunInfo:
    path: Path
    preset: str
    config_hash: str
    status: str  # complete | running | incomplete | failed | empty
    stages_done: list[str] = field(default_factory=list)
    modified: float = 0.0
    wall_s: float = 0.0
    error: str | None = None


def current_failure(failure: dict | None, records: dict[str, dict | None]) -> dict | None:
    """``failure`` unless the stage it names has finished since (a rerun that got past it
    but could not remove the record, or wrote it on a full disk): an old stage shown as the
    run's failure sends its reader to the wrong place."""
    if not failure:
        return None
    rec = records.get(str(failure.get("stage"))) or {}
    if float(rec.get("finished", 0) or 0) > float(failure.get("time", 0) or 0):
        return None
    return failure


def run_status(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json") or {}
    stages_dir = run_dir / "stages"
    records = {p.stem: read_json(p) for p in stages_dir.glob("*.json")
               if p.name not in (LOCK_NAME, FAILED)}
    done = [s for s in STAGE_ORDER if records.get(s)]
    failure = current_failure(read_json(stages_dir / FAILED), records)
    if "report" in done:
        status = "complete"
    elif _is_alive(read_json(stages_dir / LOCK_NAME)):
        status = "running"
    elif failure:
        status = "failed"
    else:
        status = "incomplete" if done else "empty"
    mtimes = [p.stat().st_mtime for p in [run_dir, *stages_dir.glob("*.json")] if p.exists()]
    return RunInfo(run_dir, cfg.get("preset", run_dir.name.rsplit("-", 1)[0]),
                   saved_metadata(cfg).get("config_hash", ""), status, done, max(mtimes, default=0.0),
                   sum(float(r.get("wall_s", 0.0)) for s, r in records.items() if s in STAGE_ORDER
                       and r),
                   failure.get("error") if failure and status == "failed" else None)


def list_runs(runs_root: str | Path) -> list[RunInfo]:
    """Every run directory under ``runs_root`` (newest first)."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [run_status(p) for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(("_", ".")) and (p / "config.json").exists()]
    return sorted(runs, key=lambda r: r.modified, reverse=True)


# --------------------------------------------------------------------------- reuse


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` (file or tree) to ``dst`` through a temp name, then swap it in."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.adopt-{os.getpid()}")
    remove_tree(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(tmp))
    remove_tree(dst)
    os.replace(tmp, dst)


def sibling_runs(run_dir: Path):
    """Other run directories beside this one (for a round-2 folder: their round-2 folders)."""
    if run_dir.name == ROUND_TWO:
        yield from (other / ROUND_TWO for other in sibling_runs(run_dir.parent)
                    if (other / ROUND_TWO).is_dir())
        return
    root = run_dir.parent
    if not root.is_dir():
        return
    for other in sorted(root.iterdir()):
        if other.is_dir() and other.resolve() != run_dir.resolve() \
                and not other.name.startswith((".", "_")):
            yield other


def owner_run(path: Path) -> str:
    """The run a folder belongs to (a round-2 folder belongs to its parent run)."""
    return path.parent.name if path.name == ROUND_TWO else path.name


def adopt_stage(run_dir: Path, stage: str, key: str) -> dict | None:
    """Link a sibling run's finished outputs of this stage (same key) into ``run_dir``."""
    for other in sibling_runs(run_dir):
        rec = read_json(other / "stages" / f"{stage}.json")
        if not rec or rec.get("key") != key:
            continue
        outputs = [other / rel for rel in flat_outputs(rec.get("outputs", {}))]
        if not all(p.exists() for p in outputs):
            continue
        try:  # a hard link shares the bytes: a damaged sibling must not spread
            integrity.check_record(other, stage, rec, flat_outputs(rec.get("outputs", {})))
        except IntegrityError as e:
            log.warning("stage %s: not adopted from run %s: %s", stage, owner_run(other), e)
            continue
        for p in outputs:
            place(p, run_dir / p.relative_to(other))
        rec = {**rec, "adopted_from": owner_run(other)}
        atomic_write_json(run_dir / "stages" / f"{stage}.json", rec)
        return rec
    return None


def adopt_unit(run_dir: Path, rel: str, key: str) -> dict | None:
    for other in sibling_runs(run_dir):
        marker = read_json(other / rel / UNIT_MARKER)
        if marker and marker.get("key") == key:
            if (problem := integrity.unit_problem(other / rel, marker)) is not None:
                log.warning("%s: not adopted from run %s: %s: %s", rel, owner_run(other),
                            *problem)
                continue
            place(other / rel, run_dir / rel)
            return {**marker, "adopted_from": owner_run(other)}
    return None


def flat_outputs(outputs: dict) -> list[str]:
    out = []
    for v in outputs.values():
        if isinstance(v, dict):
            out += flat_outputs(v)
        elif isinstance(v, list):
            out += [str(x) for x in v]
        elif v:
            out.append(str(v))
    return out


# --------------------------------------------------------------------------- stage frame

# Figures a reader looks for first in a stage's end line; the rest follow in record order.
_FIRST = ("error", "accuracy", "precision", "loss", "consistency")


def key_figures(metrics: dict, limit: int = 8) -> str:
    """A record's scalar metrics as ``k=v, ...`` (at most ``limit``; lists, tables and ids
    stay in the record): a log line short enough to read in a worker's log."""
    items = [(k, v) for k, v in metrics.items() if k not in ("fingerprint", "key")
             and (isinstance(v, (int, float)) or isinstance(v, str) and len(v) <= 40)]
    items.sort(key=lambda kv: not any(w in kv[0] for w in _FIRST))  # stable: record order
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in items[:limit])


def _log_end(what: str, rec: dict) -> None:
    figures = key_figures(rec.get("metrics") or {})
    log.info("%s: done in %.1f s%s", what, rec.get("wall_s", 0.0),
             f"; {figures}" if figures else "")



def finished_record(run_dir: Path, stage: str, key: str) -> dict | None:
    rec = read_json(Path(run_dir) / "stages" / f"{stage}.json")
    return rec if rec and rec.get("key") == key else None


def run_stage(run_dir: Path, config: AugmentConfig, stage: str, key: str,
               body: Callable[[str], tuple[dict, dict]], adopt: bool = True) -> dict:
    """Skip (same key), adopt (sibling with same key), or run ``body`` and record it."""
    run_dir = Path(run_dir)
    rec = finished_record(run_dir, stage, key)
    if rec is not None:
        integrity.check_record(run_dir, stage, rec, flat_outputs(rec.get("outputs", {})))
        log.info("stage %s: finished before with key %s, skipped", stage, key)
        return {**rec, "skipped": True}
    if adopt and (rec := adopt_stage(run_dir, stage, key)) is not None:
        log.info("stage %s: adopted from run %s (key %s)", stage, rec["adopted_from"], key)
        return rec
    device = config.resolved_device()
    log.info("stage %s: start (key %s, device %s)", stage, key, device)
    with Meter(device) as m:
        outputs, metrics = body(device)
    rec = {"stage": stage, "key": key, "started": m.started, "finished": m.finished,
           "wall_s": round(m.wall_s, 3), "peak_mem_mb": round(m.peak_mb, 1),
           "device": device_label(device), "outputs": outputs, "metrics": metrics,
           "files": integrity.record_hashes(run_dir, stage, flat_outputs(outputs))}
    atomic_write_json(run_dir / "stages" / f"{stage}.json", rec)
    _log_end(f"stage {stage}", rec)
    return rec


def run_unit(run_dir: Path, rel: str, key: str, config: AugmentConfig,
          body: Callable[[Path, str], dict]) -> dict:
    """One unit of a mapped stage (a class's adapter or samples) in ``run_dir/rel``.

    ``body(dir, device)`` writes the unit's files into ``dir`` and returns its metrics;
    the marker ``unit.json`` (with the key) is written last.
    """
    unit_dir = Path(run_dir) / rel
    marker = read_json(unit_dir / UNIT_MARKER)
    if marker and marker.get("key") == key:
        integrity.check_unit(Path(run_dir), rel, marker)  # a unit that fails it is not reused
        # Debug: a mapped stage re-reads every unit its tasks just finished.
        log.debug("%s: finished before with key %s, skipped", rel, key)
        return {**marker, "skipped": True}
    if (adopted := adopt_unit(Path(run_dir), rel, key)) is not None:
        log.info("%s: adopted from run %s (key %s)", rel, adopted["adopted_from"], key)
        return adopted
    device = config.resolved_device()
    log.info("%s: start (key %s, device %s)", rel, key, device)
    with Meter(device) as m:
        metrics = body(unit_dir, device)
    marker = {"unit": rel, "key": key, "started": m.started, "finished": m.finished,
              "wall_s": round(m.wall_s, 3), "peak_mem_mb": round(m.peak_mb, 1),
              "device": device_label(device), "metrics": metrics,
              "files": integrity.unit_hashes(unit_dir)}
    atomic_write_json(unit_dir / UNIT_MARKER, marker)
    _log_end(rel, marker)
    return marker


def aggregate_units(run_dir: Path, config: AugmentConfig, stage: str, key: str,
                     units: dict[str, dict], outputs: dict, metrics: dict) -> dict:
    """Stage record for a mapped stage: wall time and memory summed/maxed over its units."""
    done = [u for u in units.values()]
    device = config.resolved_device()
    rec = {"stage": stage, "key": key,
           "started": min((u.get("started", time.time()) for u in done), default=time.time()),
           "finished": time.time(),
           "wall_s": round(sum(u.get("wall_s", 0.0) for u in done), 3),
           "peak_mem_mb": max((u.get("peak_mem_mb", 0.0) for u in done), default=0.0),
           "device": device_label(device), "outputs": outputs,
           "metrics": {**metrics, "units": {name: u.get("metrics", {}) for name, u in units.items()}}}
    atomic_write_json(Path(run_dir) / "stages" / f"{stage}.json", rec)
    return rec


def run_mapped_stage(root: Path, config: AugmentConfig, stage: str, key: str,
                     units: Callable[[], dict[str, dict]],
                     summary: Callable[[dict[str, dict]], tuple[dict, dict]]) -> dict:
    """A stage made of units (one per class, or per arm and seed): skip it when recorded
    under ``key``; else run ``units()`` (each skips or adopts itself when finished) and
    record the stage with ``summary(units) -> (outputs, metrics)``."""
    rec = finished_record(root, stage, key)
    if rec is not None:
        integrity.check_record(root, stage, rec, flat_outputs(rec.get("outputs", {})))
        log.info("stage %s: finished before with key %s, skipped", stage, key)
        return {**rec, "skipped": True}
    log.info("stage %s: start (key %s)", stage, key)
    done = units()
    outputs, metrics = summary(done)
    rec = aggregate_units(root, config, stage, key, done, outputs, metrics)
    _log_end(f"stage {stage} ({len(done)} units, summed)", rec)
    return rec


@contextmanager
def stage_failure_recorded(run_dir: Path, stage: str):
    """Record which stage failed (``stages/failed.json``) so ``augment runs`` can say why."""
    try:
        yield
    except BaseException as e:
        stages_dir = Path(run_dir) / "stages"
        record = {"stage": stage, "error": f"{type(e).__name__}: {e}"[:2000], "time": time.time()}
        try:  # in place of the last record, or in the room set aside, when the disk is full
            write_record(stages_dir / FAILED, record, spare=stages_dir / FAILED_SPARE)
        except OSError as also:
            log.error("could not record the failure of stage %s in %s: %s", stage,
                      stages_dir / FAILED, also)
        raise
