"""Write and read Parquet shards of labeled images, with a manifest written last.

Every shard is written under a temporary name and renamed when complete; ``.manifest.json``
(row count, bytes, sha256 and class histogram per shard) is written last, atomically. A
directory without a manifest is an unfinished write; readers check every shard against
the manifest and refuse a missing, truncated or altered one.

The format both sides share (the row schema, the manifest's name and version, the PNG codec)
is :mod:`pipeline.data.shard_format`. The torch streaming reader, which needs torch, is
:mod:`pipeline.data.shard_dataset`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write_text, new_file_mode, temp_prefix
from pipeline.data.shard_format import (
    IMAGE_TYPE,
    LEGACY_MANIFEST,
    MANIFEST,
    PROVENANCE_TYPES,
    SOURCES,
    ShardError,
    build_manifest,
    decode_image_column,
    encode_pngs,
    load_manifest,
    manifest_path,
    shard_schema,
)
from pipeline.digest import file_sha256

MiB = 2**20
# Parquet bytes per row besides the PNG (label, names, provenance), for the shard size bound.
_ROW_OVERHEAD = 64


# --------------------------------------------------------------------------- small helpers


def _claim_dir(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir``; refuse a finished shard set there unless ``overwrite``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest_path(out_dir)
    if manifest.exists():
        if not overwrite:
            raise ShardError(
                f"{out_dir} already holds a finished shard set ({manifest.name}); "
                "pass overwrite=True to replace it, or write to another directory")
        try:
            old = json.loads(manifest.read_text()).get("shards", [])
        except json.JSONDecodeError:
            old = []
        # First, so a crash below leaves "unfinished", never "mixed"; both names, so no old
        # manifest is left for a folder reader to trip over.
        for name in (MANIFEST, LEGACY_MANIFEST):
            (out_dir / name).unlink(missing_ok=True)
        for entry in old:
            (out_dir / entry["file"]).unlink(missing_ok=True)


def _remove_stale(out_dir: Path, prefix: str, keep: set[str]) -> None:
    """Delete shards of an earlier crashed run that would otherwise sit beside ours, unlisted."""
    for path in out_dir.glob(f"{prefix}-*.parquet"):
        if path.name not in keep and re.fullmatch(rf"{re.escape(prefix)}-\d+\.parquet", path.name):
            path.unlink()


def _per_row(name: str, value: Any, n: int) -> list:
    """A provenance value given as a scalar (same for every row) or one value per row."""
    if value is None or isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        item = value.item() if isinstance(value, np.generic) else value
        return [item] * n
    values = np.asarray(value, dtype=object).tolist()
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} images; give one per image "
                         "or a single scalar")
    return values


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Write labeled uint8 images into size-bounded Parquet shards, then the manifest.

    Use as a context manager: a clean exit writes ``.manifest.json``; an exception removes
    every file this writer made, so a failed stage leaves no half-written shard set.

    ``rows_per_shard`` and ``max_shard_bytes`` bound each shard (whichever comes first);
    ``row_group_rows`` is the unit of reading and shuffling. A directory that already holds
    a manifest is refused unless ``overwrite=True``.
    """

    def __init__(self, out_dir: str | Path, class_names: Sequence[str], rows_per_shard: int = 4096,
                 row_group_rows: int = 1024, max_shard_bytes: int = 256 * MiB,
                 prefix: str = "shard", *, overwrite: bool = False,
                 image_shape: Sequence[int] | None = None, compress_level: int = 1) -> None:
        if rows_per_shard < 1 or row_group_rows < 1 or max_shard_bytes < 1:
            raise ValueError("rows_per_shard, row_group_rows and max_shard_bytes must be >= 1")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
            raise ValueError(f"prefix must be letters, digits, '-' or '_'; got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.class_names = tuple(str(c) for c in class_names)
        if not self.class_names:
            raise ValueError("class_names is empty")
        self.rows_per_shard, self.row_group_rows = int(rows_per_shard), int(row_group_rows)
        self.max_shard_bytes, self.prefix = int(max_shard_bytes), prefix
        self.compress_level = compress_level
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape else None
        self.schema = shard_schema(self.class_names)
        _claim_dir(self.out_dir, overwrite)
        self._pending: list[pa.Table] = []
        self._pending_sizes: list[np.ndarray] = []
        self._shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._cur: dict = {}
        self._closed = False
        self.manifest: dict | None = None

    # ----------------------------------------------------------------------- public

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self._shards) + self._cur.get("rows", 0) + \
            sum(len(t) for t in self._pending)

    def write(self, images: np.ndarray, labels: Sequence[int] | np.ndarray, *,
              source: str = "synthetic", condition_id=None, adapter_id=None, seed=None,
              mask_ratio=None, guidance=None, steps=None) -> None:
        """Append images (uint8 N, H, W, C) with their labels and provenance.

        Each provenance field is a scalar for all rows or a sequence with one value per row;
        None (or None entries) is stored as null.
        """
        if self._closed:
            raise ShardError("this ShardWriter is closed; open a new one")
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} "
                             f"{images.shape}; convert model outputs with "
                             "pipeline.data.images.from_model_space")
        if self.image_shape is None:
            self.image_shape = tuple(int(s) for s in images.shape[1:])
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"images are {tuple(images.shape[1:])} but this shard set holds "
                             f"{self.image_shape}; write other sizes to another directory")
        n = len(images)
        labels = np.asarray(labels).reshape(-1)
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}); "
                             f"got {labels.min()}..{labels.max()}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if n == 0:
            return
        provenance = {"condition_id": condition_id, "adapter_id": adapter_id, "seed": seed,
                      "mask_ratio": mask_ratio, "guidance": guidance, "steps": steps}
        columns = {}
        for name, typ in PROVENANCE_TYPES.items():  # checked before the costly PNG encoding
            try:
                columns[name] = pa.array(_per_row(name, provenance[name], n), typ)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ValueError(f"{name} must be {typ} (or None): {e}") from e
        pngs = encode_pngs(images, self.compress_level)
        columns |= {
            "image": pa.StructArray.from_arrays(
                [pa.array(pngs, pa.binary()), pa.nulls(n, pa.string())], fields=list(IMAGE_TYPE)),
            "label": pa.array(labels, pa.int64()),
            "label_name": pa.array(self.class_names, pa.string()).take(labels),
            "source": pa.array([source] * n, pa.string()),
        }
        self._pending.append(pa.table(columns, schema=self.schema))
        self._pending_sizes.append(np.fromiter(map(len, pngs), np.int64, n) + _ROW_OVERHEAD)
        self._drain(final=False)

    def close(self) -> dict:
        """Flush the rest, finish the last shard, then write the manifest (atomically)."""
        if self._closed:
            if self.manifest is None:
                raise ShardError("this ShardWriter was aborted; nothing to close")
            return self.manifest
        self._drain(final=True)
        self._finish_shard()
        self._closed = True
        _remove_stale(self.out_dir, self.prefix, {s["file"] for s in self._shards})
        self.manifest = build_manifest(self._shards, self.class_names, self.image_shape,
                                       self.schema, self.row_group_rows)
        atomic_write_text(self.out_dir / MANIFEST, json.dumps(self.manifest, indent=1),
                          fsync=True)
        return self.manifest

    def abort(self) -> None:
        """Remove everything this writer wrote; no manifest is written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for s in self._shards:
            (self.out_dir / s["file"]).unlink(missing_ok=True)
        self._shards, self._pending, self._closed = [], [], True

    # ----------------------------------------------------------------------- internals

    def _drain(self, final: bool) -> None:
        """Move pending rows into row groups, rolling to a new shard at either bound."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        sizes = np.concatenate(self._pending_sizes)
        pos = 0
        while (avail := len(table) - pos) > 0 and (final or avail >= self.row_group_rows):
            if self._writer is None:
                self._start_shard()
            cur = self._cur
            n = min(self.row_group_rows, self.rows_per_shard - cur["rows"], avail)
            cum = np.cumsum(sizes[pos:pos + n])
            fit = int(np.searchsorted(cum, self.max_shard_bytes - cur["bytes"], side="right"))
            if fit == 0 and cur["rows"] > 0:
                self._finish_shard()
                continue
            n = max(fit, 1) if fit < n else n  # an oversized single image still gets a shard
            group = table.slice(pos, n)
            self._writer.write_table(group, row_group_size=n)
            cur["groups"].append(n)
            cur["rows"] += n
            cur["bytes"] += int(cum[n - 1])
            cur["hist"] += np.bincount(group.column("label").to_numpy(),
                                       minlength=len(self.class_names))
            for src in SOURCES:
                cur["sources"][src] += int(pc.sum(
                    pc.equal(group.column("source"), src)).as_py() or 0)
            pos += n
            if cur["rows"] >= self.rows_per_shard or cur["bytes"] >= self.max_shard_bytes:
                self._finish_shard()
        self._pending = [table.slice(pos)] if pos < len(table) else []
        self._pending_sizes = [sizes[pos:]] if pos < len(table) else []

    def _start_shard(self) -> None:
        name = f"{self.prefix}-{len(self._shards):05d}.parquet"
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=temp_prefix(name))
        os.close(fd)
        self._tmp = Path(tmp)
        # PNG bytes are already compressed: storing them raw saves CPU and costs nothing.
        compression = {c: "ZSTD" for c in self.schema.names if c != "image"}
        compression |= {"image.bytes": "NONE", "image.path": "ZSTD"}
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, compression=compression,
            use_dictionary=["label_name", "source", "adapter_id"],
            write_statistics=["label", *PROVENANCE_TYPES])
        self._cur = {"file": name, "rows": 0, "bytes": 0, "groups": [],
                     "hist": np.zeros(len(self.class_names), np.int64),
                     "sources": dict.fromkeys(SOURCES, 0)}

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self.out_dir / self._cur["file"]
        os.chmod(self._tmp, new_file_mode())  # as pipeline.atomic's files: not mkstemp's 0600
        os.replace(self._tmp, final)
        self._tmp = None
        cur = self._cur
        self._shards.append({
            "file": cur["file"], "rows": cur["rows"], "bytes": final.stat().st_size,
            "sha256": file_sha256(final), "row_groups": cur["groups"],
            "class_histogram": cur["hist"].tolist(), "sources": cur["sources"],
        })
        self._cur = {}


