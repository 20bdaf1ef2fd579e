"""Nothing reused that was not checked: what a stage skips, adopts or a report reads is
compared with what was recorded when it was written.

- A stage record (``stages/<stage>.json``) keeps the sha256 of the files its outputs hold
  (``files``); a shard set is checked against its own manifest (sha256 and rows of every
  shard, ``num_rows`` their sum) and only the manifest's hash goes into the record.
- A unit marker (``unit.json``) keeps the sha256 of every file in its folder (``files``), and
  a unit's contents get a check of their kind: adapter weights finite and of the recorded
  shapes, an SSL ``metrics.json`` against its schema.

A failure is an :class:`IntegrityError` naming the file, what is wrong with it and the
command that redoes the stage (``augment run RUN_DIR --redo STAGE``, which moves the bad
outputs to ``RUN_DIR/.trash/`` rather than deleting them). Cost: one sha256 pass over the
outputs per reuse, about 1.6 GB/s here; the largest reused outputs (shards, samples) are tens
of MB for the shipped presets. Records and markers written before ``files`` existed are
checked for what they can be (shard manifests, unit contents).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.digest import file_sha256
from pipeline.stage_graph import STAGES

ROUND_TWO = "round-2"  # the second round's folder inside a run (loop.rounds: 2)
UNIT_MARKER = "unit.json"
# A report is a view that `augment report` rewrites at will and nothing reads back: its
# files are not held to the hashes of the run that first wrote them.
UNHASHED_STAGES = frozenset({"report"})

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage cannot run because an upstream output is missing or inconsistent."""


class IntegrityError(StageError):
    """A finished output no longer matches its record; the message names the file and the
    ``--redo`` command that makes it again."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- what to redo


def run_dir_of(root: Path) -> Path:
    """The run directory a stage root belongs to (``round-2/`` belongs to its parent)."""
    return root.parent if root.name == ROUND_TWO else root


def stage_of(root: Path, rel: str) -> str:
    """The stage that wrote ``rel`` (a unit folder or output) under ``root``: for anything in
    ``round-2/`` the loop, which redoes the whole second round."""
    if root.name == ROUND_TWO:
        return "loop"
    top = rel.strip("/").split("/", 1)[0]
    for s in STAGES:
        if any(p.strip("/").split("/", 1)[0] == top for p in s.outputs.values()):
            return s.name
    return top


def redo_command(root: Path, stage: str) -> str:
    run_dir = run_dir_of(Path(root))
    stage = "loop" if Path(root).name == ROUND_TWO else stage
    return (f"`augment run {run_dir} --redo {stage}` (moves the stage's outputs, and those "
            f"made from them, to {run_dir / '.trash'}/ and makes them again)")


def _fail(root: Path, stage: str, what: str) -> IntegrityError:
    return IntegrityError(f"{what}; redo it with {redo_command(root, stage)}")


# --------------------------------------------------------------------------- hashes


def hash_tree(base: Path, rels: Iterable[str], skip: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file at or under each of ``rels`` (relative to ``base``), keyed by its
    path relative to ``base``; names in ``skip`` left out."""
    skip, out = set(skip), {}
    for rel in rels:
        path = base / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) \
            if path.is_dir() else []
        for f in files:
            if f.name not in skip:
                out[f.relative_to(base).as_posix()] = file_sha256(f)
    return out


def check_hashes(base: Path, files: dict[str, str], stage: str, recorded_in: Path) -> None:
    for rel, sha in files.items():
        path = base / rel
        if not path.is_file():
            raise _fail(base, stage, f"{path}, recorded in {recorded_in}, is missing")
        if file_sha256(path) != sha:
            raise _fail(base, stage, f"{path} was altered since {recorded_in} recorded it "
                                     "(its sha256 differs)")


# --------------------------------------------------------------------------- stage records


def _shard_dirs(root: Path, rels: Iterable[str]) -> list[str]:
    from pipeline.data.shard_format import manifest_path

    return [r for r in rels if (root / r).is_dir() and manifest_path(root / r).is_file()]


