"""Batched FixMatch augmentation on the training device, per-image random, seeded.

Weak  = random crop with reflect padding (pad = H/8) + horizontal flip.
Strong = weak + RandAugment (3 ops per image, drawn with replacement from USB's pool of 14,
         each with a uniform random magnitude in USB's range) + Cutout.

The reference is USB's ``semilearn/datasets/augmentation/randaugment.py``, which runs PIL
ops on uint8 images one at a time; each op here reproduces the PIL op USB calls, batched:
geometric ops use PIL's coordinate convention (pixel centres at +0.5, inverse map, nearest
neighbour = floor, black fill outside the source), and Cutout draws USB's square, with its
(125, 123, 114) colour.

Why not ``kornia.augmentation.RandAugment``: it draws one op sequence for the whole
batch, so a batch of 448 unlabeled images would share their 3 ops, which is a weaker,
correlated augmentation than FixMatch's per-image one; and it draws from torch's global
RNG, which would make exact resume depend on everything else that touches that RNG.

What we do instead: per-image ops and magnitudes, batched two ways (same images):

* grouped (default): each round sorts the batch by the op each image drew and runs every
  op once, on its own contiguous slice (all five geometric ops fold into one fixed-point
  affine map per image, so they are one slice and one gather); an op no image drew costs
  nothing. Knowing the slice sizes costs one host sync per round (three per batch), which
  the trainer hides by producing batch k+1 while the card trains on batch k.
* dense (``grouped=False``): every op on the whole batch, kept where drawn
  (``torch.where``): ~14x the arithmetic, but no host sync and no data-dependent shapes
  (torch.compile and CUDA graphs friendly).

Equalize and sharpness are kornia's batched kernels (per-image factors); the PIL-style
blends are a line each here.

Known difference from USB: PIL rounds every op's output to uint8, we keep float values
between ops (a blend's output is not snapped to the 8-bit grid before the next op).

All random numbers come from one explicit ``torch.Generator`` on the data's device:
the same generator state gives the same augmented batch, which is what makes an
interrupted run resume bit-exactly (on CPU).

Images here are float in [0, 1], (N, C, H, W); C is 1 (grey) or 3 (colour).
"""

from __future__ import annotations

import math

import kornia
import torch

# USB's RandAugment pool (randaugment.py, augment_list()): 14 ops, same ranges. Magnitudes
# are drawn uniformly in [lo, hi). Units: enhance factors (PIL ImageEnhance, 1 = unchanged);
# posterize bits (USB's int(v): 4..7, never 8); rotate degrees, counter-clockwise as PIL's
# Image.rotate; shear coefficient of PIL's affine transform; solarize threshold on the 8-bit
# scale (pixels >= v are inverted, as PIL ImageOps.solarize); translate as a fraction of
# the image width/height. autocontrast, equalize and identity take no magnitude.
OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "equalize", "posterize",
       "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
