"""PretrainConfig: the base model's architecture and training schedule, declared once.

Light on purpose (no torch): ``pipeline.config_sections`` composes it as the ``pretrain:``
section, and ``augment pretrain --set`` validates through it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def check_unet_shape(block_out_channels, attention_levels, attention_head_dim: int) -> None:
    """Raise ValueError for a U-Net diffusers cannot build: an attention level out of range,
    or attention (at a listed level or in the mid block, which always has it) over fewer
    channels than one head needs (diffusers divides by zero)."""
    n = len(block_out_channels)
    bad = [i for i in attention_levels if not 0 <= i < n]
    if bad:
        raise ValueError(f"attention_levels {bad} are not levels of block_out_channels "
                         f"(0..{n - 1})")
    narrow = sorted({block_out_channels[i] for i in (*attention_levels, n - 1)
                     if block_out_channels[i] < attention_head_dim})
    if narrow:
        raise ValueError(f"attention over {narrow} channels with attention_head_dim="
                         f"{attention_head_dim} gives no head (the mid block always has "
                         f"attention); lower attention_head_dim to at most {min(narrow)} or "
                         "widen those levels")


class PretrainConfig(BaseModel):
    """Architecture and schedule of the base model. Defaults: the shipped Fashion-MNIST model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    sample_size: int = Field(32, ge=8)
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1)
    # Indices into block_out_channels (8x8 here).
    attention_levels: list[int] = Field(default_factory=lambda: [2])
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: str = "linear"
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(4e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_max_decay: float = Field(0.9995, ge=0, le=1)
    hflip: bool = True
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    sample_steps: int = Field(50, ge=1)  # DDIM steps for the final sample grid
    # Wall-clock budget (seconds of training, resumed runs included): training stops at the
    # first step past it and exports what it has; training.json records the steps done.
    # For leased GPU time. None: train all ``steps``.
    time_limit_s: float | None = Field(None, ge=0)
    device: str = "auto"
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> PretrainConfig:
        check_unet_shape(self.block_out_channels, self.attention_levels, self.attention_head_dim)
        return self

    def to_dict(self) -> dict:
        return self.model_dump()
