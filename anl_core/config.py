"""The method's settings as validated models, declared once (pydantic, no torch).

``pipeline.config`` composes them into a run's config (``tuning:``, ``adapter:``), so a preset is checked
by the same bounds ``tune_adapter`` and ``attach_anl`` rely on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Every settings model of the method and the pipeline validates this way (pipeline.config
# composes them): an unknown key fails naming it; strict types, so ``true`` is not read as
# the step count 1 nor ``"8"`` as 8 (an int is still a valid float); and no inf or nan, which
# would pass every ``ge`` bound and surface hours later as a NaN loss or a hung loop.
STRICT = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

# Seeds: numpy's generators take 0 <= seed < 2**32, so a negative seed fails only mid-run.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# Step counts are bounded so that a typo (an extra zero or three) fails here, naming the
# maximum, rather than planning a run that never ends.
MAX_TUNE_STEPS = 10**6


class TuneConfig(BaseModel):
    """Adapter tuning (``anl_core.tuning.tune_adapter``)."""

    model_config = STRICT

    # 0: the zero-initialised adapter, i.e. the base model
    steps: int = Field(1000, ge=0, le=MAX_TUNE_STEPS)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(50, ge=0, le=MAX_TUNE_STEPS)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)  # with the usual (1 + n) / (10 + n) warm-up
    use_ema: bool = True  # load the EMA weights into the model when tuning ends
    cond_dropout: float = Field(0.1, ge=0, le=1)  # probability a sample trains the null condition
    train_mask_ratio: float = Field(0.0, ge=0, le=1)  # masks a uniform [0, this] share of tokens
    hflip: bool = True
    seed: Seed = 0
    log_every: int = Field(1, ge=1)  # loss_history keeps every n-th step's loss


class AdapterShape(BaseModel):
    """Where ANL blocks go and how big they are: what a user chooses.

    ``placement``: ``{"down": [i, ...] | "all", "mid": bool, "up": [i, ...] | "all"}`` by block
    index in ``unet.down_blocks`` / ``unet.up_blocks``; ``context_dim`` the shared projected
    width of the condition tokens.
    """

    model_config = STRICT

    placement: dict[Literal["down", "mid", "up"], bool | Literal["all"] | list[int]] = Field(
        default_factory=lambda: {"down": "all", "mid": True, "up": "all"})
    context_dim: int = Field(256, ge=1)
    head_dim: int = Field(32, ge=1)
    ff_mult: int = Field(2, ge=1)
    positional: bool = True  # learned per-position embedding of the condition tokens


class ANLConfig(AdapterShape):
    """Everything needed to rebuild an adapter: its shape, and what it fits (the encoder's
    token shape and id; the base's id or path, fingerprint and block widths, filled on
    attach); saved as ``adapter_config.json`` next to ``adapter_model.safetensors``."""

    token_dim: int = Field(ge=1)
    num_tokens: int = Field(ge=1)
    encoder_id: str = ""
    base_model: str = ""  # hub id or path, for people; the fingerprint is what loading checks
    base_fingerprint: str = ""
    block_channels: dict[str, int] = Field(default_factory=dict)  # filled on attach

    @classmethod
    def for_encoder(cls, encoder: Any, **overrides: Any) -> ANLConfig:
        """Config sized for a ``ConditionEncoder`` (its token shape and id)."""
        return cls(token_dim=encoder.token_dim, num_tokens=encoder.num_tokens,
                   encoder_id=encoder.encoder_id, **overrides)

    def to_json(self) -> str:
        import json

        return json.dumps(self.model_dump(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ANLConfig:
        import json

        data = json.loads(text)
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown ANLConfig fields {sorted(unknown)}; was the adapter saved "
                             "by a newer anl_core?")
        try:
            return cls(**data)
        except ValidationError as e:
            raise ValueError(f"adapter_config.json is not a valid ANLConfig: {e}") from None
