"""Plain helpers (no fixtures) that test modules and fixture modules import."""

from __future__ import annotations

import contextlib

import torch


def anl_make_unet(seed: int = 0, sample_size: int = 8, channels: int = 1):
    """A tiny UNet2DModel with one attention level, the shape of the project's base models."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
    ).eval()


@contextlib.contextmanager
def anl_one_thread():
    """Tiny models are op-overhead bound: one thread is several times faster on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class FixedLogits(torch.nn.Module):
    """A 'model' that returns preset logits for the concatenated (lb, ulb_w, ulb_s) batch."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.out = logits

    def forward(self, x):
        assert x.shape[0] == self.out.shape[0]
        return self.out
