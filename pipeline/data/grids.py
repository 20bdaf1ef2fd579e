"""Image grids, the one renderer behind every grid a run, a model card or a bench writes.

``strips_png`` draws labelled rows of images (real conditions above their samples) with a
title; ``tile`` lays images out on a plain canvas (a model's sample sheet). Both take uint8
(N, H, W, C) arrays, C = 1 or 3.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

GAP = 2  # pixels between neighbouring images


def tile(images: np.ndarray, cols: int, gap: int = GAP) -> np.ndarray:
    """(rows*(H+gap), cols*(W+gap), C) uint8 canvas, images in reading order, black gaps."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // cols))
    canvas = np.zeros((rows * (h + gap), cols * (w + gap), c), dtype=np.uint8)
    half = gap // 2
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        y, x = r * (h + gap) + half, q * (w + gap) + half
        canvas[y:y + h, x:x + w] = im
    return canvas


def tile_png(images: np.ndarray, cols: int = 8, scale: int = 3) -> bytes:
    """PNG of :func:`tile`, each pixel drawn as ``scale`` x ``scale`` (Pillow, nearest)."""
    from PIL import Image

    canvas = tile(images, cols)
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def strips_png(rows: Sequence[tuple[str, np.ndarray]], title: str = "",
               cols: int | None = None) -> bytes:
    """PNG: one labelled strip per ``(label, images)`` row, ``cols`` slots wide (default: the
    longest row), white where a row has fewer images."""
    from matplotlib.figure import Figure

    shaped = next((imgs for _, imgs in rows if len(imgs)), None)
    if shaped is None:
        raise ValueError("strips_png: every row is empty; give at least one image")
    h, w, c = shaped.shape[1:]
    cols = cols or max(len(imgs) for _, imgs in rows)
    # Wide enough for the strips and for the title (about 0.07 in per character at 9 pt).
    fig = Figure(figsize=(max(cols * 0.55 + 1.0, len(title) * 0.07 + 0.4),
                          len(rows) * 0.6 + 0.35))
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, imgs) in zip(axes, rows, strict=True):
        strip = np.full((h, cols * (w + GAP), c), 255, np.uint8)
        for j, im in enumerate(imgs[:cols]):
            strip[:, j * (w + GAP):j * (w + GAP) + w] = im
        ax.imshow(strip[..., 0] if c == 1 else strip, cmap="gray" if c == 1 else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
        for s in ax.spines.values():
            s.set_visible(False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def class_grid_png(real: np.ndarray, synthetic: dict[float, np.ndarray], title: str,
                   cols: int = 8, real_label: str = "real labeled",
                   row_label: str = "mask {:g}") -> bytes:
    """PNG: one row of real labeled images, then one row of synthetic images per mask ratio.

    ``row_label`` formats each synthetic row's key into its label (a constant string labels
    every row alike: ``"samples"``).
    """
    rows = [(real_label, real[:cols])] + \
        [(row_label.format(r), imgs[:cols]) for r, imgs in sorted(synthetic.items())]
    return strips_png(rows, title, cols)


def grid_picks(frame, rows: np.ndarray, n: int) -> np.ndarray:
    """Rows for a grid: first sample of each condition, then the second of each, and so on,
    so a grid shows as many different condition images as it can."""
    sub = frame.iloc[rows]
    rank = sub.groupby("condition_id", dropna=False).cumcount().to_numpy()
    cond = sub["condition_id"].fillna(-1).to_numpy()
    order = np.lexsort((cond, rank))
    return rows[order[:n]]
