"""What every dataset loader returns, and the image handling the user-data loaders share.

:class:`ImageDataset` holds uint8 (N, H, W, C) images (C = 1 for grey, 3 for colour) and
int64 labels; a training image without a label has the label :data:`UNLABELED`. Small
image datasets fit in memory many times over, and in-memory arrays let the SSL trainer keep
the whole set on the GPU.

The image-folder and Hugging Face loaders read one image at a time through
:func:`read_image`, so both convert (``image_mode``) and resize (``resize``) alike, and
:func:`stack_images` refuses mixed sizes naming the config key that fixes them. This module
is the ground the loaders stand on (``pipeline.data.datasets`` re-exports its names), kept
apart so the folder and Hugging Face loaders need not import the registry that names them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The label of a training image nobody labeled (an image in ``unlabeled/``, a dataset row
# with no label). Never a class index: the split puts such images in the unlabeled pool only.
UNLABELED = -1

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_MODES = ("auto", "grey", "rgb")
# Pillow modes that hold one grey value per pixel: read as one channel under image_mode auto.
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
RESERVED_FOLDERS = ("unlabeled", "test", "train")


class DatasetError(RuntimeError):
    """A dataset cannot be found or read; the message says how to provide it."""


@dataclass(frozen=True)
class ImageDataset:
    name: str
    class_names: tuple[str, ...]
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,); UNLABELED for an image without a label
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_unlabeled(self) -> int:
        """Training images that have no label (they can only join the unlabeled pool)."""
        return int((self.train_labels == UNLABELED).sum())

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x, y = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise ValueError(f"{part}_images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}")
            if len(x) != len(y):
                raise ValueError(f"{part}: {len(x)} images but {len(y)} labels")
        if (self.test_labels == UNLABELED).any():
            raise ValueError("test images must all be labeled (the test split is scored)")


def pillow_mode(native: str, image_mode: str) -> str:
    """The Pillow mode an image of mode ``native`` is read in: ``image_mode`` grey/rgb force
    one; auto keeps grey images grey and reads every other image as RGB."""
    if image_mode not in IMAGE_MODES:
        raise DatasetError(f"image_mode={image_mode!r}: choose one of {', '.join(IMAGE_MODES)}")
    if image_mode == "grey":
        return "L"
    if image_mode == "rgb":
        return "RGB"
    return "L" if native in GREY_MODES else "RGB"


def read_image(source: str | Path | bytes, image_mode: str = "auto",
               size: tuple[int, int] | None = None) -> np.ndarray:
    """One image (a path or encoded bytes) as uint8 (H, W, C), converted per ``image_mode``
    and, with ``size`` (H, W), resized with Pillow's bicubic filter. Raises OSError (Pillow's
    UnidentifiedImageError is one) for a file that is not an image."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im = im.convert(pillow_mode(im.mode, image_mode))
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def stack_images(arrays: list[np.ndarray], where: str) -> np.ndarray:
    """Images read by :func:`read_image` as one (N, H, W, C) array. Under image_mode auto a
    dataset may mix grey and colour files: the grey ones are repeated to three channels
    (lossless), so the whole dataset has one channel count whichever file comes first."""
    if not arrays:
        return np.zeros((0, 1, 1, 1), np.uint8)
    if len({a.shape[-1] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        raise DatasetError(
            f"images in {where} have different sizes ({shown}); set `resize: true` in the "
            "config (--set resize=true) to resize every image to image_size x image_size, "
            "or resize the files to one size")
    return np.stack(arrays)


def same_channels(*parts: np.ndarray) -> list[np.ndarray]:
    """Train and test arrays with one channel count (grey parts repeated to RGB when another
    part is colour), as :func:`stack_images` does within one part."""
    if len({p.shape[-1] for p in parts if len(p)}) > 1:
        return [np.repeat(p, 3, axis=-1) if p.shape[-1] == 1 else p for p in parts]
    return list(parts)


def hold_out_test(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified ``fraction`` of the *labeled* images, as a boolean mask:
    the test split of a dataset that ships none. Unlabeled images are never held out (they
    cannot be scored)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels[labels != UNLABELED]):
        idx = np.flatnonzero(labels == c)
        mask[rng.choice(idx, size=round(len(idx) * fraction), replace=False)] = True
    return mask


def conform(ds: ImageDataset, image_mode: str = "auto",
            size: tuple[int, int] | None = None) -> ImageDataset:
    """A loaded dataset converted per ``image_mode`` and resized to ``size``: the same
    options the user-data loaders apply while reading, for the benchmark datasets."""
    from PIL import Image

    want = {"grey": 1, "rgb": 3}.get(image_mode)
    if (want is None or want == ds.image_shape[2]) and (size is None or size == ds.image_shape[:2]):
        return ds  # nothing to do: the arrays are returned untouched

    def fit(x: np.ndarray) -> np.ndarray:
        arrays = []
        for a in x:
            im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
            if want is not None:
                im = im.convert("L" if want == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            b = np.asarray(im, dtype=np.uint8)
            arrays.append(b[..., None] if b.ndim == 2 else b)
        return np.stack(arrays) if arrays else x

    return ImageDataset(ds.name, ds.class_names, fit(ds.train_images), ds.train_labels,
                        fit(ds.test_images), ds.test_labels)


def stat_listing(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of each file: what a content key hashes. Stat
    only, no image decoded, so a 2,000-image folder is keyed in milliseconds; a changed,
    added, removed or renamed file changes it."""
    out = []
    for f in sorted(files):
        st = f.stat()
        out.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out
