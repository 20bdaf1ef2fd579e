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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.data.cifar import CIFAR10_CLASSES, load_cifar10  # noqa: F401 - re-exported
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
