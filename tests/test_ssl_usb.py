"""FixMatch as USB (microsoft/Semi-supervised-learning, "semilearn") defines it.

Pins the three places where our FixMatch once differed from USB: the WRN block wiring
(semilearn/nets/wrn/wrn.py), the RandAugment ops, ranges and Cutout
(semilearn/datasets/augmentation/randaugment.py, which calls PIL), and FixMatch's soft
pseudo-labels (semilearn/algorithms/fixmatch/fixmatch.py + hooks/pseudo_label.py).
Expectations are hand-computed on tiny tensors; where USB's behaviour is PIL's, the same
call is also made on PIL, which is what USB runs. CPU, well under a second each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch_helpers import FixedLogits, anl_one_thread

from pipeline.ssl import SSLConfig, build_net
from pipeline.ssl import randaugment as aug
from pipeline.ssl.algorithms.base import Batch
from pipeline.ssl.algorithms.fixmatch import FixMatch
from pipeline.ssl.nets import _WideBlock


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with anl_one_thread():
        yield


# --------------------------------------------------------------------------- WRN-28-2


def _wrn(num_classes: int = 10):
    return build_net("wrn-28-2", num_classes, (32, 32, 3), [0.5] * 3, [0.25] * 3, seed=0)


def test_wrn_28_2_layers_and_parameter_count_match_usb():
    net = _wrn()
    # USB's WRN-28-2 for 10 classes, counted from its layer list: stem conv 3->16 3x3 with
    # bias; 3 groups of 4 BasicBlocks (BN(in), conv3x3 in->out, BN(out), conv3x3 out->out,
    # 1x1 shortcut conv where in != out; every block conv bias-free); final BN(128); fc.
    def bn(c):
        return 2 * c

    def block(cin, cout):
        return bn(cin) + 9 * cin * cout + bn(cout) + 9 * cout * cout + (cin * cout if cin != cout else 0)

    widths = [16, 32, 64, 128]
    expected = 3 * 16 * 9 + 16 + bn(128) + 128 * 10 + 10
    for g in range(3):
        expected += block(widths[g], widths[g + 1]) + 3 * block(widths[g + 1], widths[g + 1])
    assert expected == 1_467_626
    assert sum(p.numel() for p in net.parameters()) == expected

    assert net.stem.bias is not None  # USB's conv1: bias=True
    convs = [m for m in net.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12 * 2 + 3 and all(c.bias is None for c in convs)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(b.momentum == 0.001 for b in bns)
    assert all(b.eps == 1e-5 for b in bns if b is not net.bn)  # block BNs: PyTorch default
    assert net.bn.eps == 1e-3  # USB's final bn1: eps=0.001
    assert all(m.negative_slope == 0.1 for m in net.modules() if isinstance(m, torch.nn.LeakyReLU))
    # activate_before_residual: group 1 only (USB passes it to block1 alone).
    first = [net.blocks[0], net.blocks[4], net.blocks[8]]
    assert [b.activate_before_residual for b in first] == [True, False, False]
    assert all(b.shortcut is not None for b in first)
    assert all(net.blocks[i].shortcut is None for i in range(12) if i % 4)


def _inputs_seen(block: _WideBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [block.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv1", a[0]))]
    if block.shortcut is not None:
        hooks.append(block.shortcut.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("shortcut", a[0])))
    seen["out"] = block(x)
    for h in hooks:
        h.remove()
    return seen


def test_wrn_block_wiring_matches_usb():
    """Which tensor reaches conv1 and the shortcut, per block kind (hooks, eval-mode BN)."""
    net = _wrn().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for blk in net.modules():  # non-trivial BN statistics, so act(bn1(x)) != x
            if isinstance(blk, torch.nn.BatchNorm2d):
                blk.running_mean.uniform_(-0.5, 0.5)
                blk.running_var.uniform_(0.5, 2.0)
                blk.weight.uniform_(0.5, 1.5)
                blk.bias.uniform_(-0.5, 0.5)

        def pre(blk, x):
            return F.leaky_relu(blk.bn1(x), 0.1)

        # Group 1, first block (16 -> 32, activate_before_residual): both take act(bn1(x)).
        x = torch.randn(2, 16, 8, 8)
        b = net.blocks[0]
        s = _inputs_seen(b, x)
        assert torch.equal(s["conv1"], pre(b, x)) and torch.equal(s["shortcut"], pre(b, x))
        # Groups 2 and 3, first block (32 -> 64, 64 -> 128): both take the raw x.
        for i, cin in ((4, 32), (8, 64)):
            b = net.blocks[i]
            x = torch.randn(2, cin, 8, 8)
            s = _inputs_seen(b, x)
            assert s["conv1"] is x and s["shortcut"] is x, i
            assert not torch.equal(pre(b, x), x)
            body = b.conv2(F.leaky_relu(b.bn2(b.conv1(x)), 0.1))
            torch.testing.assert_close(s["out"], b.shortcut(x) + body, rtol=0, atol=0)
        # Same width (identity shortcut): conv1 takes act(bn1(x)); the residual is raw x.
        b = net.blocks[5]
        x = torch.randn(2, 64, 8, 8)
        s = _inputs_seen(b, x)
        assert torch.equal(s["conv1"], pre(b, x))
        body = b.conv2(F.leaky_relu(b.bn2(b.conv1(pre(b, x))), 0.1))
        torch.testing.assert_close(s["out"], x + body, rtol=0, atol=0)
        # Final BN uses eps 1e-3 in the head: act(bn(.)) -> global mean -> fc.
        feats = torch.randn(2, 3, 32, 32)
        h = net.blocks(net.stem(net.normalize(feats)))
        head = F.leaky_relu(F.batch_norm(h, net.bn.running_mean, net.bn.running_var,
                                         net.bn.weight, net.bn.bias, eps=1e-3), 0.1)
        torch.testing.assert_close(net(feats), net.fc(head.mean(dim=(2, 3))))


# --------------------------------------------------------------------------- RandAugment


def test_op_pool_and_ranges_are_usbs():
    # USB augment_list(): op, min, max. Magnitude v = min + (max - min) * U[0, 1).
    usb = {"autocontrast": None, "brightness": (0.05, 0.95), "color": (0.05, 0.95),
           "contrast": (0.05, 0.95), "equalize": None, "identity": None, "posterize": (4, 8),
           "rotate": (-30, 30), "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3),
           "shear_y": (-0.3, 0.3), "solarize": (0, 256), "translate_x": (-0.3, 0.3),
           "translate_y": (-0.3, 0.3)}
    assert sorted(aug.OPS) == sorted(usb) and len(aug.OPS) == 14
    assert aug._RANGES == {k: v for k, v in usb.items() if v is not None}
    assert aug.FILL == 0.0
    assert aug.CUTOUT_FILL_RGB == (125, 123, 114)


def _one(name: str, mag: float, x: torch.Tensor) -> torch.Tensor:
    """Op `name` with magnitude `mag` (in the op's own units) on every image of x."""
    b = x.shape[0]
    op = torch.full((b,), aug._OP_ID[name])
    m = torch.full((b,), float(mag))
    if name in aug._GEOMETRIC:
        return aug._warp(x, op, m)
    return aug._PHOTOMETRIC[name](x, m)


def _grid(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 4, 4) / 255.0


IMG = _grid(np.arange(1, 17) * 10)  # 4x4 grey, pixel k (row-major) = 10 * (k + 1)


def test_rotate_is_pil_nearest_counter_clockwise_black_fill():
    # 45 degrees counter-clockwise about the centre (2, 2). Output pixel centre (X, Y)
    # relative to the centre reads input point (k(X-Y) + 2, k(X+Y) + 2), k = cos 45: the
    # four corners map outside (distance 2.12 > 2): black, not grey; every other pixel is
    # an input value (nearest, no blending).
    exp = _grid([[0, 30, 80, 0],
                 [20, 70, 110, 120],
                 [50, 100, 110, 150],
                 [0, 90, 140, 0]])
    assert torch.equal(_one("rotate", 45.0, IMG), exp)
    # 90 degrees of a square image is a lossless counter-clockwise rotation (no fill).
    assert torch.equal(_one("rotate", 90.0, IMG), torch.rot90(IMG, 1, dims=(2, 3)))
    assert torch.equal(_one("rotate", 0.0, IMG), IMG)
    # Colour: uncovered pixels are 0 in every channel.
    rgb = torch.ones(1, 3, 4, 4)
    out = _one("rotate", 45.0, rgb)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0] and out[0, :, 1, 1].tolist() == [1.0] * 3


