"""A user's image files (or folders of them) as one uint8 (N, H, W, C) array for a classifier.

Each file is converted as the image-folder loader converts training images (Pillow
``convert`` to "L" or "RGB", then a bicubic resize to the net's size). Files whose pixels
are not 8-bit (16-bit, 32-bit integer or float) are refused rather than clipped, and every
error names the file and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.data.datasets import IMAGE_SUFFIXES

# Pillow modes with 8-bit samples: converting them to "L" or "RGB" keeps what they show.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV")


class ImageFileError(ValueError):
    """An image file cannot be read as the classifier's input; the message says what to do."""


def image_paths(items: Iterable[str | Path]) -> list[Path]:
    """Files as given (in order), and each folder's image files, recursively, sorted."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageFileError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise ImageFileError(f"{p}: no such file or folder")
    if not paths:
        raise ImageFileError("no images given; pass image files or folders of them")
    return paths


def read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One file as uint8 (H, W, C) in Pillow ``mode`` ("L" or "RGB") at ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode not in EIGHT_BIT_MODES:
                raise ImageFileError(
                    f"{path}: Pillow mode {im.mode!r} has more than 8 bits per sample, which "
                    f"the classifier was not trained on; save it as an 8-bit "
                    f"{'greyscale' if mode == 'L' else 'RGB'} PNG first (e.g. scale to 0..255)")
            try:
                im = im.convert(mode)
            except ValueError as e:
                raise ImageFileError(f"{path}: cannot convert Pillow mode {im.mode!r} to "
                                     f"{mode!r} ({e}); save it as an 8-bit "
                                     f"{'greyscale' if mode == 'L' else 'RGB'} PNG") from None
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ImageFileError(f"{path} is not an image Pillow can read ({e}); pass PNG or JPEG "
                             "files, or folders of them") from None
    return arr[..., None] if arr.ndim == 2 else arr


def read_images(paths: Iterable[Path], shape: tuple[int, int, int]) -> np.ndarray:
    """Every file of ``paths`` as uint8 (N, H, W, C) of ``shape`` (H, W, C; C is 1 or 3)."""
    h, w, c = shape
    if c not in (1, 3):
        raise ImageFileError(f"images with {c} channels are not supported (1 or 3)")
    arrays = [read_image(Path(p), "L" if c == 1 else "RGB", (h, w)) for p in paths]
    return np.stack(arrays) if arrays else np.zeros((0, h, w, c), np.uint8)
