"""The ANL ("Attention-NonLinear") block: cross-attention to condition tokens, then a GEGLU MLP.

Both parts are residual and end in a zero-initialised linear layer, so a fresh block returns
its input unchanged (bit for bit): inserting it into a pretrained U-Net does not change what
the U-Net computes until tuning moves the output projections away from zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _group_count(channels: int, preferred: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``preferred`` (GroupNorm needs a divisor)."""
    return math.gcd(channels, preferred)


class GEGLU(nn.Module):
    """Gated GELU feed-forward (as in Stable Diffusion's transformer blocks); output zero-initialised."""

    def __init__(self, channels: int, mult: int = 2):
        super().__init__()
        inner = channels * mult
        self.proj_in = nn.Linear(channels, inner * 2)
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class ANLBlock(nn.Module):
    """Adapter block for a feature map (B, C, H, W) and a context of projected tokens (B, N, Dc).

    ``context_dim`` is the width of the (already projected) condition tokens; each block owns its
    key/value projections from that width to its own attention width.
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int = 32, ff_mult: int = 2):
        super().__init__()
        if channels % head_dim and channels >= head_dim:
            raise ValueError(f"ANL block width {channels} is not a multiple of head_dim={head_dim}; "
                             "pick a head_dim that divides every U-Net block width")
        self.channels = channels
        self.num_heads = max(1, channels // head_dim)
        self.norm_attn = nn.GroupNorm(_group_count(channels), channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = GEGLU(channels, ff_mult)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if context.shape[0] != b:
            raise ValueError(f"ANL block got {b} feature maps but {context.shape[0]} contexts")
        # GroupNorm on the map (as the U-Net's own attention does), then flatten to (B, HW, C).
        q_in = self.norm_attn(x).flatten(2).transpose(1, 2)
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, C/heads)

        q = split(self.to_q(q_in))
        k, v = split(self.to_k(context)), split(self.to_v(context))
        attn = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        tokens = x.flatten(2).transpose(1, 2)  # residual stream (B, HW, C)
        tokens = tokens + self.to_out(attn.transpose(1, 2).flatten(2))
        tokens = tokens + self.ff(self.norm_ff(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)