def test_shear_and_translate_are_pil_affine_nearest_black_fill():
    # ShearX v: output (x, y) reads input x + 0.5 + v (y + 0.5), floored. v = 0.3: rows 0-1
    # read offsets 0.65, 0.95 (unchanged); rows 2-3 read 1.25, 1.55: one pixel left, the
    # last column uncovered (black).
    exp = _grid([[10, 20, 30, 40],
                 [50, 60, 70, 80],
                 [100, 110, 120, 0],
                 [140, 150, 160, 0]])
    assert torch.equal(_one("shear_x", 0.3, IMG), exp)
    # ShearY is ShearX with rows and columns swapped.
    sy = _one("shear_y", 0.3, IMG.transpose(2, 3).contiguous())
    assert torch.equal(sy, exp.transpose(2, 3))
    # TranslateX v: offset floor(v * w + 0.5): 0.3 * 4 -> 1 (content moves left), -0.3 -> -1.
    left = _grid([[20, 30, 40, 0], [60, 70, 80, 0], [100, 110, 120, 0], [140, 150, 160, 0]])
    right = _grid([[0, 10, 20, 30], [0, 50, 60, 70], [0, 90, 100, 110], [0, 130, 140, 150]])
    assert torch.equal(_one("translate_x", 0.3, IMG), left)
    assert torch.equal(_one("translate_x", -0.3, IMG), right)
    up = _grid([[50, 60, 70, 80], [90, 100, 110, 120], [130, 140, 150, 160], [0, 0, 0, 0]])
    assert torch.equal(_one("translate_y", 0.3, IMG), up)
    assert torch.equal(_one("translate_x", 0.1, IMG), IMG)  # floor(0.4 + 0.5) = 0


