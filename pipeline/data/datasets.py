"""Dataset registry: one interface from a name to in-memory uint8 images and labels.

Every loader returns an :class:`ImageDataset` whose images are ``uint8`` arrays of
shape (N, H, W, C) (C = 1 for grey, 3 for colour) and whose labels are ``int64``.
Small image datasets (Fashion-MNIST, CIFAR-10) fit in memory many times over, and
in-memory arrays let the SSL trainer keep the whole set on the GPU.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(RuntimeError):
    """A dataset cannot be found or read; the message says how to provide it."""


@dataclass(frozen=True)
class ImageDataset:
    name: str
    class_names: tuple[str, ...]
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x, y = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{part}_images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
            if len(x) != len(y):
                raise ValueError(f"{part}: {len(x)} images but {len(y)} labels")


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


# --------------------------------------------------------------------------- image folder


def _load_folder_split(split_dir: Path, class_names: list[str], size: tuple[int, int] | None,
                       mode: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for label, cls in enumerate(class_names):
        cls_dir = split_dir / cls
        files = sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if cls_dir.exists() else []
        for p in files:
            try:
                with Image.open(p) as im:
                    im = im.convert(mode)
                    if size is not None and im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.BICUBIC)
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                # Skipped, not fatal: one bad file in a scraped folder should not stop a run.
                warnings.warn(f"skipping unreadable image {p}: {e}", stacklevel=2)
                continue
            images.append(arr[..., None] if arr.ndim == 2 else arr)
            labels.append(label)
    if not images:
        raise DatasetError(f"no readable images under {split_dir}")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DatasetError(
            f"images under {split_dir} have different sizes {sorted(shapes)[:3]}...; "
            "pass image_size=(H, W) to resize them to one size"
        )
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_image_folder(root: str | Path | None = None, download: bool = False, *,
                      image_size: tuple[int, int] | None = None, grey: bool | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """One sub-folder per class (``root/CLASS/*.png``), or ``root/train/CLASS`` + ``root/test/CLASS``.

    Unreadable images are skipped with a warning. Without a ``test/`` folder a seeded,
    stratified ``test_fraction`` of the images becomes the test split.
    """
    if root is None or not Path(root).is_dir():
        raise DatasetError(f"image-folder needs root=DIR with one sub-folder per class; got {root!r}")
    root = Path(root)
    has_splits = (root / "train").is_dir() and (root / "test").is_dir()
    class_dir = root / "train" if has_splits else root
    class_names = sorted(p.name for p in class_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DatasetError(f"no class sub-folders in {class_dir}")
    if grey is None:
        grey = _folder_is_grey(class_dir, class_names)
    mode = "L" if grey else "RGB"
    if has_splits:
        xtr, ytr = _load_folder_split(root / "train", class_names, image_size, mode)
        xte, yte = _load_folder_split(root / "test", class_names, image_size, mode)
    else:
        x, y = _load_folder_split(root, class_names, image_size, mode)
        rng = np.random.default_rng(seed)
        test_mask = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            n_test = round(len(idx) * test_fraction)
            test_mask[rng.choice(idx, size=n_test, replace=False)] = True
        xtr, ytr, xte, yte = x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]
    return ImageDataset(f"image-folder:{root.name}", tuple(class_names), xtr, ytr, xte, yte)


def _folder_is_grey(class_dir: Path, class_names: list[str]) -> bool:
    from PIL import Image

    for cls in class_names:
        for p in sorted((class_dir / cls).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(p) as im:
                        return im.mode in ("L", "1", "I;16", "I")
                except OSError:
                    continue
    return False


# --------------------------------------------------------------------------- registry

REGISTRY: dict[str, Callable[..., ImageDataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image-folder": load_image_folder,
}

DESCRIPTIONS = {
    "fashion-mnist": "Fashion-MNIST 28x28 grey, 10 classes (Debian dataset-fashion-mnist or torchvision root)",
    "cifar10": "CIFAR-10 32x32 colour, 10 classes (torchvision cifar-10-batches-py layout)",
    "image-folder": "any folder with one sub-folder per class (root/CLASS/*.png)",
}


def available_datasets() -> list[str]:
    return sorted(REGISTRY)


def load_dataset(name: str, root: str | Path | None = None, download: bool = False,
                 **kwargs) -> ImageDataset:
    """Load a registered dataset by name; ``root`` and ``download`` mean the same for every loader."""
    if name not in REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())}")
    return REGISTRY[name](root, download, **kwargs)


@functools.lru_cache(maxsize=4)
def load_dataset_cached(name: str, root: str | None, download: bool = False) -> ImageDataset:
    """``load_dataset`` once per process: pre-flight and several stages read the same data."""
    return load_dataset(name, root, download)
