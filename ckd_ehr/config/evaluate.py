"""Config of evaluation and the report."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckd_ehr.config.base import Section
from ckd_ehr.contracts import STUDENT_VARIANTS


class EvaluateConfig(Section):
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples over patients for 95% intervals (0 = no intervals)."""
    seed: int = 0
    """Seed of the bootstrap (the same resampled patients for every model: paired deltas)."""
    baseline: Literal[STUDENT_VARIANTS + ("teacher",)] = "hard_plain"
    """Model every other is compared against; the paper's baseline is plain BERT (hard_plain)."""
    baselines: bool = True
    """Score the reference rows (all_negative, prevalence, copy_forward, logistic_regression and,
    on synthetic cohorts, latent_oracle / observable_ceiling) beside the models: every model
    figure next to its floor and its ceiling."""
    reference_dir: str | None = None
    """Where the reference rows' test predictions, thresholds and details are kept, with a stamp
    of the samples (content hash) and the settings they were computed from; a later evaluate on
    the same samples reads them instead of refitting (gradient boosting costs minutes). None:
    RUN/evaluate/references. A study points the seeds of a cohort at its base run."""
    probes: bool = True
    """Score the probe rows (ckd_ehr.evaluation.probe_rows): the frozen teacher backbone and the frozen
    student encoder, each with the linear probe its training started from (`head_init: probe`);
    costs one frozen forward pass over validation and test per model."""
    min_test_positives: int = Field(5, ge=1)
    """A phenotype enters the macro metrics' label set with at least this many positives in the
    full test split (fewer make its AUROC a coin toss); the report names the rest."""
    min_phenotypes: int = Field(10, ge=1)
    """Fewer qualifying phenotypes than this: too small to judge (refused unless allow_small)."""
    max_interval_width: float = Field(0.15, gt=0.0)
    """Widest acceptable 95% interval of the baseline rows' macro AUROC; wider: too small to
    judge (refused unless allow_small)."""
    allow_small: bool = False
    """Evaluate anyway when the test split is too small to judge; the report carries a banner
    (the MIMIC-III demo and the small demo cohort need it)."""
