"""Labeled split protocol: n labels per class, seeded and balanced; the rest is unlabeled.

The split indexes the *training* set only, so it is disjoint from the test split by
construction. Optionally it also holds out ``val_per_class`` images per class as a
validation set: their labels are read only to choose settings (learning-curve points,
bench sweeps), they are removed from the unlabeled pool and never trained on, so the test
split can be read once, for the final figures of frozen settings. It is saved as Parquet (index, label, role) and every later stage reads
that file, so a rerun, or another machine, uses exactly the same labeled images.
numpy's PCG64 generator gives the same stream on every platform for the same seed.

A training image with the label ``UNLABELED`` (a user's unlabeled folder or rows) is never
drawn as labeled or validation and never counted in a class: it always joins the unlabeled
pool, and the split file keeps its label (-1) so every reader can tell it has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_write
from pipeline.data.image_dataset import UNLABELED

# "base": the base model's pretraining half (never the task's; read only by the pool-oracle
# evaluation arm).
ROLES = ("labeled", "unlabeled", "validation", "base")
HALVES = ("base", "task")


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class LabeledSplit:
    labeled_idx: np.ndarray    # indices into the training set, sorted by (label, draw order)
    unlabeled_idx: np.ndarray  # the rest of the training set, ascending
    labels: np.ndarray         # labels of the whole training set (int64; UNLABELED: none)
    n_per_class: int
    seed: int
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # held out
    val_per_class: int = 0
    base_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

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


def halves(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The training set cut once into two class-stratified halves, by ``seed``: ``base`` (a base
    model pretrains on it) and ``task`` (labels, pool and validation come from it), so the base
    has never seen a task image. Ascending indices; the same cut on every machine."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels, dtype=np.int64)
    # Unlabeled images are stratified as one group of their own (UNLABELED), so both halves
    # get their share of them too.
    base, task = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels,
                                  random_state=seed)
    return {"base": np.sort(base).astype(np.int64), "task": np.sort(task).astype(np.int64)}


def pretraining_indices(labels: np.ndarray, pool: dict, num_classes: int | None = None
                        ) -> np.ndarray:
    """The training images a base model was pretrained on, from the ``pool`` record that
    ``augment pretrain`` writes: a half (``half``, ``half_seed``), or the unlabeled pool of a
    labeled split (``labels_per_class``, ``split_seed``)."""
    if pool.get("half"):
        return halves(labels, int(pool["half_seed"]))[pool["half"]]
    return make_split(labels, int(pool["labels_per_class"]), int(pool["split_seed"]),
                      num_classes).unlabeled_idx


def make_split(labels: np.ndarray, n_per_class: int, seed: int,
               num_classes: int | None = None, val_per_class: int = 0,
               half_seed: int | None = None) -> LabeledSplit:
    """n labeled (and ``val_per_class`` validation) images per class, drawn with ``seed``.

    The labeled images are the first n of each class's seeded permutation and the validation
    images the next ``val_per_class``, so adding a validation set keeps the labeled images.
    With ``half_seed`` every role is drawn from the task half of ``halves(labels, half_seed)``
    and the other half gets the role ``base``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    base = halves(labels, half_seed)["base"] if half_seed is not None else np.zeros(0, np.int64)
    in_task = np.ones(len(labels), dtype=bool)
    in_task[base] = False
    if n_per_class < 1:
        raise SplitError(f"n_per_class must be >= 1, got {n_per_class}")
    if val_per_class < 0:
        raise SplitError(f"val_per_class must be >= 0, got {val_per_class}")
    has_label = labels != UNLABELED
    if num_classes is None:
        num_classes = int(labels[has_label].max()) + 1 if has_label.any() else 0
    if num_classes < 1:
        raise SplitError("no image has a label; a split needs n_per_class labeled images of "
                         "each class")
    rng = np.random.default_rng(seed)
    chosen, held = [], []
    for c in range(num_classes):
        # labels == c never holds for UNLABELED: unlabeled images are drawn for no role but
        # the pool (the mask below), and never count towards a class.
        idx = np.flatnonzero((labels == c) & in_task)
        if len(idx) < n_per_class + val_per_class:
            raise SplitError(
                f"class {c} has only {len(idx)} labeled task images but n_per_class={n_per_class} "
                f"and val_per_class={val_per_class}; lower them so their sum is at most "
                f"{len(idx)}"
            )
        order = idx[rng.permutation(len(idx))]
        chosen.append(order[:n_per_class])
        held.append(order[n_per_class:n_per_class + val_per_class])
    labeled = np.concatenate(chosen)
    val = np.sort(np.concatenate(held)).astype(np.int64)
    mask = in_task.copy()
    mask[labeled] = False
    mask[val] = False
    return LabeledSplit(labeled, np.flatnonzero(mask), labels, n_per_class, seed, val,
                        val_per_class, base)


def capped_pool(split: LabeledSplit, cap: int | None) -> np.ndarray:
    """The unlabeled images a classifier trains on: ``cap`` of the split's unlabeled pool,
    drawn class-blind (no label is read) with the split's seed on a stream of its own, so
    every arm and seed of a run shares one pool and the labeled draw is untouched; the whole
    pool when ``cap`` is None. A smaller cap keeps a subset of a larger one's pool."""
    pool = split.unlabeled_idx
    if cap is None or cap >= len(pool):
        return pool
    keep = np.random.default_rng([split.seed, 1]).permutation(len(pool))[:cap]
    return np.sort(pool[keep])


def save_split(split: LabeledSplit, path: str | Path) -> Path:
    """Write the split as Parquet (index, label, role), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = {"labeled": split.labeled_idx, "unlabeled": split.unlabeled_idx,
             "validation": split.val_idx, "base": split.base_idx}
    index = np.concatenate(list(parts.values()))
    role = [name for name, idx in parts.items() for _ in range(len(idx))]
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
                        int(meta.get(b"val_per_class", b"0")),
                        np.sort(index[role == "base"]).astype(np.int64))
