"""Classifier networks: WRN-28-2 (the USB/FixMatch reference net) and small CNNs for grey data.

Every net takes float images in [0, 1] (N, C, H, W) and normalises them itself with
the per-channel mean/std of the training images, held as buffers, so a saved net is
usable without knowing how its data was normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

# USB's WRN (semilearn/nets/wrn/wrn.py): every BN has momentum 0.001 (PyTorch convention,
# i.e. a very slow running average); the block BNs keep PyTorch's eps 1e-5, the final BN
# before pooling uses eps 1e-3; all activations are leaky ReLU with slope 0.1.
_BN_MOMENTUM = 0.001
_FINAL_BN_EPS = 1e-3
_LEAK = 0.1


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _WideBlock(nn.Module):
    """Pre-activation wide basic block, wired as USB's ``BasicBlock``.

    Three cases, by whether the block changes width and whether it is the net's first one:

    * same width (identity shortcut): ``x + conv2(act(bn2(conv1(act(bn1(x))))))``;
    * width change, ``activate_before_residual`` (only the first block of group 1):
      ``a = act(bn1(x))`` feeds both conv1 and the 1x1 shortcut conv;
    * width change otherwise (first block of groups 2 and 3): conv1 and the shortcut both
      take the *raw* input ``x``; bn1 is unused. USB still evaluates ``act(bn1(x))`` there and
      throws it away, which only moves that BN's running statistics, never read by anything;
      we skip it. bn1 is kept so the parameter count (and weight decay set) equals USB's.

    All convolutions are bias-free (USB's ``bias=False``); only the stem conv has a bias.
    """

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=_BN_MOMENTUM)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(_LEAK, inplace=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return x + self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(x))))))
        if self.activate_before_residual:
            x = self.act(self.bn1(x))
        return self.shortcut(x) + self.conv2(self.act(self.bn2(self.conv1(x))))


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis) as used by FixMatch/USB; 1.47M params for 28-2."""

    def __init__(self, num_classes: int, in_channels: int, mean, std,
                 depth: int = 28, widen: int = 2) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=True)  # USB: bias=True
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                cin = widths[g] if i == 0 else widths[g + 1]
                # USB passes activate_before_residual=True to every block of group 1, but it
                # only matters where the width changes, i.e. in the group's first block.
                blocks.append(_WideBlock(cin, widths[g + 1], stride if i == 0 else 1,
                                         activate_before_residual=(g == 0)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3], momentum=_BN_MOMENTUM, eps=_FINAL_BN_EPS)
        self.act = nn.LeakyReLU(_LEAK)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.blocks(self.stem(self.normalize(x)))))
        return self.fc(x.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """Five 3x3 conv layers (w, w | 2w, 2w | 4w) with BN and two poolings; for 28x28 grey data."""

    def __init__(self, num_classes: int, in_channels: int, mean, std, width: int = 32) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cout, momentum=0.1), nn.LeakyReLU(_LEAK)]

        w = width
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.normalize(x)).mean(dim=(2, 3)))


NETS: dict[str, Callable[..., nn.Module]] = {
    "wrn-28-2": lambda **kw: WideResNet(depth=28, widen=2, **kw),
    "wrn-28-8": lambda **kw: WideResNet(depth=28, widen=8, **kw),
    "cnn-small": lambda width=None, **kw: SmallCNN(width=width or 32, **kw),
    "cnn-tiny": lambda width=None, **kw: SmallCNN(width=width or 8, **kw),  # tests, smoke runs
}
WIDTH_NETS = ("cnn-small", "cnn-tiny")  # the nets whose width ``net_width`` sets


def resolve_net_name(name: str, image_shape: tuple[int, int, int]) -> str:
    """"auto" picks WRN-28-2 for colour images and cnn-small for grey ones."""
    if name == "auto":
        return "wrn-28-2" if image_shape[-1] == 3 else "cnn-small"
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; choose 'auto' or one of {', '.join(NETS)}")
    return name


def build_net(name: str, num_classes: int, image_shape: tuple[int, int, int],
              mean: Sequence[float], std: Sequence[float], seed: int,
              width: int | None = None) -> nn.Module:
    """Build a net with weights drawn from ``seed`` alone, so every arm starts identical.

    ``width`` (``SSLConfig.net_width``) sets the base width of the cnn nets."""
    name = resolve_net_name(name, image_shape)
    kw = {}
    if width is not None:
        if name not in WIDTH_NETS:
            raise ValueError(f"net_width={width} applies to {', '.join(WIDTH_NETS)} only, not "
                             f"{name!r}; leave ssl.net_width unset (null) for it")
        kw["width"] = width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETS[name](num_classes=num_classes, in_channels=image_shape[-1],
                          mean=list(mean), std=list(std), **kw)
