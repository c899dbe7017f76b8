"""Config of soft-label batch inference on Ray Data."""
from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator

from ckd_ehr.config.base import Section


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
    num_gpus_per_actor: float = Field(0.0, ge=0, validation_alias=AliasChoices("num_gpus_per_actor", "gpus_per_actor"))
    """GPUs per actor (Ray's num_gpus; the old key `gpus_per_actor` is still read). 0 = CPU
    actors. A fraction (e.g. 0.5) packs several actors, each with its own teacher copy, on one
    GPU: a 7B teacher in bf16 takes ~15 GiB, so an H200 (141 GiB) holds several and scoring,
    which is memory-bound at small batches, gains from the overlap. GPU actors score in
    bfloat16 unless `dtype` says otherwise. Above 1 it must be a whole number (Ray's rule)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Inference dtype; `auto` = bfloat16 on GPU, float32 on CPU."""
    max_length: int | None = Field(None, ge=16)
    """Token limit at inference; None = the teacher's training max_length."""
    rows: Literal["all", "student"] = "all"
    """`all`: every sample of every split. `student`: of train and val only the rows the
    student reads (student.max_train_samples / max_eval_samples, the same seeded subset), of
    test every row (the teacher's test predictions). A large cohort fitted for EADF need not
    be scored whole when the student trains on a capped subset of it."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per actor on CPU; None = max(1, round(cpus_per_actor))."""
    unit_targets: bool = False
    """Also write the teacher's multi-granularity targets (contracts.UNIT_TARGETS: label attention
    per unit, unit relations; float16) for the student's `distill.label_attention` /
    `distill.relation` terms. Turned on by the pipeline config when a student needs them."""
    relation_layer: int | None = -1
    """Teacher hidden-state layer whose unit vectors the relations compare (an index into the
    backbone's hidden_states: 0 the embeddings, -1 the last layer); None: no relations."""
    ece_bins: int = Field(10, ge=2)
    """Equal-width probability bins of the calibration error and the reliability diagram."""

    @field_validator("num_gpus_per_actor")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"num_gpus_per_actor {v}: a fraction must be below 1 (Ray gives fractions of one GPU)")
        return v

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus_per_actor > 0
