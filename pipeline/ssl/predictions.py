"""An exported classifier on image files: one row per image (its path, the predicted class
and the probability of every class), written as CSV or Parquet."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write
from pipeline.data.image_files import image_paths, read_images

from .export import ExportError, load_classifier, predict

PROB_PREFIX = "p_"  # a class's probability column: "p_<class name>"


def predict_files(model_dir: str | Path, items: Iterable[str | Path], device: str = "cpu",
                  batch_size: int = 256) -> pd.DataFrame:
    """Columns: path, predicted (class name), confidence (its probability), then one
    ``p_<class name>`` column per class, in the classifier's class order."""
    model, config = load_classifier(model_dir, device=device)
    inp = config["input"]
    shape = (inp["height"], inp["width"], inp["channels"])
    paths = image_paths(items)
    names = config["class_names"]
    rows = []
    # Read and predict in batches: a folder of many images need not fit in memory at once.
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        probs = predict(model, config, read_images(chunk, shape))
        for p, row in zip(chunk, probs, strict=True):
            best = int(row.argmax())
            rows.append({"path": str(p), "predicted": names[best],
                         "confidence": float(row[best]),
                         **{f"{PROB_PREFIX}{n}": float(v) for n, v in zip(names, row, strict=True)}})
    return pd.DataFrame(rows)


def write_predictions(table: pd.DataFrame, out: str | Path) -> Path:
    """``out`` as CSV (``.csv``) or Parquet (``.parquet``), atomically."""
    out = Path(out)
    if out.suffix == ".csv":
        return atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    if out.suffix == ".parquet":
        return atomic_write(out, lambda tmp: table.to_parquet(tmp, index=False))
    raise ExportError(f"--out {out}: write .csv or .parquet")
