"""What a shard set is on disk: the row schema, the manifest and the image codec.

Layout of a shard directory::

    shard-00000.parquet  shard-00001.parquet  ...  .manifest.json

The manifest's leading dot makes every folder reader skip it: ``pd.read_parquet(dir)``
(pyarrow ignores names starting with ``.`` or ``_``) and Hugging Face ``datasets``
(``load_dataset("parquet", data_dir=dir)`` ignores only ``.``) read the folder whole. Shard
sets written before are read through their ``manifest.json`` (:func:`manifest_path`).

Each row: ``image`` as ``struct{bytes: binary (PNG), path: string}`` (the layout Hugging
Face ``datasets`` reads as an ``Image`` feature; the schema carries the ``huggingface``
features metadata, so ``datasets.Dataset.from_parquet`` types it as such), ``label``,
``label_name``, ``source`` (real | synthetic) and the provenance of synthetic rows
(``condition_id``, ``adapter_id``, ``seed``, ``mask_ratio``, ``guidance``, ``steps``;
null for real rows).

The manifest records, per shard, its rows, bytes, sha256, row groups and class
histogram, and their totals. The writer and the readers (:mod:`pipeline.data.shards`,
:mod:`pipeline.data.shard_dataset`) take the format from here, so the two sides cannot drift
apart.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

MANIFEST = ".manifest.json"
# The name shard sets had before: readers of a whole folder tripped over it; old runs hold it.
LEGACY_MANIFEST = "manifest.json"
FORMAT = "anl-augment-shards"
VERSION = 1
SOURCES = ("real", "synthetic")

PROVENANCE_TYPES: dict[str, pa.DataType] = {
    "condition_id": pa.int64(),   # index (into the training set) of the condition image
    "adapter_id": pa.string(),
    "seed": pa.int64(),
    "mask_ratio": pa.float64(),
    "guidance": pa.float64(),
    "steps": pa.int64(),
}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HF_VALUE = {pa.int64(): "int64", pa.float64(): "float64", pa.string(): "string"}


class ShardError(RuntimeError):
    """A shard set is missing, unfinished or damaged; the message names the file and the fix."""


def shard_schema(class_names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of every shard, with Hugging Face ``datasets`` feature metadata."""
    fields = [("image", IMAGE_TYPE), ("label", pa.int64()), ("label_name", pa.string()),
              ("source", pa.string()), *PROVENANCE_TYPES.items()]
    features: dict[str, Any] = {
        "image": {"_type": "Image"},
        "label": {"names": list(class_names), "_type": "ClassLabel"},
        "label_name": {"dtype": "string", "_type": "Value"},
        "source": {"dtype": "string", "_type": "Value"},
    }
    for name, typ in PROVENANCE_TYPES.items():
        features[name] = {"dtype": _HF_VALUE[typ], "_type": "Value"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


# --------------------------------------------------------------------------- manifest


def build_manifest(shards: list[dict], class_names: Sequence[str], image_shape, schema,
                   row_group_rows: int) -> dict:
    """The manifest of the finished ``shards`` (one entry each, as the writer recorded them)."""
    hist = np.zeros(len(class_names), np.int64)
    for s in shards:
        hist += np.asarray(s["class_histogram"], np.int64)
    return {
        "format": FORMAT, "version": VERSION,
        "class_names": list(class_names),
        "image_shape": list(image_shape) if image_shape else None,
        "image_codec": "png",
        "num_rows": sum(s["rows"] for s in shards),
        "num_bytes": sum(s["bytes"] for s in shards),
        "class_histogram": hist.tolist(),
        "sources": {src: sum(s["sources"][src] for s in shards) for src in SOURCES},
        "row_group_rows": row_group_rows,
        "schema": {f.name: str(f.type) for f in schema},
        "shards": shards,
    }


def manifest_path(shard_dir: str | Path) -> Path:
    """The manifest file of ``shard_dir``: the current name, else an older shard set's
    ``manifest.json``; the current name when neither exists (for messages)."""
    shard_dir = Path(shard_dir)
    legacy = shard_dir / LEGACY_MANIFEST
    current = shard_dir / MANIFEST
    return legacy if legacy.exists() and not current.exists() else current


def load_manifest(shard_dir: str | Path) -> dict:
    """Parse the manifest (no shard checks); ShardError if absent or not ours."""
    shard_dir = Path(shard_dir)
    path = manifest_path(shard_dir)
    if not path.exists():
        what = "no such directory" if not shard_dir.exists() else f"no {MANIFEST}"
        raise ShardError(f"{shard_dir}: {what}. The shard set was never finished (the writer "
                         "writes the manifest last); rerun the stage that writes it")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); rerun the stage that wrote it") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path} is not an {FORMAT} v{VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


# --------------------------------------------------------------------------- images


PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> the PNG's colour type


def encode_pngs(images: np.ndarray, compress_level: int = 1) -> list[bytes]:
    """uint8 (N, H, W, C), C in 1/3/4 -> one PNG per image (Pillow).

    Pillow's per-image cost (~0.1 ms for 28x28, bench/shards.py) is under 2% of the time
    the sampler takes to make the image even on the GPU (~110 images/s), so no custom codec.
    """
    c = images.shape[-1]
    if c not in PIL_MODES:
        raise ValueError(f"images must have 1, 3 or 4 channels, got shape {images.shape}")
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if c == 1 else img, PIL_MODES[c]).save(
            buf, "PNG", compress_level=compress_level)
        out.append(buf.getvalue())
    return out


def decode_pngs(blobs: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    """PNG files (any writer's) -> uint8 (N, *shape); ValueError for one of another shape."""
    shape = tuple(int(s) for s in shape)
    out = np.empty((len(blobs), *shape), np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as im:
            if PIL_MODES.get(shape[-1]) != im.mode:
                im = im.convert(PIL_MODES[shape[-1]])
            a = np.asarray(im)
        if a.size != out[i].size or a.shape[:2] != shape[:2]:
            raise ValueError(f"row {i} is a {a.shape} image, expected {shape}")
        out[i] = a.reshape(shape)
    return out


def decode_image_column(table: pa.Table, shape: Sequence[int], where: Path) -> np.ndarray:
    """The ``image`` column of a Parquet table (a shard or one row group) as uint8 (N, *shape)."""
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()
    try:
        return decode_pngs(blobs, shape)
    except (ValueError, OSError, UnidentifiedImageError) as e:
        raise ShardError(f"shard {where}: {e}; rerun the stage that wrote it") from e
