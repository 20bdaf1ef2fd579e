"""A Hugging Face ``datasets`` dataset as a dataset: saved to disk, or Parquet files.

``dataset_root`` is one of

* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``: the split
  named ``test`` is the test set, every other split (in name order) is training data;
* a folder of ``*.parquet`` files (searched recursively) or a glob of them: a file whose name
  starts with ``test`` or that lies in a folder named ``test`` is the test set (the hub's
  ``data/test-00000-of-00001.parquet``), every other file is training data.

The image column is ``image_column`` if given, else ``image`` or ``img``, else the one
column of the ``Image`` feature type; the label column is ``label_column``, else ``label``
or ``labels``. A ``ClassLabel`` column gives the class names; any other gives its sorted
distinct values. A row whose label is missing, None or -1 is unlabeled (training only).
Without a test split a seeded, class-stratified ``test_fraction`` of the labeled rows is
the test split, as for an image folder.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.image_dataset import (
    UNLABELED,
    DatasetError,
    ImageDataset,
    hold_out_test,
    read_image,
    same_channels,
    stack_images,
    stat_listing,
)

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")


def _parquet_files(root: str) -> list[Path]:
    if any(ch in root for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(root, recursive=True) if p.endswith(".parquet"))
    path = Path(root)
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    return sorted(path.rglob("*.parquet")) if path.is_dir() else []


def _is_saved(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _is_test_file(path: Path) -> bool:
    return path.name.startswith("test") or "test" in path.parent.parts[-1:]


def _open(root: str) -> tuple[Any, Any | None]:
    """(the training rows, the test rows or None) as ``datasets.Dataset``s."""
    import datasets

    path = Path(root)
    if path.is_dir() and _is_saved(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            return loaded, None
        train = [loaded[name] for name in sorted(loaded) if name != "test"]
        if not train:
            raise DatasetError(f"{root} holds only a 'test' split; add the training rows as "
                               "another split (e.g. 'train')")
        test = loaded.get("test")
        return (datasets.concatenate_datasets(train) if len(train) > 1 else train[0]), test
    files = _parquet_files(root)
    if not files:
        raise DatasetError(
            f"dataset_root={root!r} is neither a folder saved by Dataset.save_to_disk nor a "
            "folder or glob of .parquet files; save the dataset with "
            "`ds.save_to_disk(DIR)` or `ds.to_parquet(DIR/train.parquet)`")
    test_files = [f for f in files if _is_test_file(f)]
    train_files = [f for f in files if not _is_test_file(f)]
    if not train_files:
        raise DatasetError(f"every Parquet file under {root} is a test file (named test* or "
                           "in a test/ folder); add the training rows in other files")
    # Dataset.from_parquet would copy the files into the datasets cache; reading them with
    # pyarrow keeps the user's files the only copy (the features ride in the schema).
    return _from_parquet(train_files), (_from_parquet(test_files) if test_files else None)


def _from_parquet(files: list[Path]) -> Any:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    features = datasets.Features.from_arrow_schema(table.schema)
    return datasets.Dataset(datasets.table.InMemoryTable(table)).cast(features)


def _pick(columns: list[str], given: str | None, defaults: tuple[str, ...], key: str,
          root: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{key}={given!r} is not a column of {root} (columns: "
                               f"{', '.join(columns)}); set {key} to one of them")
        return given
    return next((c for c in defaults if c in columns), None)


def _image_column(ds: Any, given: str | None, root: str) -> str:
    import datasets

    name = _pick(list(ds.column_names), given, IMAGE_COLUMNS, "image_column", root)
    if name is None:
        typed = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if len(typed) != 1:
            raise DatasetError(f"no image column found in {root} (columns: "
                               f"{', '.join(ds.column_names)}); set image_column: NAME")
        name = typed[0]
    return name


def _images(ds: Any, column: str, image_mode: str, size: tuple[int, int] | None,
            where: str) -> list[np.ndarray]:
    """Every row's image, decoded by Pillow from its bytes (or path), not by ``datasets``, so
    conversion and resizing are exactly the image folder's."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    out = []
    for i, value in enumerate(ds[column]):
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise DatasetError(f"{where}: row {i} has no image in column {column!r}")
        try:
            out.append(read_image(value, image_mode, size))
        except OSError as e:
            raise DatasetError(f"{where}: row {i} of column {column!r} is not an image Pillow "
                               f"can read ({e}); set image_column to the image column") from None
    return out


