"""Labeled split protocol: n labels per class, seeded and balanced; the rest is unlabeled.

The split indexes the *training* set only, so it is disjoint from the test split by
construction. Optionally it also holds out ``val_per_class`` images per class as a
validation set: their labels are read only to choose settings (learning-curve points,
bench sweeps), they are removed from the unlabeled pool and never trained on, so the test
split can be read once, for the final figures of frozen settings. It is saved as Parquet (index, label, role) and every later stage reads
that file, so a rerun, or another machine, uses exactly the same labeled images.
numpy's PCG64 generator gives the same stream on every platform for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write

ROLES = ("labeled", "unlabeled", "validation")


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class LabeledSplit:
    labeled_idx: np.ndarray    # indices into the training set, sorted by (label, draw order)
    unlabeled_idx: np.ndarray  # the rest of the training set, ascending
    labels: np.ndarray         # labels of the whole training set (int64)
    n_per_class: int
    seed: int
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # held out
    val_per_class: int = 0

    @property
    def labeled_labels(self) -> np.ndarray:
        return self.labels[self.labeled_idx]

    @property
    def val_labels(self) -> np.ndarray:
        return self.labels[self.val_idx]

    @property
    def train_idx(self) -> np.ndarray:
        """Every training index a classifier may train on (labeled + unlabeled), ascending."""
        return np.sort(np.concatenate([self.labeled_idx, self.unlabeled_idx]))

    def class_subsets(self) -> dict[int, np.ndarray]:
        """Labeled indices per class: the per-class subsets ANL adapters are tuned on."""
        return {int(c): self.labeled_idx[self.labeled_labels == c] for c in np.unique(self.labeled_labels)}


def make_split(labels: np.ndarray, n_per_class: int, seed: int,
               num_classes: int | None = None, val_per_class: int = 0) -> LabeledSplit:
    """n labeled (and ``val_per_class`` validation) images per class, drawn with ``seed``.

    The labeled images are the first n of each class's seeded permutation and the validation
    images the next ``val_per_class``, so adding a validation set keeps the labeled images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if n_per_class < 1:
        raise SplitError(f"n_per_class must be >= 1, got {n_per_class}")
    if val_per_class < 0:
        raise SplitError(f"val_per_class must be >= 0, got {val_per_class}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    chosen, held = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_per_class + val_per_class:
            raise SplitError(
                f"class {c} has only {len(idx)} training images but n_per_class={n_per_class} "
                f"and val_per_class={val_per_class}; lower them so their sum is at most "
                f"{len(idx)}"
            )
        order = idx[rng.permutation(len(idx))]
        chosen.append(order[:n_per_class])
        held.append(order[n_per_class:n_per_class + val_per_class])
    labeled = np.concatenate(chosen)
    val = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[labeled] = False
    mask[val] = False
    return LabeledSplit(labeled, np.flatnonzero(mask), labels, n_per_class, seed, val,
                        val_per_class)


def save_split(split: LabeledSplit, path: str | Path) -> Path:
    """Write the split as Parquet (index, label, role), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index = np.concatenate([split.labeled_idx, split.unlabeled_idx, split.val_idx])
    role = (["labeled"] * len(split.labeled_idx) + ["unlabeled"] * len(split.unlabeled_idx)
            + ["validation"] * len(split.val_idx))
    table = pa.table({
        "index": pa.array(index, pa.int64()),
        "label": pa.array(split.labels[index], pa.int64()),
        "role": pa.array(role, pa.dictionary(pa.int8(), pa.string())),
    }).replace_schema_metadata({"n_per_class": str(split.n_per_class), "seed": str(split.seed),
                               "val_per_class": str(split.val_per_class)})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def load_split(path: str | Path) -> LabeledSplit:
    path = Path(path)
    if not path.exists():
        raise SplitError(f"split file {path} not found; run the split stage first")
    try:
        table = pq.read_table(path, columns=["index", "label", "role"])
    except Exception as e:  # pyarrow raises several types for a bad or foreign file
        raise SplitError(f"cannot read split file {path} ({e}); delete it and rerun the split "
                         "stage") from e
    meta = table.schema.metadata or {}
    index = table["index"].to_numpy()
    label = table["label"].to_numpy()
    role = np.asarray(table["role"].to_pylist())
    # The file must cover every training index exactly once, else labels[] below is garbage.
    if not np.array_equal(np.sort(index), np.arange(len(index))) or not np.isin(role, ROLES).all():
        raise SplitError(f"split file {path} is corrupt (indices are not 0..N-1 exactly once, or "
                         "unknown roles); delete it and rerun the split stage")
    labels = np.empty(len(index), dtype=np.int64)
    labels[index] = label
    return LabeledSplit(index[role == "labeled"], np.sort(index[role == "unlabeled"]), labels,
                        int(meta.get(b"n_per_class", b"0")), int(meta.get(b"seed", b"0")),
                        np.sort(index[role == "validation"]).astype(np.int64),
                        int(meta.get(b"val_per_class", b"0")))
