"""Config of the synthetic cohort generator (`ckd-ehr synth`)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section


class SynthConfig(Section):
    patients: int = Field(2000, gt=0)
    """Number of synthetic patients. MIMIC-III scale is 46,520."""
    mean_admissions: float = Field(2.0, ge=1.0, le=10.0)
    """Mean admissions per patient (MIMIC-III: about 1.27; more gives more visit pairs)."""
    seed: int = 0
    """Seed of the generator: same seed, same tables, byte for byte."""
    form: Literal["demo", "full", "mimic4"] = "demo"
    """`demo`: plain .csv with lowercase headers; `full`: .csv.gz, UPPERCASE quoted headers
    (both MIMIC-III); `mimic4`: MIMIC-IV layout, hosp/*.csv.gz, ICD-10 after October 2015."""
    label_noise: float = Field(0.02, ge=0.0, le=0.5)
    """Probability that a phenotype's diagnosis code is dropped or spuriously added per visit."""
    drugs_per_phenotype: int = Field(3, ge=1, le=10)
    """Planted efficacious drugs per phenotype (the ground truth EADF should recover)."""
    planted_rate: float = Field(0.22, gt=0.0, lt=1.0)
    """Chance that each planted drug of a phenotype is given at a visit where the phenotype is
    present. 0.22 with 3 drugs treats about half of the episodes: both arms have support, and
    the drugs are given to only some of the patients with the phenotype."""
    planted_effect: float = Field(0.05, gt=0.0, le=1.0)
    """Factor on the phenotype's persistence to the next visit per planted drug given (0.05:
    a treated episode almost always resolves; 1.0: planted drugs do nothing, the null control).
    Strong by default so that drug information is worth a measurable macro AUROC gain to a
    logistic regression over the null twin (`ckd-ehr bench synth-signal`)."""
    chronic_persistence: float = Field(0.95, ge=0.0, le=1.0)
    """Chance that a chronic phenotype present at a visit is present at the next (untreated)."""
    acute_persistence: float = Field(0.7, ge=0.0, le=1.0)
    """Chance that an acute phenotype present at a visit is present at the next (untreated)."""

    confounding: float = Field(0.0, ge=0.0, le=1.0)
    """Confounding by indication (0: none). A latent acute flare (half of the present episodes)
    multiplies persistence by 1 - confounding and raises the chance of the phenotype's no-effect
    decoy drugs by 0.7 x confounding; a visit shows a flare only through an extra code. Fools a
    crude given-vs-not estimate into crediting the decoys (the EADF issue tests against it)."""

    @model_validator(mode="after")
    def _acute_not_more_persistent(self):
        # The generator's premise (chronic diseases persist, acute ones come and go).
        if self.acute_persistence > self.chronic_persistence:
            raise ValueError(f"acute_persistence ({self.acute_persistence}) must not exceed "
                             f"chronic_persistence ({self.chronic_persistence})")
        return self