def test_posterize_bits_are_4_to_7_never_8():
    # 183 = 0b10110111: 4 bits -> 176, 5 -> 176, 6 -> 180, 7 -> 182; 8 bits would keep 183.
    x = torch.full((1, 1, 2, 2), 183 / 255.0)
    for bits, want in ((4.0, 176), (5.0, 176), (6.0, 180), (7.0, 182)):
        assert torch.equal(_one("posterize", bits + 0.99, x), torch.full_like(x, want / 255.0))
    # Through the sampler: u in [0, 1) maps to bits int(4 + 4u) in {4, ..., 7}.
    u = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.75, 0.9999999])
    x = torch.ones(6, 1, 4, 4)  # 4x4: the dense round also runs sharpness (3x3 kernel)
    y = aug._apply_round(x, torch.full((6,), aug._OP_ID["posterize"]), u)
    assert ((y[:, 0, 0, 0] * 255).round().tolist() == [240, 240, 248, 252, 254, 254])


def test_solarize_threshold_on_8bit_scale():
    x = _grid([[0, 99, 100, 101], [127, 128, 200, 254], [255, 255, 255, 255], [1, 2, 3, 4]])
    # PIL: values >= threshold inverted.
    y = _one("solarize", 100.0, x)
    assert ((y * 255).round().view(-1)[:8].tolist() == [0, 99, 155, 154, 128, 127, 55, 1])
    assert torch.equal(_one("solarize", 255.5, x), x)  # USB's range reaches up to 256
    assert torch.equal(_one("solarize", 0.0, x), 1.0 - x)
    # Sampler: u = 0.5 -> threshold 128.
    y = aug._apply_round(x, torch.full((1,), aug._OP_ID["solarize"]), torch.tensor([0.5]))
    assert ((y * 255).round().view(-1)[4:6].tolist() == [127, 127])