# --------------------------------------------------------------------------- reader


def verify_shards(shard_dir: str | Path, *, checksum: bool = True) -> dict:
    """Check every shard against the manifest; return the manifest or raise ShardError.

    Checks: the manifest's totals (``num_rows``, ``num_bytes``) are the sums of its shards',
    then per shard: file present, byte size, sha256 (skipped with ``checksum=False``),
    readable Parquet footer and its row count. In a run, the stage that finds a bad shard set
    names the ``augment run RUN_DIR --redo shards`` that rewrites it.
    """
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    fix = "rerun the stage that wrote this shard set"
    where = manifest_path(shard_dir)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("rows"), int) for s in shards):
        raise ShardError(f"{where} lists no valid shards; {fix}")
    for total, field in (("num_rows", "rows"), ("num_bytes", "bytes")):
        if total in manifest and manifest[total] != sum(s.get(field, 0) for s in shards):
            raise ShardError(f"{where} says {total}={manifest[total]!r} but its shards hold "
                             f"{sum(s.get(field, 0) for s in shards)}; the manifest was edited; "
                             f"{fix}")
    for s in manifest["shards"]:
        path = shard_dir / s["file"]
        if not path.exists():
            raise ShardError(f"shard {path} listed in the manifest is missing; {fix}")
        size = path.stat().st_size
        if size != s["bytes"]:
            kind = "truncated" if size < s["bytes"] else "grown"
            raise ShardError(f"shard {path} is {kind}: {size} bytes, manifest says {s['bytes']}; "
                             f"{fix}")
        if checksum and file_sha256(path) != s["sha256"]:
            raise ShardError(f"shard {path} was altered: sha256 differs from the manifest; {fix}")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for a bad footer
            raise ShardError(f"shard {path} is not readable Parquet ({e}); {fix}") from e
        if rows != s["rows"]:
            raise ShardError(f"shard {path} holds {rows} rows, manifest says {s['rows']}; {fix}")
    return manifest