def record_hashes(root: Path, stage: str, rels: list[str]) -> dict[str, str]:
    """The ``files`` of a stage record: every output file's sha256; for a shard set only the
    manifest's (it holds the shards' own); none for a report or for unit folders (their
    markers hold theirs)."""
    from pipeline.data.shard_format import manifest_path

    if stage in UNHASHED_STAGES:
        return {}
    shards = _shard_dirs(root, rels)
    plain = [r for r in rels if r not in shards and not (root / r / UNIT_MARKER).is_file()]
    files = hash_tree(root, plain)
    for r in shards:
        files |= hash_tree(root, [manifest_path(root / r).relative_to(root).as_posix()])
    return files


def check_record(root: Path, stage: str, rec: dict, rels: list[str]) -> None:
    """Raise IntegrityError unless the finished stage's outputs (``rels``, relative to
    ``root``) still are what its record says: shard sets against their manifests, unit
    folders against their markers, then every recorded file's sha256."""
    from pipeline.data.shard_format import ShardError
    from pipeline.data.shards import verify_shards

    record = root / "stages" / f"{stage}.json"
    for rel in _shard_dirs(root, rels):
        try:
            verify_shards(root / rel)
        except ShardError as e:
            raise _fail(root, stage, str(e)) from e
    for rel in rels:
        if (root / rel / UNIT_MARKER).is_file():
            check_unit(root, rel, _read_json(root / rel / UNIT_MARKER))
    if stage not in UNHASHED_STAGES:
        check_hashes(root, rec.get("files") or {}, stage, record)


def check_round(round_root: Path) -> None:
    """Every finished stage of a round folder (``round-2/``) against its record, for a loop
    stage that is skipped without entering them."""
    for path in sorted((round_root / "stages").glob("*.json")):
        rec = _read_json(path)
        if rec.get("key"):
            check_record(round_root, path.stem, rec, _flat(rec.get("outputs") or {}))


def _flat(outputs: dict) -> list[str]:
    out: list[str] = []
    for v in outputs.values():
        out += _flat(v) if isinstance(v, dict) else [str(x) for x in v] \
            if isinstance(v, list) else [str(v)] if v else []
    return out


# --------------------------------------------------------------------------- units


def unit_hashes(unit_dir: Path) -> dict[str, str]:
    """The ``files`` of a unit marker: every file in the unit's folder but the marker."""
    return hash_tree(unit_dir, ["."], skip=[UNIT_MARKER])


def unit_problem(unit_dir: Path, marker: dict, only: Iterable[str] | None = None
                 ) -> tuple[Path, str] | None:
    """(file, what is wrong with it) for a finished unit, or None: a content check of its
    kind first (it says what is wrong: NaN weights, a truncated metrics file), then the sha256
    of every file its marker recorded (``only``: of these names alone)."""
    from pipeline.ssl.metrics_check import METRICS_FILE, metrics_problem

    files = marker.get("files") or {}
    metrics = unit_dir / METRICS_FILE
    if (metrics.exists() or METRICS_FILE in files) and \
            (problem := metrics_problem(metrics)) is not None:
        return metrics, problem
    weights = unit_dir / "adapter_model.safetensors"
    if weights.exists() and (only is None or weights.name in only):
        from anl_core.inject import AdapterWeightsError, check_adapter_weights

        try:
            check_adapter_weights(weights)
        except AdapterWeightsError as e:
            return weights, str(e).replace(f"adapter weights {weights}: ", "")
    for rel, sha in files.items():
        path = unit_dir / rel
        if only is not None and rel not in only:
            continue
        if not path.is_file():
            return path, f"missing, but {unit_dir / UNIT_MARKER} records it"
        if file_sha256(path) != sha:
            return path, f"altered since {unit_dir / UNIT_MARKER} recorded it (sha256 differs)"
    return None


def check_unit(root: Path, rel: str, marker: dict) -> None:
    """Raise IntegrityError if the finished unit ``root/rel`` fails :func:`unit_problem`."""
    if (problem := unit_problem(root / rel, marker)) is not None:
        path, what = problem
        raise _fail(root, stage_of(root, rel), f"{path}: {what}")
