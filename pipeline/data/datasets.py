"""Dataset registry: one interface from a name to in-memory uint8 images and labels.

Every loader returns an :class:`ImageDataset` whose images are ``uint8`` arrays of
shape (N, H, W, C) (C = 1 for grey, 3 for colour) and whose labels are ``int64``; a
training image without a label (a user's unlabeled folder or rows) has the label
:data:`UNLABELED`. Small image datasets (Fashion-MNIST, CIFAR-10) fit in memory many times
over, and in-memory arrays let the SSL trainer keep the whole set on the GPU.

The user-data loaders live beside this module (``image_folder``, ``hf_dataset``) on the
shared ground of ``image_dataset``, whose names are re-exported here.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.hf_dataset import hf_contents, load_hf_dataset
from pipeline.data.image_dataset import (  # noqa: F401 - re-exported: the names loaders share
    IMAGE_MODES,
    IMAGE_SUFFIXES,
    RESERVED_FOLDERS,
    UNLABELED,
    DatasetError,
    ImageDataset,
    conform,
)
from pipeline.data.image_folder import folder_contents, load_image_folder

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic); re-install or re-download it")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if arr.size != expected:
        raise DatasetError(f"{path} is truncated: {arr.size} values, header says {expected}")
    return arr.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for cand in (root / f"{stem}.gz", root / stem, root / "raw" / f"{stem}.gz", root / "raw" / stem,
                 root / "FashionMNIST" / "raw" / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
        if cand.exists():
            return cand
    return None


def load_fashion_mnist(root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Fashion-MNIST from the Debian package or a torchvision root (``FashionMNIST/raw``)."""
    candidates = [Path(root)] if root else []
    candidates.append(DEBIAN_FASHION_MNIST)
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for base in candidates:
        paths = [_find_idx(base, s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
            return ImageDataset("fashion-mnist", FASHION_MNIST_CLASSES,
                                xtr[..., None].copy(), ytr.astype(np.int64),
                                xte[..., None].copy(), yte.astype(np.int64))
    if download and root:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except OSError as e:  # URLError is an OSError: offline, or the server refused
            raise DatasetError(f"Fashion-MNIST download into {root} failed ({e}); "
                               "`apt-get install dataset-fashion-mnist` instead") from e
        return load_fashion_mnist(root, download=False)
    raise DatasetError(
        "Fashion-MNIST not found. Provide it one of two ways: "
        "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
        "or a torchvision root holding FashionMNIST/raw/*-ubyte(.gz) passed as root= "
        "(with download=True to fetch it when online). "
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


# --------------------------------------------------------------------------- CIFAR-10


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # corrupt pickle
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {e}; re-download the archive") from e
    raw_labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    if raw_labels is None or "data" not in entry:
        raise DatasetError(f"{path} is not a CIFAR batch (needs 'data' and 'labels'); "
                           "re-download the archive")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(raw_labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: data {data.shape} / {len(labels)} labels do not match the "
                           "CIFAR layout (N, 3072); re-download the archive")
    data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), labels


def load_cifar10(root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-10 in torchvision's ``cifar-10-batches-py`` pickle layout under ``root``."""
    if root is None:
        root = os.environ.get("CIFAR10_ROOT")
    if root is None:
        raise DatasetError(
            "CIFAR-10 needs a root directory: pass root=DIR (or set CIFAR10_ROOT) holding "
            "cifar-10-batches-py/, or pass download=True on a machine that is online."
        )
    base = Path(root) / "cifar-10-batches-py"
    if not base.exists() and download:
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(str(root), train=True, download=True)
        except OSError as e:  # URLError is an OSError: offline, or the server refused
            raise DatasetError(f"CIFAR-10 download into {root} failed ({e}); unpack "
                               "cifar-10-python.tar.gz there by hand on an offline machine") from e
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, base / "test_batch"] if not p.exists()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found under {base} (missing {', '.join(missing)}). Unpack "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html there, "
            "or pass download=True when online."
        )
    parts = [_read_cifar_batch(p) for p in train_files]
    xte, yte = _read_cifar_batch(base / "test_batch")
    names = CIFAR10_CLASSES
    meta = base / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            names = tuple(pickle.load(f, encoding="latin1")["label_names"])
    return ImageDataset("cifar10", names,
                        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        xte, yte)


# --------------------------------------------------------------------------- registry

REGISTRY: dict[str, Callable[..., ImageDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image-folder": load_image_folder,
    "hf-dataset": load_hf_dataset,
}

DESCRIPTIONS = {
    "fashion-mnist": "Fashion-MNIST 28x28 grey, 10 classes (Debian dataset-fashion-mnist or torchvision root)",
    "cifar10": "CIFAR-10 32x32 colour, 10 classes (torchvision cifar-10-batches-py layout)",
    "image-folder": "your folder: root/CLASS/*.png labeled, root/unlabeled/** unlabeled, "
                    "optional root/test/CLASS/*.png",
    "hf-dataset": "a Hugging Face dataset saved with save_to_disk, or Parquet files: an image "
                  "column, a label column (rows without a label are unlabeled), optional "
                  "'test' split",
}

# The user-data loaders: they read the files themselves, so they convert and resize while
# reading (mixed sizes need it) and their contents key the split (CONTENTS).
USER_DATA = ("image-folder", "hf-dataset")
CONTENTS: dict[str, Callable[[str | Path], list]] = {"image-folder": folder_contents,
                                                    "hf-dataset": hf_contents}


def available_datasets() -> list[str]:
    return sorted(REGISTRY)


def load_dataset(name: str, root: str | Path | None = None, download: bool = False, *,
                 image_mode: str = "auto", image_size: int | tuple[int, int] | None = None,
                 **kwargs) -> ImageDataset:
    """Load a registered dataset by name; ``root`` and ``download`` mean the same for every
    loader. ``image_mode`` (auto, grey, rgb) converts and ``image_size`` resizes every image
    (bicubic), for every dataset; other keyword arguments go to the loader (the Hugging Face
    loader's ``image_column`` and ``label_column``, a folder's ``test_fraction``)."""
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())}")
    if image_mode not in IMAGE_MODES:
        raise DatasetError(f"image_mode={image_mode!r}: choose one of {', '.join(IMAGE_MODES)}")
    if name in USER_DATA:
        return REGISTRY[name](root, download, image_mode=image_mode, image_size=image_size,
                              **kwargs)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    return conform(REGISTRY[name](root, download, **kwargs), image_mode, size)


def dataset_contents(name: str, root: str | Path | None) -> str | None:
    """A digest of the files behind a user dataset (relative path, size, mtime: stat only, no
    image decoded), or None for a benchmark, whose files never change under one name."""
    from pipeline.digest import digest

    if name not in CONTENTS or root is None:
        return None
    return digest(CONTENTS[name](root))[:16]


def load_dataset_cached(name: str, root: str | None, download: bool = False,
                        **options) -> ImageDataset:
    """``load_dataset`` once per process for the same files: pre-flight and several stages
    read the same data. The contents digest is part of the cache key, so a folder changed
    while the process lives is read again rather than served stale."""
    return _cached(name, root, download, dataset_contents(name, root),
                   tuple(sorted(options.items())))


@functools.lru_cache(maxsize=4)
def _cached(name: str, root: str | None, download: bool, contents: str | None,
            options: tuple) -> ImageDataset:
    return load_dataset(name, root, download, **dict(options))
