"""Config of the synthetic cohort generator (`ckd-ehr synth`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class SynthConfig(Section):
    patients: int = Field(2000, gt=0)
    """Number of synthetic patients. MIMIC-III scale is 46,520."""
    mean_admissions: float = Field(2.0, ge=1.0, le=10.0)
    """Mean admissions per patient (MIMIC-III: about 1.27; more gives more visit pairs)."""
    seed: int = 0
    """Seed of the generator: same seed, same tables, byte for byte."""
    form: Literal["demo", "full"] = "demo"
    """`demo`: plain .csv with lowercase headers; `full`: .csv.gz, UPPERCASE quoted headers."""
    label_noise: float = Field(0.02, ge=0.0, le=0.5)
    """Probability that a phenotype's diagnosis code is dropped or spuriously added per visit."""
    drugs_per_phenotype: int = Field(3, ge=1, le=10)
    """Planted efficacious drugs per phenotype (the ground truth EADF should recover)."""
