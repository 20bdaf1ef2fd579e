"""PretrainConfig: the base model's architecture and training schedule, declared once.

Light on purpose (no torch): ``pipeline.config_sections`` composes it as the ``pretrain:``
section, and ``augment pretrain --set`` validates through it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from anl_core.config import STRICT, Seed

# Step counts above this are a typo, not a schedule (the shipped bases trained 3000-20000).
MAX_PRETRAIN_STEPS = 2**24


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

    model_config = STRICT

    sample_size: int = Field(32, ge=8)
    # strict=False on lists: a tuple from Python code is a list (their items stay strict).
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1,
                                          strict=False)
    # Indices into block_out_channels (8x8 here).
    attention_levels: list[int] = Field(default_factory=lambda: [2], strict=False)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    num_train_timesteps: int = Field(1000, ge=2, le=100_000)
    beta_schedule: str = "linear"
    steps: int = Field(3000, ge=1, le=MAX_PRETRAIN_STEPS)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(4e-4, gt=0)
    warmup_steps: int = Field(200, ge=0, le=MAX_PRETRAIN_STEPS)
    weight_decay: float = Field(0.0, ge=0)
    ema_max_decay: float = Field(0.9995, ge=0, le=1)
    hflip: bool = True
    seed: Seed = 0
    checkpoint_every: int = Field(250, ge=1, le=MAX_PRETRAIN_STEPS)
    sample_steps: int = Field(50, ge=1, le=1000)  # DDIM steps for the final sample grid
    # Wall-clock budget (seconds of training, resumed runs included): training stops at the
    # first step past it and exports what it has; training.json records the steps done.
    # For leased GPU time. None: train all ``steps``.
    time_limit_s: float | None = Field(None, ge=0)
    device: str = "auto"
    # Kept for saved configs that carry it; nothing reads a key in it, so one is refused
    # rather than silently ignored.
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("extra")
    @classmethod
    def _no_unread_keys(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if extra:
            raise ValueError(f"nothing reads {', '.join(map(repr, extra))}; remove it")
        return extra

    @model_validator(mode="after")
    def _buildable(self) -> PretrainConfig:
        check_unet_shape(self.block_out_channels, self.attention_levels, self.attention_head_dim)
        return self

    def to_dict(self) -> dict:
        return self.model_dump()
