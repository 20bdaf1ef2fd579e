"""A user's folder of images as a dataset: labeled classes, unlabeled images, a test set.

The layout (``ROOT`` is ``dataset_root``)::

    ROOT/CLASS/*.png          one sub-folder per class: the labeled images
    ROOT/unlabeled/**         optional: images without a label (nested folders allowed)
    ROOT/test/CLASS/*.png     optional: the labeled test images

``ROOT/train/CLASS`` (with ``ROOT/train/unlabeled`` or ``ROOT/unlabeled``) works as well.
The folder names ``unlabeled``, ``test`` and ``train`` are reserved: never a class. Without a
test folder a seeded, class-stratified ``test_fraction`` of the labeled images is the test
split; unlabeled images always stay in training, with the label ``UNLABELED``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pipeline.data.image_dataset import (
    IMAGE_SUFFIXES,
    RESERVED_FOLDERS,
    UNLABELED,
    DatasetError,
    ImageDataset,
    hold_out_test,
    read_image,
    same_channels,
    stack_images,
    stat_listing,
)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_layout(root: Path) -> tuple[Path, list[str], list[Path], Path | None]:
    """(the folder holding the class folders, the class names, the unlabeled folders, the
    test folder or None): which folder plays which role, without reading an image."""
    class_dir = root / "train" if (root / "train").is_dir() else root
    class_names = [p.name for p in _visible_dirs(class_dir) if p.name not in RESERVED_FOLDERS]
    unlabeled = [d for d in dict.fromkeys((root / "unlabeled", class_dir / "unlabeled"))
                 if d.is_dir()]
    test_dir = root / "test" if (root / "test").is_dir() else None
    return class_dir, class_names, unlabeled, test_dir


def _read_all(files: list[Path], image_mode: str, size: tuple[int, int] | None
              ) -> tuple[list[np.ndarray], list[bool]]:
    """Every file read, and which were readable: one unreadable file in a scraped folder is
    skipped with a warning naming it, not a failed run."""
    from PIL import UnidentifiedImageError

    arrays, ok = [], []
    for p in files:
        try:
            arrays.append(read_image(p, image_mode, size))
            ok.append(True)
        except (UnidentifiedImageError, OSError) as e:
            warnings.warn(f"skipping unreadable image {p}: {e}", stacklevel=3)
            ok.append(False)
    return arrays, ok


def _labeled_files(folder: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(class_names):
        found = _image_files(folder / cls) if (folder / cls).is_dir() else []
        files += found
        labels += [label] * len(found)
    return files, labels


def load_image_folder(root: str | Path | None = None, download: bool = False, *,
                      image_size: int | tuple[int, int] | None = None,
                      image_mode: str = "auto", test_fraction: float = 0.2,
                      seed: int = 0) -> ImageDataset:
    """The folder ``root`` in the layout of this module's docstring. ``image_size`` (the
    config's ``resize: true``) resizes every image to that size; ``image_mode`` (auto, grey,
    rgb) converts every image. Unreadable images are skipped with a warning."""
    if root is None or not Path(root).is_dir():
        raise DatasetError(f"image-folder needs root=DIR (dataset_root) with one sub-folder per "
                           f"class; got {root!r}")
    root = Path(root)
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    class_dir, class_names, unlabeled_dirs, test_dir = folder_layout(root)
    if not class_names:
        raise DatasetError(f"no class sub-folders in {class_dir} (the names "
                           f"{', '.join(RESERVED_FOLDERS)} are reserved, not classes); put "
                           "each class's labeled images in a folder named after the class")
    files, labels = _labeled_files(class_dir, class_names)
    unlabeled_files = [f for d in unlabeled_dirs for f in _image_files(d, recursive=True)]
    files += unlabeled_files
    labels += [UNLABELED] * len(unlabeled_files)
    arrays, ok = _read_all(files, image_mode, size)
    y = np.asarray(labels, dtype=np.int64)[np.asarray(ok, dtype=bool)] if files else \
        np.zeros(0, np.int64)
    if not (y != UNLABELED).any():
        raise DatasetError(f"no readable labeled images under {class_dir}/CLASS/ (classes: "
                           f"{', '.join(class_names)})")
    x = stack_images(arrays, str(root))
    if test_dir is None:
        test_mask = hold_out_test(y, test_fraction, seed)
        xtr, ytr, xte, yte = x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]
    else:
        stray = [p.name for p in _visible_dirs(test_dir) if p.name not in class_names]
        if stray:
            raise DatasetError(f"{test_dir} has folders {', '.join(stray)} that are not classes "
                               f"of the training images ({', '.join(class_names)}); name the "
                               "test folders after the training classes")
        test_files, test_labels = _labeled_files(test_dir, class_names)
        test_arrays, test_ok = _read_all(test_files, image_mode, size)
        if not test_arrays:
            raise DatasetError(f"no readable images under {test_dir}/CLASS/; remove the empty "
                               "test folder to hold out a fraction of the labeled images")
        xte = stack_images(test_arrays, str(test_dir))
        yte = np.asarray(test_labels, dtype=np.int64)[np.asarray(test_ok, dtype=bool)]
        if xte.shape[1:3] != x.shape[1:3]:
            raise DatasetError(f"the test images are {xte.shape[1]}x{xte.shape[2]} but the "
                               f"training images {x.shape[1]}x{x.shape[2]}; set `resize: true` "
                               "in the config to resize every image to image_size x image_size")
        x, xte = same_channels(x, xte)
        xtr, ytr = x, y
    return ImageDataset(f"image-folder:{root.name}", tuple(class_names), xtr, ytr, xte, yte)


def folder_contents(root: str | Path) -> list[tuple[str, int, int]]:
    """Every image file under ``root`` (relative path, size, mtime): the folder's identity in
    the split key, so a changed folder reruns the split and everything after it."""
    root = Path(root)
    if not root.is_dir():
        return []
    return stat_listing(_image_files(root, recursive=True), root)