def test_contrast_degenerate_is_rounded_grey_mean():
    # Grey mean 0.75 -> PIL int(0.75 + 0.5) = 1; factor 0 gives the flat degenerate image.
    x = torch.tensor([0.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2) / 255.0
    assert torch.equal(aug._contrast(x, torch.zeros(1)), torch.full_like(x, 1 / 255.0))


def _pil_ops():
    return {
        "rotate": lambda im, v: im.rotate(v),
        "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE,
                                                  (1, 0, v * im.size[0], 0, 1, 0)),
        "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE,
                                                  (1, 0, 0, 0, 1, v * im.size[1])),
        "posterize": lambda im, v: ImageOps.posterize(im, int(v)),
        "solarize": lambda im, v: ImageOps.solarize(im, v),
        "equalize": lambda im, v: ImageOps.equalize(im),
        "autocontrast": lambda im, v: ImageOps.autocontrast(im),
        "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
        "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
        "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
        "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    }


@pytest.mark.parametrize("size", [32, 13])
def test_ops_match_pil_as_usb_calls_it(size):
    """Each op against the PIL call USB makes, over USB's magnitude range. Geometric ops,
    posterize, solarize and equalize are exact; the ImageEnhance blends and autocontrast
    are within 1.5 levels of 255 (PIL rounds intermediate images to uint8, we do not)."""
    rng = np.random.default_rng(size)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[..., 1] = arr[..., 1] // 2 + 40  # a channel without full range, for autocontrast
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
    exact = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y", "posterize",
             "solarize", "equalize"}
    for name, pil in _pil_ops().items():
        lo, hi = aug._RANGES.get(name, (0.0, 1.0))
        mags = np.float32(lo + (hi - lo) * rng.random(12))  # float32, as our sampler's
        for v in mags:
            ref = np.asarray(pil(Image.fromarray(arr), float(v))).astype(np.float64)
            ours = _one(name, float(v), x)[0].permute(1, 2, 0).double().numpy() * 255.0
            if name in exact:
                assert np.array_equal(np.round(ours), ref), (name, v)
            else:
                assert np.abs(ours - ref).max() < 1.5, (name, v)


