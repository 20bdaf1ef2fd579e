"""The method's settings as validated models, declared once (pydantic, no torch).

``pipeline.config`` composes them into a run's config (``tuning:``), so a preset is checked
by the same bounds ``tune_adapter`` relies on.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TuneConfig(BaseModel):
    """Adapter tuning (``anl_core.tuning.tune_adapter``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(1000, ge=0)  # 0: the zero-initialised adapter, i.e. the base model
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)  # with the usual (1 + n) / (10 + n) warm-up
    use_ema: bool = True  # load the EMA weights into the model when tuning ends
    cond_dropout: float = Field(0.1, ge=0, le=1)  # probability a sample trains the null condition
    train_mask_ratio: float = Field(0.0, ge=0, le=1)  # masks a uniform [0, this] share of tokens
    hflip: bool = True
    seed: int = 0
    log_every: int = Field(1, ge=1)  # loss_history keeps every n-th step's loss
