"""Transfer settings: one validated config, its hash and its run directory.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anl_core.config import MAX_TUNE_STEPS, STRICT, Seed
from pipeline.config import apply_overrides, parse_overrides
from pipeline.digest import digest
from pipeline.validation import explain

BUILTIN_TARGETS = ("mnist-foolbox", "sklearn-digits")


DIGITS = tuple(str(d) for d in range(10))


RUNTIME_FIELDS = frozenset({"runs_dir", "progress", "device"})  # where and how, not what


NEAR_COPY_PERCENTILE = 5.0


SAMPLE_BATCH = 64  # images per sampling batch; every image has its own seed, so no effect


Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


class TransferError(ValueError):
    """A transfer run's input is unusable; the message names the parameter and the fix."""


class TransferConfig(BaseModel):
    """Everything one transfer run depends on; validated strictly (unknown keys are errors)."""

    # The run config's strictness (no bool-as-int, no inf or nan), frozen: one run's identity.
    model_config = ConfigDict(**{**STRICT, "frozen": True, "validate_assignment": False})

    base_model: str = "data/models/fashion-mnist-ddpm-32"
    # A folder of images, a built-in target (BUILTIN_TARGETS) or a registered dataset name.
    target: str = "mnist-foolbox"
    target_class: str | None = None  # a class name or index; None: every image of the target
    target_root: str | None = None  # root= of a registered dataset
    shots: int = Field(10, ge=1)
    max_held_out: int = Field(500, ge=2)  # held-out images evaluated against (KID cost)
    seed: Seed = 0
    encoder: str = "efficientnet-lite0@64"
    mode: Literal["anl", "full", "scratch"] = "anl"
    steps: int = Field(300, ge=0, le=MAX_TUNE_STEPS)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    hflip: bool = False  # off: digits and text are not mirror-symmetric
    context_dim: int = Field(128, ge=1)  # anl: projected token width
    head_dim: int = Field(32, ge=1)  # anl: attention head width
    cond_dropout: Ratio = 0.1  # anl: share of steps that train the null condition
    train_mask_ratio: Ratio = 0.3  # anl: tokens masked per step, up to this share
    samples: int = Field(100, ge=1)
    mask_ratio: Ratio = 0.3  # anl: tokens replaced by the null token per sample
    guidance: float = Field(2.0, ge=0)
    num_inference_steps: int = Field(25, ge=1, le=1000)
    unconditional: bool = False  # anl: sample through the null token only
    kid_subsets: int = Field(20, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runs_dir: str = "runs/transfer"
    progress: bool = True

    def resolved_device(self) -> str:
        """The device steps run on (``auto``: CUDA when visible)."""
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    @field_validator("target_class", mode="before")
    @classmethod
    def _class_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # --class 3 and --class '3' are one class


def transfer_config(values: dict[str, Any] | None = None,
                    overrides: list[str] | dict[str, Any] | None = None) -> TransferConfig:
    """A validated config from ``values`` plus ``key=value`` overrides (values are YAML)."""
    data = apply_overrides(dict(values or {}), parse_overrides(overrides))
    try:
        return TransferConfig.model_validate(data)
    except ValidationError as e:
        raise TransferError(explain(e, "transfer configuration", TransferConfig.model_fields)) from None


def transfer_hash(config: TransferConfig) -> str:
    """Hash of every field that changes the result; the run directory is named by it."""
    return digest(config.model_dump(mode="json", exclude=set(RUNTIME_FIELDS)))