def test_cutout_is_usbs_square_and_colour(monkeypatch):
    # Hand case, 8x8, every uniform draw 0.5: v = 0.5 * 0.5 * 8 = 2; the point is
    # 8 + (1 - 8) * 0.5 = 4.5 on both axes (numpy's uniform(8), i.e. low=8, high=1), so the
    # corner is int(4.5 - 1) = 3 and the far end int(min(8, 3 + 2)) = 5: rows/cols 3..5
    # (PIL's rectangle includes both ends), a 3x3 square of (125, 123, 114).
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", lambda n, **kw: torch.full((n,), 0.5))
        y = aug.cutout(torch.zeros(1, 3, 8, 8), torch.Generator())
    filled = (y != 0).any(dim=1)[0]
    assert filled.nonzero().min(0).values.tolist() == [3, 3]
    assert filled.nonzero().max(0).values.tolist() == [5, 5] and int(filled.sum()) == 9
    assert (y[0, :, 4, 4] * 255).round().tolist() == [125, 123, 114]

    # Random cases against USB's recipe drawn with PIL, from the same uniforms.
    for size in (32, 9):
        arr = np.full((size, size, 3), 7, np.uint8)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0
        for seed in range(60):
            g = torch.Generator().manual_seed(seed)
            u = [float(torch.rand(1, generator=g)) for _ in range(3)]
            ours = aug.cutout(x, torch.Generator().manual_seed(seed))
            v = u[0] * 0.5 * size
            img = Image.fromarray(arr)
            if v > 0:
                x0 = int(max(0, size + (1 - size) * u[1] - v / 2.0))
                y0 = int(max(0, size + (1 - size) * u[2] - v / 2.0))
                ImageDraw.Draw(img).rectangle((x0, y0, min(size, x0 + v), min(size, y0 + v)),
                                              (125, 123, 114))
            got = (ours[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            assert np.array_equal(got, np.asarray(img)), (size, seed)
    grey = aug.cutout(torch.zeros(4, 1, 8, 8), torch.Generator().manual_seed(0))
    assert set((grey * 255).round().unique().tolist()) <= {0.0, 123.0}


def test_strong_augment_still_seeded_and_batched():
    x = torch.rand(32, 3, 16, 16)
    a = aug.strong_augment(x, torch.Generator().manual_seed(3))
    b = aug.strong_augment(x, torch.Generator().manual_seed(3), grouped=False)
    assert torch.equal(a, b)  # integer pixel maps: dense and per-op batching agree exactly
    assert a.min() >= 0 and a.max() <= 1


# --------------------------------------------------------------------------- FixMatch


def _fixmatch_step(hard: bool):
    ln = math.log
    lb = torch.tensor([[0.0, 0.0, 0.0]])
    # Weak view: row 0 probs (0.8, 0.1, 0.1), confident at tau 0.7; row 1 uniform, masked.
    w = torch.tensor([[ln(8), 0.0, 0.0], [0.0, 0.0, 0.0]])
    # Strong view: row 0 probs (1/4, 1/2, 1/4); row 1 anything (masked out).
    s = torch.tensor([[0.0, ln(2), 0.0], [5.0, -1.0, 2.0]])
    algo = FixMatch(SSLConfig(hard_labels=hard, T=0.5, tau=0.7, lambda_u=1.0), num_classes=3)
    batch = Batch(x_lb=torch.zeros(1, 3, 4, 4), y_lb=torch.tensor([0]), w_lb=torch.ones(1),
                  x_ulb_w=torch.zeros(2, 3, 4, 4), x_ulb_s=torch.zeros(2, 3, 4, 4))
    targets, mask = algo.pseudo_labels(w, batch)
    out = algo.train_step(FixedLogits(torch.cat([lb, w, s])), batch)
    return targets, mask, out


def test_fixmatch_soft_pseudo_labels_ignore_temperature():
    targets, mask, out = _fixmatch_step(hard=False)
    # USB: targets are softmax(logits_w), T unused (softmax(logits_w / 0.5) would give
    # (64, 1, 1) / 66 for row 0).
    torch.testing.assert_close(targets, torch.tensor([[0.8, 0.1, 0.1], [1 / 3] * 3]))
    assert mask.tolist() == [1.0, 0.0]
    # Row 0 CE = -(0.8 ln 1/4 + 0.1 ln 1/2 + 0.1 ln 1/4) = 1.9 ln 2; row 1 masked; mean of 2.
    unsup = out.terms["unsup_loss"].item()
    assert unsup == pytest.approx(1.9 * math.log(2) / 2, rel=1e-6)
    assert unsup != pytest.approx((131 / 66) * math.log(2) / 2, rel=1e-3)  # the T=0.5 value
    assert out.terms["sup_loss"].item() == pytest.approx(math.log(3), rel=1e-6)
    assert out.terms["mask_ratio"].item() == 0.5


def test_fixmatch_hard_pseudo_labels():
    targets, mask, out = _fixmatch_step(hard=True)
    assert targets.tolist() == [0, 0] and mask.tolist() == [1.0, 0.0]
    # Row 0: CE of class 0 under (1/4, 1/2, 1/4) = ln 4; mean over 2 rows.
    assert out.terms["unsup_loss"].item() == pytest.approx(math.log(4) / 2, rel=1e-6)
