"""Batched FixMatch augmentation on the training device, per-image random, seeded.

Weak  = random crop with reflect padding (pad = H/8) + horizontal flip.
Strong = weak + RandAugment-style ops (3 per image, from the FixMatch/USB pool of 14,
         each with a uniform random magnitude) + Cutout (square up to half the side).

Why not ``kornia.augmentation.RandAugment``: it draws one op sequence for the whole
batch, so a batch of 448 unlabeled images would share their 3 ops, which is a weaker,
correlated augmentation than FixMatch's per-image one; and it draws from torch's global
RNG, which would make exact resume depend on everything else that touches that RNG.

What we do instead: every op is computed for the whole batch with per-image magnitudes
and kept only where an image drew it (``torch.where``); an image that did not draw an op
passes through unchanged. Compared with gathering the images that drew each op into
sub-batches, this does ~14x more elementwise work per round, but the batch is tiny
(448 x 3 x 32 x 32), so it costs microseconds on a GPU, and it needs no boolean
indexing, hence no host-device sync and no shape-dependent kernels (torch.compile and
CUDA graphs friendly). All five geometric ops of a round fold into one affine matrix per
image, so each round does a single ``kornia.geometry.warp_affine``. Equalize and
sharpness are kornia's batched kernels (per-image factors); the PIL-style blends are a
line each here.

All random numbers come from one explicit ``torch.Generator`` on the data's device:
the same generator state gives the same augmented batch, which is what makes an
interrupted run resume bit-exactly (on CPU).

Images here are float in [0, 1], (N, C, H, W); C is 1 (grey) or 3 (colour).
"""

from __future__ import annotations

import math

import kornia
import torch

# The FixMatch/USB RandAugment pool. Ranges follow USB's fixmatch_augment_pool.
OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "equalize", "posterize",
       "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
_RANGES = {
    "brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
    "sharpness": (0.05, 0.95), "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0),
    "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0.0, 1.0),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
}
_OP_ID = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
FILL = 0.5  # grey fill for pixels uncovered by geometric ops and for Cutout


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


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


def _affine_matrices(op: torch.Tensor, mag: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image 2x3 pixel-space matrices; identity for images that drew a non-geometric op."""
    b, dev = op.shape[0], op.device
    zero = torch.zeros(b, device=dev)

    def pick(name: str, neutral: torch.Tensor) -> torch.Tensor:
        return torch.where(op == _OP_ID[name], mag, neutral)

    theta = pick("rotate", zero) * (math.pi / 180.0)
    shx, shy = pick("shear_x", zero), pick("shear_y", zero)
    tx, ty = pick("translate_x", zero) * w, pick("translate_y", zero) * h
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Rotation @ shear, about the image centre. Only one of rotation/shear/translation is
    # non-neutral per image in a round, so the order of composition does not matter.
    a, bb = cos - sin * shy, -sin + cos * shx
    c, d = sin + cos * shy, cos + sin * shx
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    return torch.stack([
        torch.stack([a, bb, cx - a * cx - bb * cy + tx], dim=1),
        torch.stack([c, d, cy - c * cx - d * cy + ty], dim=1),
    ], dim=1)


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 1.0 - x, x)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, factor)


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
    "posterize": lambda x, m: _posterize(x, m.round()),
    "sharpness": lambda x, m: kornia.enhance.sharpness(x, m),
    "solarize": _solarize,
}


def _warp(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    m = _affine_matrices(op, mag, h, w)
    fill = torch.full((x.shape[1],), FILL, device=x.device, dtype=x.dtype)
    return kornia.geometry.transform.warp_affine(x, m, (h, w), mode="bilinear",
                                                 padding_mode="fill", fill_value=fill,
                                                 align_corners=True)


def _apply_round(x: torch.Tensor, op: torch.Tensor, u: torch.Tensor,
                 subsets: bool = False) -> torch.Tensor:
    """One RandAugment round: image i gets op[i] with magnitude drawn from u[i] in [0, 1).

    ``subsets=False`` (GPU default) computes each op on the whole batch and keeps it where
    drawn; ``subsets=True`` (CPU default) gathers the images that drew each op, which
    does 1/14 of the arithmetic at the price of a host sync per op. Same result.
    """
    b = x.shape[0]
    mag = torch.zeros_like(u)
    for name, (lo, hi) in _RANGES.items():
        mag = torch.where(op == _OP_ID[name], lo + (hi - lo) * u, mag)
    groups = [(name, op == _OP_ID[name], fn) for name, fn in _PHOTOMETRIC.items()]
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in _GEOMETRIC:
        geometric |= op == _OP_ID[name]
    groups.append(("geometric", geometric, lambda xs, ms, ops: _warp(xs, ops, ms)))
    if subsets:
        x = x.clone()  # written in place below; the caller's tensor stays untouched
    for name, chosen, fn in groups:
        call = (lambda xs, ms, ops, fn=fn: fn(xs, ms, ops)) if name == "geometric" else \
            (lambda xs, ms, ops, fn=fn: fn(xs, ms))
        if subsets:
            i = chosen.nonzero().squeeze(1)
            if i.numel():
                x.index_copy_(0, i, call(x[i], mag[i], op[i]))
        else:
            x = torch.where(chosen.view(b, 1, 1, 1), call(x, mag, op), x)
    return x


def cutout(x: torch.Tensor, gen: torch.Generator, max_frac: float = 0.5) -> torch.Tensor:
    """Grey square per image, side uniform in [0, max_frac * W), centre anywhere (may clip)."""
    b, _, h, w = x.shape
    dev = x.device
    side = torch.rand(b, generator=gen, device=dev) * max_frac * w
    cy = torch.rand(b, generator=gen, device=dev) * h
    cx = torch.rand(b, generator=gen, device=dev) * w
    ys = torch.arange(h, device=dev).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=dev).view(1, 1, w) + 0.5
    half = (side / 2).view(b, 1, 1)
    inside = ((ys - cy.view(b, 1, 1)).abs() < half) & ((xs - cx.view(b, 1, 1)).abs() < half)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, FILL), x)


def strong_augment(x: torch.Tensor, gen: torch.Generator, num_ops: int = 3,
                   cutout_frac: float = 0.5, subsets: bool | None = None) -> torch.Tensor:
    """RandAugment(num_ops) with per-image ops and magnitudes, then Cutout. x: float [0,1].

    ``subsets`` picks the op batching (see _apply_round); None: subsets on CPU only.
    """
    b, dev = x.shape[0], x.device
    subsets = dev.type == "cpu" if subsets is None else subsets
    for _ in range(num_ops):
        op = torch.randint(0, len(OPS), (b,), generator=gen, device=dev)
        u = torch.rand(b, generator=gen, device=dev)
        x = _apply_round(x, op, u, subsets=subsets)
    return cutout(x, gen, cutout_frac) if cutout_frac > 0 else x