@dataclass(frozen=True)
class ShardArrays:
    images: np.ndarray   # uint8 (N, H, W, C)
    labels: np.ndarray   # int64 (N,)
    frame: pd.DataFrame  # every column but the image, nullable dtypes
    manifest: dict

    def __len__(self) -> int:
        return len(self.labels)


_PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.float64(): pd.Float64Dtype(),
                 pa.string(): pd.StringDtype()}


def read_shards(shard_dir: str | Path, verify: bool = True) -> ShardArrays:
    """Read a whole shard set into memory: images, labels and the other columns."""
    shard_dir = Path(shard_dir)
    manifest = verify_shards(shard_dir) if verify else load_manifest(shard_dir)
    shape = manifest["image_shape"]
    images, frames = [], []
    for s in manifest["shards"]:
        path = shard_dir / s["file"]
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ShardError(f"cannot read shard {path} ({e}); rerun the stage that wrote it") \
                from e
        images.append(decode_image_column(table, shape, path))
        frames.append(table.drop_columns(["image"]))
    if not frames:
        h, w, c = shape or (0, 0, 0)
        empty = shard_schema(manifest["class_names"]).empty_table().drop_columns(["image"])
        return ShardArrays(np.zeros((0, h, w, c), np.uint8), np.zeros(0, np.int64),
                           empty.to_pandas(types_mapper=_PANDAS_TYPES.get), manifest)
    frame = pa.concat_tables(frames).to_pandas(types_mapper=_PANDAS_TYPES.get)
    labels = frame["label"].to_numpy(dtype=np.int64)
    return ShardArrays(np.concatenate(images), labels, frame, manifest)
