"""The one grid renderer: layout by hand, PNGs Pillow decodes, a clear error for no images."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.grids import GAP, strips_png, tile, tile_png


def _images(n, h=4, w=3, c=1):
    return (np.arange(n * h * w * c) % 251 + 1).astype(np.uint8).reshape(n, h, w, c)


def test_tile_places_each_image_in_reading_order():
    imgs = _images(5)
    canvas = tile(imgs, cols=2)
    assert canvas.shape == (3 * (4 + GAP), 2 * (3 + GAP), 1)
    for i, im in enumerate(imgs):
        r, q = divmod(i, 2)
        y, x = r * (4 + GAP) + GAP // 2, q * (3 + GAP) + GAP // 2
        np.testing.assert_array_equal(canvas[y:y + 4, x:x + 3], im)
    assert canvas[2 * (4 + GAP):, (3 + GAP):].max() == 0  # the sixth slot stays empty


def test_tile_png_is_the_canvas_scaled_up():
    imgs = _images(3, c=3)
    with Image.open(io.BytesIO(tile_png(imgs, cols=3, scale=2))) as im:
        got = np.asarray(im)
    np.testing.assert_array_equal(got[::2, ::2], tile(imgs, cols=3))


def test_strips_png_draws_rows_and_refuses_no_images():
    png = strips_png([("real", _images(2)), ("samples", _images(4))], "class 0")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width > im.height > 0
    with pytest.raises(ValueError, match="every row is empty"):
        strips_png([("real", np.zeros((0, 4, 3, 1), np.uint8))])
