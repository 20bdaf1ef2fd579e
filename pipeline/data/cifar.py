"""CIFAR-10 in torchvision's ``cifar-10-batches-py`` layout, read without trusting the files.

The batches are Python pickles, and unpickling a file can run any code it names. Two checks
stand between a file and its arrays:

* **Checksums.** Each batch file, and ``cifar-10-python.tar.gz`` when it lies beside the
  folder, must have the md5 the dataset's page publishes (the values torchvision's ``CIFAR10``
  lists): a truncated download, a disk error or an edited file is refused naming the file,
  before it is unpickled.
* **A restricted unpickler** (always on): a CIFAR batch holds dicts, lists, strings and
  numpy arrays, so any other object a file asks for is refused instead of built.

``CIFAR10_SKIP_MD5=1`` skips the checksums only, for a fabricated archive in the same layout
(the tests' small stand-ins); the restricted unpickler still guards it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np

from pipeline.data.image_dataset import DatasetError, ImageDataset

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# Published md5s (https://www.cs.toronto.edu/~kriz/cifar.html; torchvision.datasets.CIFAR10).
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
SKIP_MD5_ENV = "CIFAR10_SKIP_MD5"
FIX = (f"delete it and unpack {ARCHIVE} (md5 {ARCHIVE_MD5}) from {URL} again, or pass "
       "download=True when online")

# What a CIFAR batch's pickle may name: numpy's array reconstruction (its module moved from
# numpy.core to numpy._core in numpy 2), and _codecs.encode, with which protocol 2 writes
# bytes from Python 3 (a batch re-pickled there, as the tests' stand-ins are).
_ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch "
                                         "never holds (refused, not built)")
        return super().find_class(module, name)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksums(root: Path, files: list[Path]) -> None:
    """Raise DatasetError naming the first file (the archive, then each batch) whose md5 is
    not the published one; nothing is unpickled before this passes."""
    if os.environ.get(SKIP_MD5_ENV) == "1":
        return
    archive = root / ARCHIVE
    if archive.is_file() and _md5(archive) != ARCHIVE_MD5:
        raise DatasetError(f"{archive} does not have CIFAR-10's published md5 {ARCHIVE_MD5} "
                           f"(a partial or altered download); {FIX}")
    for path in files:
        expected = FILE_MD5[path.name]
        if _md5(path) != expected:
            raise DatasetError(
                f"{path} does not have the published md5 {expected} of CIFAR-10's "
                f"{path.name} (corrupt, truncated or altered; not unpickled); {FIX}. A "
                f"fabricated archive in this layout is read with {SKIP_MD5_ENV}=1")


def _unpickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - corrupt or hostile pickle: not a batch to use
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {e}; {FIX}") from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    raw_labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    if raw_labels is None or "data" not in entry:
        raise DatasetError(f"{path} is not a CIFAR batch (needs 'data' and 'labels'); {FIX}")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(raw_labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: data {data.shape} / {len(labels)} labels do not match the "
                           f"CIFAR layout (N, 3072); {FIX}")
    data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), labels


def load_cifar10(root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """CIFAR-10 in torchvision's ``cifar-10-batches-py`` pickle layout under ``root``."""
    if root is None:
        root = os.environ.get("CIFAR10_ROOT")
    if root is None:
        raise DatasetError(
            "CIFAR-10 needs a root directory: pass root=DIR (or set CIFAR10_ROOT) holding "
            f"{FOLDER}/, or pass download=True on a machine that is online."
        )
    base = Path(root) / FOLDER
    if not base.exists() and download:
        from torchvision.datasets import CIFAR10  # checks the archive's md5 itself

        try:
            CIFAR10(str(root), train=True, download=True)
        except OSError as e:  # URLError is an OSError: offline, or the server refused
            raise DatasetError(f"CIFAR-10 download into {root} failed ({e}); unpack "
                               f"{ARCHIVE} there by hand on an offline machine") from e
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in [*train_files, base / "test_batch"] if not p.exists()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found under {base} (missing {', '.join(missing)}). Unpack "
            f"{ARCHIVE} from {URL} there, or pass download=True when online."
        )
    meta = base / "batches.meta"
    verify_checksums(Path(root), [*train_files, base / "test_batch",
                                  *([meta] if meta.exists() else [])])
    parts = [read_batch(p) for p in train_files]
    xte, yte = read_batch(base / "test_batch")
    names = CIFAR10_CLASSES
    if meta.exists():
        entry = _unpickle(meta)
        if not isinstance(entry, dict) or len(entry.get("label_names", ())) != 10:
            raise DatasetError(f"{meta} does not hold CIFAR-10's 10 label_names; {FIX}")
        names = tuple(str(n) for n in entry["label_names"])
    return ImageDataset("cifar10", names,
                        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        xte, yte)