_RANGES = {
    "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
    "sharpness": (0.05, 0.95), "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0),
    "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0.0, 256.0),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}
_OP_ID = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
FILL = 0.0  # pixels a geometric op uncovers are black, as PIL's transform leaves them
# USB's CutoutAbs colour (8-bit RGB); grey images get its ITU-R 601 luma, round(122.57).
CUTOUT_FILL_RGB = (125, 123, 114)
CUTOUT_FILL_GREY = 123


def weak_from_store(store: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
                    pad: int | None = None, flip: bool = True) -> torch.Tensor:
    """Crop+flip straight out of the uint8 (N, H, W, C) store: one gather per batch.

    Reflect padding, the crop offset and the flip are all index arithmetic, so the
    padded image is never materialised; returns float (B, C, H, W) in [0, 1].
    """
    _, h, w, _ = store.shape
    b, dev = idx.shape[0], store.device
    pad = max(1, h // 8) if pad is None else pad
    oy = torch.randint(-pad, pad + 1, (b, 1), generator=gen, device=dev)
    ox = torch.randint(-pad, pad + 1, (b, 1), generator=gen, device=dev)
    rows = oy + torch.arange(h, device=dev)
    cols = ox + torch.arange(w, device=dev)
    if flip:
        flipped = torch.rand(b, 1, generator=gen, device=dev) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    rows = _reflect(rows, h)
    cols = _reflect(cols, w)
    out = store[idx.view(b, 1, 1), rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).float().div_(255.0)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    # Reflect without repeating the edge (numpy/torch 'reflect'); valid for |pad| < size.
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def to_unit(store_batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1] (evaluation path, no augmentation)."""
    return store_batch.permute(0, 3, 1, 2).float().div_(255.0)


# --------------------------------------------------------------------------- single ops


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else kornia.color.rgb_to_grayscale(x)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL ImageEnhance semantics: factor 0 gives the degenerate image, 1 the original.
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0.0, 1.0)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    # Keep the top `bits` bits of each 8-bit value (PIL ImageOps.posterize).
    q = (x * 255.0).round()
    step = torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1)
    return torch.floor(q / step) * step / 255.0


_FIX = 65536  # PIL's nearest-neighbour affine works in 16.16 fixed point


def _fix(v: torch.Tensor) -> torch.Tensor:
    # PIL's FIX(v) = floor(v * 65536 + 0.5), from a float64 value, as an int64.
    return torch.floor(v * _FIX + 0.5).long()


def _pil_affine(op: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image int64 (B, 6) 16.16 fixed-point coefficients (A0..A5) such that output pixel
    (row y, column x) is read from input column (A2 + x A0 + y A1) >> 16 and row
    (A5 + x A3 + y A4) >> 16: PIL's nearest-neighbour ``Image.transform(AFFINE)``, which is
    what USB's geometric ops call; identity for images that drew a non-geometric op.

    USB's calls, with v the magnitude and PIL's matrix (a, b, c, d, e, f) mapping an output
    point (x, y) to the input point (a x + b y + c, d x + e y + f), pixel centres at +0.5:
      Rotate      img.rotate(v): counter-clockwise by v degrees about (w/2, h/2), with
                  cos/sin rounded to 15 decimals;
      ShearX      (1, v, 0, 0, 1, 0);     ShearY      (1, 0, 0, v, 1, 0);
      TranslateX  (1, 0, v*w, 0, 1, 0);   TranslateY  (1, 0, 0, 0, 1, v*h).
    Only one of them is non-neutral per image in a round. PIL runs rotations and shears in
    16.16 fixed point (libImaging/Geometry.c, affine_fixed: coefficients FIX'ed once, then
    exact integer sums), and pure translations in float64 (ImagingScaleAffine: floor of
    x + 0.5 + v*w); both are reproduced exactly here, from float64 coefficients, so the
    pixel map is integer arithmetic and the same on every device.
    """
    mag = mag.double()
    zero = torch.zeros_like(mag)

    def pick(name: str) -> torch.Tensor:
        return torch.where(op == _OP_ID[name], mag, zero)

    # Rotation / shear matrix, in the operation order PIL's Image.rotate uses.
    ang = -pick("rotate") * (math.pi / 180.0)
    cos = torch.round(torch.cos(ang) * 1e15) / 1e15
    sin = torch.round(torch.sin(ang) * 1e15) / 1e15
    cx, cy = w / 2.0, h / 2.0
    m0, m1, m3, m4 = cos, sin + pick("shear_x"), -sin + pick("shear_y"), cos
    m2 = (m0 * -cx + m1 * -cy + 0.0) + cx
    m5 = (m3 * -cx + m4 * -cy + 0.0) + cy
    shear = (op == _OP_ID["shear_x"]) | (op == _OP_ID["shear_y"])
    m2 = torch.where(shear, zero, m2)  # shears have no centring offset
    m5 = torch.where(shear, zero, m5)
    # Translations: an integer offset floor(v*w + 0.5) on top of the identity.
    kx = torch.floor(pick("translate_x") * w + 0.5).long()
    ky = torch.floor(pick("translate_y") * h + 0.5).long()
    return torch.stack([
        _fix(m0), _fix(m1), _fix(m2 + m0 * 0.5 + m1 * 0.5) + kx * _FIX,
        _fix(m3), _fix(m4), _fix(m5 + m3 * 0.5 + m4 * 0.5) + ky * _FIX,
    ], dim=1)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    # PIL ImageOps.solarize: 8-bit values >= threshold (in [0, 256)) are inverted.
    inv = (x * 255.0).round() >= threshold.view(-1, 1, 1, 1)
    return torch.where(inv, 1.0 - x, x)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL ImageEnhance.Contrast: the degenerate image is flat at the grey mean rounded to an
    # 8-bit level, int(mean + 0.5).
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
    mean = torch.floor(mean * 255.0 + 0.5) / 255.0
    return _blend(mean.expand_as(x), x, factor)


def _color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Saturation is the identity on grey images.
    return x if x.shape[1] == 1 else _blend(_grey(x).expand_as(x), x, factor)


# Photometric ops: f(images, per-image magnitude) -> images. Geometric ops are handled
# together as one affine warp (see _warp).
_PHOTOMETRIC = {
    "autocontrast": lambda x, m: _autocontrast(x),
    "brightness": lambda x, m: _blend(torch.zeros_like(x), x, m),
    "color": _color,
    "contrast": _contrast,
    "equalize": lambda x, m: kornia.enhance.equalize(x),
    "posterize": lambda x, m: _posterize(x, m.floor()),  # USB: int(v), 4..7
    "sharpness": lambda x, m: kornia.enhance.sharpness(x, m),
    "solarize": _solarize,
}


def _warp(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """All geometric ops of a round: nearest-neighbour resampling (PIL's default, which
    USB's Rotate/Shear/Translate use), FILL (black) where the source pixel is outside."""
    b, c, h, w = x.shape
    a = _pil_affine(op, mag, h, w).view(b, 6, 1, 1)
    px = torch.arange(w, device=x.device).view(1, w)
    py = torch.arange(h, device=x.device).view(h, 1)
    sx = (a[:, 2] + px * a[:, 0] + py * a[:, 1]) >> 16  # (B, H, W), floor division
    sy = (a[:, 5] + px * a[:, 3] + py * a[:, 4]) >> 16
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(b, 1, h * w)
    out = x.flatten(2).gather(2, src.expand(b, c, h * w)).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), out, torch.full_like(out, FILL))


# Groups a round runs separately: identity (nothing to do), each photometric op, and all
# geometric ops together (one warp). _GROUP_OF[op id] is the op's group.
_GROUPS = ("identity", *_PHOTOMETRIC, "geometric")
_GROUP_OF = tuple(_GROUPS.index("geometric" if name in _GEOMETRIC else name) for name in OPS)


def _magnitudes(op: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    mag = torch.zeros_like(u)
    for name, (lo, hi) in _RANGES.items():
        mag = torch.where(op == _OP_ID[name], lo + (hi - lo) * u, mag)
    return mag


def _run_group(group: str, x: torch.Tensor, mag: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    if group == "identity":
        return x
    if group == "geometric":
        return _warp(x, op, mag)
    return _PHOTOMETRIC[group](x, mag)


def _apply_round(x: torch.Tensor, op: torch.Tensor, u: torch.Tensor,
                 grouped: bool = True) -> torch.Tensor:
    """One RandAugment round: image i gets op[i] with magnitude drawn from u[i] in [0, 1).

    ``grouped`` runs each op on the images that drew it only; ``grouped=False`` runs each
    op on the whole batch and keeps it where drawn (module doc). Same result.
    """
    b = x.shape[0]
    mag = _magnitudes(op, u)
    group = torch.tensor(_GROUP_OF, device=op.device)[op]
    if not grouped:
        for gid, name in enumerate(_GROUPS[1:], start=1):
            x = torch.where((group == gid).view(b, 1, 1, 1), _run_group(name, x, mag, op), x)
        return x
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=len(_GROUPS)).tolist()  # the round's host sync
    xs, ms, ops = x[order], mag[order], op[order]
    parts, start = [], 0
    for name, n in zip(_GROUPS, counts, strict=True):
        if n:
            sl = slice(start, start + n)
            parts.append(_run_group(name, xs[sl], ms[sl], ops[sl]))
        start += n
    out = torch.empty_like(x)
    out[order] = torch.cat(parts)
    return out


def cutout(x: torch.Tensor, gen: torch.Generator, max_frac: float = 0.5) -> torch.Tensor:
    """USB's Cutout, per image: a square of colour CUTOUT_FILL_RGB (grey: CUTOUT_FILL_GREY).

    USB (randaugment.py, Cutout/CutoutAbs): v = U[0, max_frac) * width; a point
    (x0, y0) = np.random.uniform(w), np.random.uniform(h), which is numpy's uniform(low=w,
    high=1), so each coordinate lies in (1, w]; the corner is int(max(0, x0 - v/2)) and
    PIL's ImageDraw.rectangle fills the pixels from that corner to int(min(w, corner + v)),
    both ends included (at least one pixel), clipped to the image; v == 0 draws nothing.
    """
    b, c, h, w = x.shape
    dev = x.device
    v = torch.rand(b, generator=gen, device=dev) * max_frac * w
    px = w + (1 - w) * torch.rand(b, generator=gen, device=dev)
    py = h + (1 - h) * torch.rand(b, generator=gen, device=dev)
    x0 = (px - v / 2).clamp_min(0).floor()
    y0 = (py - v / 2).clamp_min(0).floor()
    x1 = (x0 + v).clamp_max(w).floor()
    y1 = (y0 + v).clamp_max(h).floor()
    cols = torch.arange(w, device=dev).view(1, 1, w)
    rows = torch.arange(h, device=dev).view(1, h, 1)

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, 1, 1)

    inside = ((cols >= per_image(x0)) & (cols <= per_image(x1))
              & (rows >= per_image(y0)) & (rows <= per_image(y1)) & per_image(v > 0))
    if c not in (1, 3):
        raise ValueError(f"cutout expects 1 or 3 channels, got {c}")
    levels = CUTOUT_FILL_RGB if c == 3 else (CUTOUT_FILL_GREY,)
    # new_full per channel: filled on the device, no host-to-device copy (which would wait
    # for every queued kernel).
    fill = torch.cat([x.new_full((1, 1, 1, 1), lvl / 255.0) for lvl in levels], dim=1)
    fill = fill.expand_as(x)
    return torch.where(inside.unsqueeze(1), fill, x)


def strong_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 3,
                   cutout_frac: float = 0.5, grouped: bool = True) -> torch.Tensor:
    """RandAugment(num_ops) with per-image ops and magnitudes, then Cutout. x: float [0,1].

    ``grouped`` picks the op batching (module doc); the random draws are the same either way.
    """
    b, dev = x.shape[0], x.device
    for _ in range(num_ops):
        op = torch.randint(0, len(OPS), (b,), generator=gen, device=dev)
        u = torch.rand(b, generator=gen, device=dev)
        x = _apply_round(x, op, u, grouped=grouped)
    return cutout(x, gen, cutout_frac) if cutout_frac > 0 else x
