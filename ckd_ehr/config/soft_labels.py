"""Config of soft-label batch inference on Ray Data."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class SoftLabelsConfig(Section):
    batch_size: int = Field(64, ge=1)
    """Rows per map_batches call; rows inside a batch are sorted by token length and cut into
    sub-batches, so a bigger batch means less padding."""
    sub_batch_size: int = Field(8, ge=1)
    """Rows per forward pass inside one map_batches call."""
    num_actors: int = Field(1, ge=1)
    """Actors in the pool, each holding one copy of the teacher."""
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs per actor; fractional so that pools do not starve on small machines."""
    gpus_per_actor: float = Field(0.0, ge=0)
    """GPUs per actor (1 on GPU clusters; then bf16 unless `dtype` says otherwise)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Inference dtype; `auto` = bfloat16 on GPU, float32 on CPU."""
    max_length: int | None = Field(None, ge=16)
    """Token limit at inference; None = the teacher's training max_length."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per actor on CPU; None = max(1, round(cpus_per_actor))."""
    ece_bins: int = Field(10, ge=2)
    """Equal-width probability bins of the calibration error and the reliability diagram."""
