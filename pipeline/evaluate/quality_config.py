"""QualityConfig: how synthetic data is measured against real data, declared once (no torch).

``pipeline.config_sections`` extends it as the ``quality:`` section (adding the off switch).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_serializer

from anl_core.config import STRICT, Seed


class ReferenceSettings(BaseModel):
    """The fields of ``pipeline.evaluate.reference.ReferenceConfig`` (a dataclass beside the
    torch code that trains it) with their bounds: ``quality.reference`` is checked against
    them when the config is read, not when the reference classifier is trained at the end
    of a run. A test keeps the two field lists equal."""

    model_config = STRICT

    width: int = Field(16, ge=1)
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    seed: Seed = 0
    max_train: int | None = Field(None, ge=1)
    size: int = Field(32, ge=8)

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> dict[str, Any]:
        # Only the keys a preset gave: the rest are ReferenceConfig's own defaults, and
        # leaving them out keeps every config hash made before this model existed.
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class QualityConfig(BaseModel):
    model_config = STRICT

    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    max_real_per_class: int = Field(1000, ge=1)
    max_synthetic_per_class: int = Field(2000, ge=1)
    grid_per_class: int = Field(8, ge=1)
    kid_subsets: int = Field(20, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    seed: Seed = 0

    def to_dict(self) -> dict:
        return self.model_dump()
