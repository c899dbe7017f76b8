"""The experiment's rows: the student variants (which text, whether and from what each distils),
the teacher rows, the reference rows, and the names of students served at reduced precision.
Config, data, training, evaluation and the study derive theirs from here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudentVariant:
    """One arm of the comparison: which text the student reads, whether and from what it distils."""

    name: str
    text_column: str
    """`text_plain` (visit i as rendered), `text_eadf` (the same plus the efficacy clauses) or a
    control text (CONTROL_TEXTS)."""
    distills: bool
    """True: trained on alpha*hard + beta*soft; False: hard labels only."""
    role: str
    """What the row means, as the evaluation and the report print it."""
    soft_labels: str = "teacher"
    """Where the soft labels come from: `teacher` (the soft-label stage), `teacher_plain` (a
    second teacher trained and scored on plain text, written by `ckd-ehr study`) or `oracle` (the
    synthetic generator's latent oracle: is distillation worth it when the teacher is good?)."""
    primary: bool = True
    """One of the paper's four arms (trained by default); False: a control the study adds."""
    unit_terms: tuple[str, ...] | None = None
    """Multi-granularity terms (docs/method.md) beside the soft labels: None = as configured
    (student.distill.label_attention / relation, 0 by default); a tuple = exactly these terms
    (`label_attention`, `relation`), each at its configured weight or UNIT_TERM_DEFAULT_WEIGHT when that is 0."""


STUDENT_VARIANT_TABLE: tuple[StudentVariant, ...] = (
    StudentVariant("hard_plain", "text_plain", False,
                   "(a) student, hard labels, plain text: the paper's baseline (plain BERT)"),
    StudentVariant("hard_eadf", "text_eadf", False, "(b) student, hard labels, EADF text"),
    StudentVariant("distill_plain", "text_plain", True, "(c) student, distillation, plain text"),
    StudentVariant("ckd_ehr", "text_eadf", True, "(d) student, distillation, EADF text: CKD-EHR"),
    StudentVariant("hard_names", "text_names", False,
                   "(b-names) control: hard labels, clauses naming the present phenotypes, no drugs",
                   primary=False),
    StudentVariant("hard_random", "text_random", False,
                   "(b-random) control: hard labels, clauses with as many randomly drawn listed drugs",
                   primary=False),
    StudentVariant("distill_plain_ablation", "text_plain", True,
                   "(c, study) student, plain text, distilled from a teacher trained and scored on plain text: "
                   "EADF ablated from teacher and student", soft_labels="teacher_plain", primary=False),
    StudentVariant("oracle_distill", "text_eadf", True,
                   "(d-oracle) control: distilled from the generator's latent oracle, EADF text",
                   soft_labels="oracle", primary=False),
    StudentVariant("ckd_ehr_generative", "text_eadf", True,
                   "(d-gen) CKD-EHR distilled from the generative teacher (phenotypes read from the LLM's "
                   "vocabulary, no MLAPH; written by `ckd-ehr study`)", soft_labels="teacher_generative",
                   primary=False),
    StudentVariant("ckd_ehr_soft_only", "text_eadf", True,
                   "(d-soft) CKD-EHR with the soft labels only (no unit terms, whatever the config): the "
                   "reference of the multi-granularity rows", primary=False, unit_terms=()),
    StudentVariant("ckd_ehr_label_attention", "text_eadf", True,
                   "(d+label) CKD-EHR plus label-level attention distillation", primary=False,
                   unit_terms=("label_attention",)),
    StudentVariant("ckd_ehr_relation", "text_eadf", True,
                   "(d+relation) CKD-EHR plus relation-level distillation", primary=False,
                   unit_terms=("relation",)),
    StudentVariant("ckd_ehr_multigrain", "text_eadf", True,
                   "(d+all) CKD-EHR with all three granularities: label attention, soft labels, relations",
                   primary=False, unit_terms=("label_attention", "relation")),
)
"""The one definition of the student variants: config, data, training and evaluation derive theirs."""
UNIT_TERMS = ("label_attention", "relation")
UNIT_TERM_DEFAULT_WEIGHT = 1.0
"""Weight of a unit term a study variant turns on when the config leaves it at 0."""
STUDENT_VARIANTS = tuple(v.name for v in STUDENT_VARIANT_TABLE)
PRIMARY_VARIANTS = tuple(v.name for v in STUDENT_VARIANT_TABLE if v.primary)
SOFT_LABEL_SOURCES = ("teacher", "teacher_plain", "teacher_generative", "oracle")
TEACHER_ROLE = "(e) teacher LLM with the multi-label projection head"
TEACHER_ROWS = {
    "teacher": TEACHER_ROLE,
    "teacher_generative": "(e-gen) the same LLM reading the phenotypes from its vocabulary (teacher.head: "
                          "generative, calibrated on validation)",
}
"""Evaluate rows scored from a teacher's test soft labels: row name = soft-label source."""
SIDE_TEACHERS = {"teacher_plain": "plain", "teacher_generative": "generative"}
REFERENCE_ROWS = ("copy_forward", "logistic_regression", "logistic_regression_phenotypes", "gradient_boosting",
                  "observable_ceiling", "latent_oracle", "probe_student", "probe_teacher")
"""Evaluate's reference and probe rows a study collects per seed beside its models (floors,
ceilings, each model's own probe): rows of its tables and of its contrasts."""
"""Soft-label sources `ckd-ehr study` trains a second teacher for, per seed, in
RUN/seed_{k}_{suffix}_teacher/; its outputs are copied to RUN/seed_{k}/soft_labels/{source}/."""


def student_variant(name: str) -> StudentVariant:
    """The variant called `name`."""
    for v in STUDENT_VARIANT_TABLE:
        if v.name == name:
            return v
    raise ValueError(f"unknown student variant '{name}' (one of {', '.join(STUDENT_VARIANTS)})")


SERVE_PRECISIONS = ("fp32", "int8", "bf16")
"""serve.precision: fp32 as trained; int8 dynamic quantisation of the encoder's linear layers
(CPU); bf16 autocast of the encoder (fast on CPUs with AMX, and on GPUs). See ServeConfig."""


def precision_name(variant: str, precision: str) -> str:
    """Name of a student variant served at a reduced precision (serve.precision int8 or bf16):
    its evaluate row and predictions file (RUN/evaluate/predictions/{variant}_{precision}.parquet)."""
    return f"{variant}_{precision}"


def base_variant(name: str) -> str:
    """The student variant behind an evaluate row name (`ckd_ehr_int8`, `ckd_ehr_bf16` -> `ckd_ehr`)."""
    for precision in SERVE_PRECISIONS[1:]:
        if name.endswith(f"_{precision}"):
            return name[:-len(precision) - 1]
    return name
