"""The target domain: built-in few-image sets or a folder, and the seeded draw of shots and
held-out images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pipeline.paths import resolve_path
from pipeline.transfer.config import BUILTIN_TARGETS, DIGITS, TransferConfig, TransferError


def foolbox_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 20 real MNIST digits in foolbox/data/mnist_{index}_{label}.png: uint8 (20, 28, 28, 1)."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("mnist_*.png")) \
        if spec and spec.submodule_search_locations else []
    if not files:
        raise TransferError("target='mnist-foolbox' needs the PyPI package foolbox (pip install "
                            "foolbox), or use target='sklearn-digits'")
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in files])[..., None]
    return images, np.array([int(p.stem.split("_")[2]) for p in files], np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 28, 28, 1): each upscaled with Pillow to a
    20x20 box centred in 28x28, where MNIST centres its digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    small = np.round(data.images / 16.0 * 255).astype(np.uint8)
    out = np.zeros((len(small), 28, 28, 1), np.uint8)
    for i, im in enumerate(small):
        out[i, 4:24, 4:24, 0] = np.asarray(Image.fromarray(im).resize((20, 20), Image.BILINEAR))
    return out, data.target.astype(np.int64)


def folder_images(folder: Path) -> np.ndarray:
    """Every image file directly in ``folder`` (sorted by name) as uint8 (N, H, W, C)."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.data.datasets import IMAGE_SUFFIXES

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB" if im.mode in ("RGB", "RGBA", "P")
                                                    else "L")))
        except (UnidentifiedImageError, OSError) as e:
            raise TransferError(f"target={str(folder)!r}: cannot read {p.name} ({e}); remove "
                                "it or replace it with a PNG") from None
    if not images:
        raise TransferError(f"target={str(folder)!r}: the folder holds no images (PNG, JPEG, "
                            "...); put the target domain's images directly in it")
    if len({a.shape for a in images}) > 1:
        raise TransferError(f"target={str(folder)!r}: the images differ in size "
                            f"({sorted({a.shape[:2] for a in images})[:3]}...); resize them to "
                            "one size")
    if len({a.ndim for a in images}) > 1:  # grey and colour mixed: colour them all
        images = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in images]
    x = np.stack(images)
    return x[..., None] if x.ndim == 3 else x


def _dataset_pool(config: TransferConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from pipeline.data.datasets import DatasetError, load_dataset

    try:
        ds = load_dataset(config.target, config.target_root)
    except DatasetError as e:
        raise TransferError(f"target={config.target!r}: {e}") from None
    return (np.concatenate([ds.train_images, ds.test_images]),
            np.concatenate([ds.train_labels, ds.test_labels]), ds.class_names)


def _raw_target(config: TransferConfig):
    """(images, labels or None, class names) of the whole target, before class selection."""
    from pipeline.data.datasets import available_datasets

    if config.target == "mnist-foolbox":
        return (*foolbox_mnist(), DIGITS)
    if config.target == "sklearn-digits":
        return (*sklearn_digits(), DIGITS)
    if config.target in available_datasets():
        return _dataset_pool(config)
    folder = resolve_path(config.target)
    if not folder.is_dir():
        raise TransferError(
            f"target={config.target!r}: no such folder ({folder}); give a folder of PNG images, "
            f"a built-in target ({', '.join(BUILTIN_TARGETS)}), or a registered dataset "
            f"({', '.join(available_datasets())}) with a class (--class)")
    return folder_images(folder), None, ()


def _select_class(images, labels, names: tuple[str, ...], wanted: str | None, target: str):
    if wanted is None:
        return images
    if labels is None:
        raise TransferError(f"target={target!r} is a folder without classes: drop --class "
                            "(target_class), or point target at the class's own folder")
    if wanted in names:
        index = names.index(wanted)
    elif wanted.isdigit() and int(wanted) < len(names):
        index = int(wanted)
    else:
        raise TransferError(f"target_class={wanted!r} is not a class of {target!r}; use one "
                            f"of {', '.join(names)} (or its index 0..{len(names) - 1})")
    return images[labels == index]


def _to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey <-> colour to the base model's channel count (ITU-R 601 luma for colour -> grey)."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images[..., :1], 3, axis=-1)
    luma = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[..., None].astype(np.uint8)


def target_name(config: TransferConfig) -> str:
    """The domain's name: the class name of every sample in the shards."""
    base = config.target if config.target in BUILTIN_TARGETS or "/" not in config.target \
        else resolve_path(config.target).name
    return base if config.target_class is None else f"{base}:{config.target_class}"


def target_pool(config: TransferConfig, channels: int) -> np.ndarray:
    """Every image of the target domain, uint8 (N, H, W, channels)."""
    images, labels, names = _raw_target(config)
    return _to_channels(_select_class(images, labels, names, config.target_class,
                                      config.target), channels)


def draw_shots(n: int, shots: int, max_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(shot indices, held-out indices) into a pool of ``n``: one seeded permutation.

    Shots are its head and the held-out images its tail, so with one seed the 10 shots are
    among the 100 shots and both are measured against the same held-out images.
    """
    if n - shots < 2:
        raise TransferError(
            f"shots={shots}: the target has {n} images, and evaluation holds out at least 2 "
            f"beside the shots; lower --shots to at most {max(n - 2, 0)} or add images")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:shots]), np.sort(perm[max(shots, n - max_held_out):])
