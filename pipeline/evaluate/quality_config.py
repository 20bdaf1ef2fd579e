"""QualityConfig: how synthetic data is measured against real data, declared once (no torch).

``pipeline.config_sections`` extends it as the ``quality:`` section (adding the off switch).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    reference: dict[str, Any] = Field(default_factory=dict)  # pipeline.evaluate.reference.ReferenceConfig
    max_real_per_class: int = Field(1000, ge=1)
    max_synthetic_per_class: int = Field(2000, ge=1)
    grid_per_class: int = Field(8, ge=1)
    kid_subsets: int = Field(20, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    seed: int = 0

    def to_dict(self) -> dict:
        return self.model_dump()
