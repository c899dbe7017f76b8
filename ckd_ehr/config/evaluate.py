"""Config of evaluation and the report."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class EvaluateConfig(Section):
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples over patients for 95% intervals (0 = no intervals)."""
    seed: int = 0
    """Seed of the bootstrap (the same resampled patients for every model: paired deltas)."""
    baseline: Literal["hard_plain", "hard_eadf", "distill_plain", "ckd_ehr", "teacher"] = "hard_plain"
    """Model every other is compared against; the paper's baseline is plain BERT (hard_plain)."""
