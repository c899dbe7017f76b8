"""Config of soft-label batch inference on Ray Data."""
from __future__ import annotations

from pydantic import Field

from .base import Section


class SoftLabelsConfig(Section):
    batch_size: int = Field(16, ge=1)
    """Rows per map_batches call; rows inside a batch are sorted by length before padding."""
    num_actors: int = Field(1, ge=1)
    """Actors in the pool, each holding one copy of the teacher."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs per actor; fractional so that pools do not starve on small machines."""
    gpus_per_actor: float = Field(0.0, ge=0)
    """GPUs per actor (1 on GPU clusters; then bf16)."""
    max_length: int | None = Field(None, ge=16)
    """Token limit at inference; None = the teacher's training max_length."""