def _label_values(ds: Any | None, column: str | None) -> list:
    if ds is None or column is None or column not in ds.column_names:
        return [None] * (0 if ds is None else len(ds))
    return list(ds[column])


def _is_unlabeled(v: Any) -> bool:
    return v is None or (isinstance(v, (int, np.integer)) and v == UNLABELED) or \
        (isinstance(v, float) and np.isnan(v))


def load_hf_dataset(root: str | Path | None = None, download: bool = False, *,
                    image_column: str | None = None, label_column: str | None = None,
                    image_size: int | tuple[int, int] | None = None, image_mode: str = "auto",
                    test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """The dataset at ``root`` (see the module docstring) with labeled, unlabeled and test
    rows; ``image_size`` and ``image_mode`` as for an image folder."""
    import datasets

    if root is None:
        raise DatasetError("hf-dataset needs dataset_root: a folder saved by save_to_disk, or "
                           "a folder or glob of .parquet files")
    root = str(root)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    train, test = _open(root)
    img_col = _image_column(train, image_column, root)
    lab_col = _pick(list(train.column_names), label_column, LABEL_COLUMNS, "label_column", root)
    if lab_col is None:
        raise DatasetError(f"no label column in {root} (columns: {', '.join(train.column_names)})"
                           "; the run needs a few labeled rows per class: set label_column: NAME")
    feature = train.features[lab_col]
    raw_train, raw_test = _label_values(train, lab_col), _label_values(test, lab_col)
    if isinstance(feature, datasets.ClassLabel):
        names = [str(n) for n in feature.names]
        lookup = {i: i for i in range(len(names))}
    else:
        distinct = {v for v in raw_train if not _is_unlabeled(v)}
        names = [str(v) for v in sorted(distinct, key=lambda v: (str(type(v)), v))]
        lookup = {v: i for i, v in enumerate(sorted(distinct, key=lambda v: (str(type(v)), v)))}

    def encode(values: list, where: str) -> np.ndarray:
        out = np.full(len(values), UNLABELED, dtype=np.int64)
        for i, v in enumerate(values):
            if _is_unlabeled(v):
                continue
            if v not in lookup:
                raise DatasetError(f"{where}: row {i} has label {v!r}, not one of the training "
                                   f"labels ({', '.join(names)})")
            out[i] = lookup[v]
        return out

    y = encode(raw_train, root)
    if not (y != UNLABELED).any():
        raise DatasetError(f"{root}: no row has a label in column {lab_col!r}; the run needs a "
                           "few labeled rows per class (set label_column if another column "
                           "holds them)")
    x = stack_images(_images(train, img_col, image_mode, size, root), root)
    if test is None:
        mask = hold_out_test(y, test_fraction, seed)
        xtr, ytr, xte, yte = x[~mask], y[~mask], x[mask], y[mask]
    else:
        yte = encode(raw_test, f"{root} (test split)")
        keep = yte != UNLABELED  # a test row without a label cannot be scored
        xte = stack_images(_images(test.select(np.flatnonzero(keep)), img_col, image_mode, size,
                                   f"{root} (test split)"), f"{root} (test split)")
        yte = yte[keep]
        if len(xte) and xte.shape[1:3] != x.shape[1:3]:
            raise DatasetError(f"the test images are {xte.shape[1]}x{xte.shape[2]} but the "
                               f"training images {x.shape[1]}x{x.shape[2]}; set `resize: true` "
                               "to resize every image to image_size x image_size")
        if not len(xte):
            xte = np.zeros((0, *x.shape[1:]), np.uint8)
        x, xte = same_channels(x, xte)
        xtr, ytr = x, y
    return ImageDataset(f"hf-dataset:{Path(root.split('*')[0]).name or root}", tuple(names),
                        xtr, ytr, xte, yte)


def hf_contents(root: str | Path) -> list[tuple[str, int, int]]:
    """The files behind the dataset at ``root`` (relative path, size, mtime), stat only: its
    identity in the split key."""
    root = str(root)
    path = Path(root)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        return stat_listing(files, path)
    files = _parquet_files(root)
    if not files:
        return []
    # Relative to the files' common folder, so the same files elsewhere keep the key.
    anchor = Path(os.path.commonpath([f.parent for f in files]))
    return stat_listing(files, anchor)
