"""Config of evaluation and the report."""
from __future__ import annotations

from pydantic import Field

from .base import Section


class EvaluateConfig(Section):
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples over patients for 95% intervals (0 = no intervals)."""
    seed: int = 0
    """Seed of the bootstrap."""
