"""The contract between stages: the run-directory layout and every parquet schema.

Each stage is a plain function that reads the files an earlier stage wrote and writes its
own, as laid out here. Change a schema here and nowhere else.

    RUN/
      manifest.json                    pipeline: per-stage status, hashes, row counts, timings
      raw/                             synthetic cohort in MIMIC-III form (source: synthetic)
        ground_truth.json              planted efficacious drugs + generator parameters
      data/visits.parquet              VISITS: one row per admission
      data/prepare_report.json         counts of rows read, dropped and why
      data/samples/{split}.parquet     SAMPLES: one row per consecutive admission pair
      eadf/efficacy_table.parquet      EFFICACY: per phenotype x drug, counts, effect, p, q, rank
      eadf/samples/{split}.parquet     SAMPLES + text_eadf
      eadf/validity.json               precision@k against the synthetic ground truth
      teacher/artifact/                TEACHER ARTIFACT (below)
      teacher/train/                   Ray Train storage (checkpoints)
      teacher/probe_features/*.npz     the frozen backbone's pooled features of the probe's rows
                                       (head_init probe; ckd_ehr.modeling.feature_cache)
      soft_labels/{split}.parquet      SOFT_LABELS
      soft_labels/oracle/{split}.parquet  SOFT_LABELS from the latent oracle (synthetic, oracle variants)
      soft_labels/teacher_plain/{split}.parquet  SOFT_LABELS of a plain-text teacher (`ckd-ehr study`)
      soft_labels/teacher_generative/{split}.parquet  SOFT_LABELS of a generative teacher (`ckd-ehr
                                       study`), with its teacher.json beside them
      soft_labels/units/{split}.parquet  UNIT_TARGETS: the teacher's unit attention and relations
                                       (`soft_labels.unit_targets`, multi-granularity distillation)
      soft_labels/quality/             entropy, calibration, reliability diagram
      student/{variant}/artifact/      STUDENT ARTIFACT (below)
      student/{variant}/train/         Ray Train storage
      student/probe_features/*.npz     the frozen encoder's pooled features per row (head_init
                                       probe): shared by variants reading the same texts
      evaluate/predictions/{name}.parquet  PREDICTIONS on the test split (models, reference and probe rows)
      evaluate/references/             the reference rows' predictions and details, stamped (reused)
      evaluate/metrics.json            all metrics with bootstrap intervals
      report/report.md, report.html, *.png
      tune/                            Ray Tune experiments

`ckd-ehr study` (RUN = the study's run_dir): base/ (prepare + EADF once), seed_{k}/ (a run from
the teacher on, per seed), seed_{k}_plain_teacher/ (the plain-text teacher's soft labels),
seed_{k}_generative_teacher/ (the generative teacher's); a further synthetic cohort (generator
seed g) has the same layout under cohort_{g}/. study/ (StudyFiles) holds everything the tables
are built from, so `ckd-ehr study --summarise-only --study-dir DIR` needs nothing else:
config.json, cohorts/{cohort}/test_labels.csv.gz, seed_{k}_predictions.csv.gz (every row's test
probabilities), seed_{k}.json (code provenance, stage times, evaluate's figures), base.json;
and what it writes: results.json, study.md, forest.png.

Teacher artifact: adapter/ (peft LoRA), head.safetensors, tokenizer/, teacher.json
  (config, label_names, metrics, artifact_id), probe_head.safetensors (head_init: probe).
  Loads without Ray and without DeepSpeed.
Student artifact: model/ (encoder save_pretrained), head.safetensors, tokenizer/,
  student.json (config, label_names, thresholds, metrics, text options, artifact_id),
  efficacy_table.parquet (the training efficacy table, so Serve renders text as training did),
  probe_head.safetensors (head_init: probe).
The file names are the constants below (TEACHER_META, ARTIFACT_HEAD, ...): nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.storage import join

SPLITS = ("train", "val", "test")


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


# --- artifact layouts: the files inside a teacher or student artifact directory -------------
ARTIFACT_HEAD = "head.safetensors"
"""The projection head's weights (teacher MLAPH or student linear head)."""
ARTIFACT_TOKENIZER = "tokenizer"
"""save_pretrained tokenizer directory."""
TEACHER_META = "teacher.json"
"""Teacher artifact metadata: config, label_names, metrics, pooling, text options, artifact_id."""
TEACHER_CALIBRATION = "calibration.json"
"""A generative teacher's per-phenotype score -> probability map (ckd_ehr.teacher.generative)."""
TEACHER_ADAPTER = "adapter"
"""peft LoRA adapter directory (the base model is named in teacher.json, never copied)."""
STUDENT_META = "student.json"
"""Student artifact metadata: config, label_names, thresholds, metrics, text options, artifact_id."""
STUDENT_ENCODER = "model"
"""The encoder's save_pretrained directory."""
STUDENT_EFFICACY = "efficacy_table.parquet"
"""The training efficacy table, so Serve renders text exactly as training did."""
PROBE_HEAD = "probe_head.safetensors"
"""In a checkpoint and in teacher and student artifacts trained with `head_init: probe`: the
linear probe the head started from (ckd_ehr.modeling.probe.LinearProbe), read by evaluate's probe rows."""
GROUND_TRUTH = "ground_truth.json"
"""RUN/raw/: the synthetic generator's truth (planted drugs, parameters, ceilings)."""


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

MULTI_HOT = pa.list_(pa.int8(), NUM_PHENOTYPES)
VECTOR25 = pa.list_(pa.float32(), NUM_PHENOTYPES)
STRINGS = pa.list_(pa.string())

VISITS = pa.schema([
    ("subject_id", pa.int64()),
    ("hadm_id", pa.int64()),
    ("admittime", pa.timestamp("s")),
    ("dischtime", pa.timestamp("s")),
    ("gender", pa.string()),            # 'M' / 'F' / null
    ("age", pa.float32()),              # years at admission; null where unknown; >89 capped at 90
    ("diagnosis_codes", STRINGS),       # in seq_num order; ICD-9-CM normalised (no dots), ICD-10-CM (MIMIC-IV) dotted: I50.23
    ("diagnosis_titles", STRINGS),      # long_title per code (else short_title, else the code)
    ("diagnosis_short_titles", STRINGS),  # short_title (else long_title, else the code)
    ("procedure_codes", STRINGS),       # ICD-9-CM procedures (no dots) or ICD-10-PCS (7 characters)
    ("procedure_titles", STRINGS),      # short_title (the release uses short titles), else the code
    ("drugs", STRINGS),                 # PRESCRIPTIONS.drug, deduplicated, first-given order
    ("phenotypes", MULTI_HOT),          # the 25 phenotypes present in this admission
])

SAMPLES = pa.schema([
    ("sample_id", pa.string()),         # f"{subject_id}-{hadm_id}-{next_hadm_id}": stable
    ("subject_id", pa.int64()),
    ("hadm_id", pa.int64()),            # visit i
    ("next_hadm_id", pa.int64()),       # visit i+1
    ("split", pa.string()),             # train / val / test
    ("admittime", pa.timestamp("s")),
    ("diagnosis_codes", STRINGS),
    ("diagnosis_titles", STRINGS),
    ("diagnosis_short_titles", STRINGS),
    ("procedure_codes", STRINGS),       # ICD-9-CM procedures (no dots) or ICD-10-PCS (7 characters)
    ("procedure_titles", STRINGS),
    ("drugs", STRINGS),
    ("phenotypes_current", MULTI_HOT),  # phenotypes of visit i (EADF reads these)
    ("labels", MULTI_HOT),              # phenotypes of visit i+1: the target
    ("text_plain", pa.string()),        # rendered input of visit i, no efficacy clauses
])

AUGMENTED_SAMPLES = SAMPLES.append(pa.field("text_eadf", pa.string()))
CONTROL_TEXTS = ("text_names", "text_random")
"""Extra AUGMENTED_SAMPLES columns when `eadf.control_texts: true` (the study's controls, see
text.control_efficacy): clauses naming the present phenotypes without drugs, and clauses with as
many drugs drawn at random. Readers keep them when present (student.data.read_split)."""
AUGMENTED_WITH_CONTROLS = AUGMENTED_SAMPLES.append(pa.field("text_names", pa.string())).append(
    pa.field("text_random", pa.string()))

EFFICACY = pa.schema([
    ("phenotype_index", pa.int32()),
    ("phenotype", pa.string()),
    ("drug", pa.string()),
    ("n_given", pa.int64()),            # pairs with the phenotype at visit i that got the drug
    ("resolved_given", pa.int64()),     # ... of which the phenotype is gone at visit i+1
    ("n_not_given", pa.int64()),
    ("resolved_not_given", pa.int64()),
    ("rate_given", pa.float64()),
    ("rate_not_given", pa.float64()),
    ("effect", pa.float64()),           # rate_given - rate_not_given
    ("lower", pa.float64()),            # Newcombe interval of the effect
    ("upper", pa.float64()),
    ("risk_ratio", pa.float64()),
    ("score", pa.float64()),            # what the chosen ranking sorts by
    ("rank", pa.int32()),               # 1 = best within the phenotype; null = not eligible
    ("ranking", pa.string()),           # efficacy / frequency / risk_ratio
    # Inference (eadf_inference): effect/lower/upper above are the crude difference with
    # Newcombe's interval (adjust: none) or the Mantel-Haenszel difference with Sato's interval
    # (adjust: severity), both on effective counts (counts / design effect) when clustered.
    ("p_value", pa.float64()),          # one-sided CMH score test; null if below min_support
    ("q_value", pa.float64()),          # Benjamini-Hochberg over all tested pairs of the table
    ("design_effect_given", pa.float64()),      # per-patient clustering of each arm (1 = none)
    ("design_effect_not_given", pa.float64()),
    ("adjust", pa.string()),            # none / severity
])

SOFT_LABELS = pa.schema([
    ("sample_id", pa.string()),
    ("logits", VECTOR25),
    ("probs", VECTOR25),
    ("teacher_id", pa.string()),
])

UNIT_TARGETS = pa.schema([
    ("sample_id", pa.string()),
    ("units", STRINGS),                 # the teacher's units in text order (ckd_ehr.text.text_units keys: d0, m1, p0, c7)
    ("unit_attention", pa.list_(pa.float16())),  # [25 x W] row-major: per phenotype, its label attention summed per
                                        # unit, renormalised over the units; null unless the teacher pools by label attention
    ("unit_relation", pa.list_(pa.float16())),   # [W x W] row-major: row-softmax of the scaled dot products of the
                                        # units' mean hidden states (soft_labels.relation_layer); null when relation_layer is null
])
"""Multi-granularity distillation targets (docs/method.md), float16: the student restricts each
to the units its own text shows and renormalises (ckd_ehr.modeling.units.restrict)."""

PREDICTIONS = pa.schema([
    ("sample_id", pa.string()),
    ("subject_id", pa.int64()),
    ("labels", MULTI_HOT),
    ("probs", VECTOR25),
])


def to_matrix(values, dtype=np.float64) -> np.ndarray:
    """An N x K array from a 2-D array, a list of lists, a pandas Series of lists or a pyarrow
    list column (the fixed-size MULTI_HOT / VECTOR25 columns take a zero-copy path): the one
    conversion of the contract's vector columns for every stage."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return values.astype(dtype, copy=False)
    if isinstance(values, (pa.ChunkedArray, pa.Array)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if pa.types.is_fixed_size_list(arr.type) and arr.null_count == 0:
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(len(arr), arr.type.list_size).astype(dtype, copy=False)
        values = arr.to_pylist()
    elif hasattr(values, "tolist"):          # pandas Series of lists / arrays
        values = values.tolist()
    if not len(values):
        return np.zeros((0, NUM_PHENOTYPES), dtype=dtype)
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"expected an N x K matrix, got shape {arr.shape}")
    return arr


class ContractError(ValueError):
    """A stage's input or output does not match its contract."""


def check_schema(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check that `table` has every column of `schema` with a castable type; return it cast.

    Extra columns are dropped. The error names the file (`where`), the column and the type.
    """
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ContractError(f"{where}: missing column(s) {', '.join(missing)}")
    cols = []
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ContractError(f"{where}: column '{f.name}' has type {col.type}, expected {f.type}") from exc
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory (local path or URI)."""

    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def manifest(self) -> str: return self.path("manifest.json")
    @property
    def raw_dir(self) -> str: return self.path("raw")
    @property
    def ground_truth(self) -> str: return self.path("raw", GROUND_TRUTH)
    @property
    def visits(self) -> str: return self.path("data", "visits.parquet")
    @property
    def prepare_report(self) -> str: return self.path("data", "prepare_report.json")
    def samples(self, split: str) -> str: return self.path("data", "samples", f"{split}.parquet")
    @property
    def efficacy_table(self) -> str: return self.path("eadf", "efficacy_table.parquet")
    def augmented(self, split: str) -> str: return self.path("eadf", "samples", f"{split}.parquet")
    @property
    def eadf_validity(self) -> str: return self.path("eadf", "validity.json")
    @property
    def text_fit(self) -> str: return self.path("evaluate", "text_fit.json")
    @property
    def teacher_artifact(self) -> str: return self.path("teacher", "artifact")
    @property
    def teacher_train(self) -> str: return self.path("teacher", "train")
    @property
    def teacher_probe_features(self) -> str: return self.path("teacher", "probe_features")
    @property
    def teacher_meta(self) -> str: return self.path("teacher", "artifact", TEACHER_META)
    def soft_labels(self, split: str, source: str = "teacher") -> str:
        """The teacher's soft labels, or another source's in the same schema (SOFT_LABEL_SOURCES)."""
        if source not in SOFT_LABEL_SOURCES:
            raise ValueError(f"unknown soft-label source {source!r} (one of {', '.join(SOFT_LABEL_SOURCES)})")
        if source != "teacher":
            return self.path("soft_labels", source, f"{split}.parquet")
        return self.path("soft_labels", f"{split}.parquet")
    def unit_targets(self, split: str) -> str: return self.path("soft_labels", "units", f"{split}.parquet")
    @property
    def soft_label_quality(self) -> str: return self.path("soft_labels", "quality")
    def student_artifact(self, variant: str = "ckd_ehr") -> str: return self.path("student", variant, "artifact")
    def student_train(self, variant: str = "ckd_ehr") -> str: return self.path("student", variant, "train")
    def student_meta(self, variant: str = "ckd_ehr") -> str: return self.path("student", variant, "artifact", STUDENT_META)
    @property
    def probe_features(self) -> str: return self.path("student", "probe_features")
    @property
    def student_frozen_cache(self) -> str: return self.path("student", "frozen_cache")
    @property
    def teacher_frozen_cache(self) -> str: return self.path("teacher", "frozen_cache")
    def predictions(self, name: str) -> str: return self.path("evaluate", "predictions", f"{name}.parquet")
    @property
    def metrics(self) -> str: return self.path("evaluate", "metrics.json")
    @property
    def report_dir(self) -> str: return self.path("report")
    @property
    def report_md(self) -> str: return self.path("report", "report.md")
    @property
    def report_html(self) -> str: return self.path("report", "report.html")
    @property
    def tune_dir(self) -> str: return self.path("tune")
    # `ckd-ehr study`: one cohort, split and EADF table (base/), one run directory per seed
    # (and per seed, one for the plain-text teacher), the results beside them.
    @property
    def study_base(self) -> str: return self.path("base")
    def study_seed(self, seed: int) -> str: return self.path(f"seed_{seed}")
    def study_side_teacher(self, seed: int, source: str) -> str:
        """The run directory of a seed's second teacher for soft-label source `source` (SIDE_TEACHERS)."""
        return self.path(f"seed_{seed}_{SIDE_TEACHERS[source]}_teacher")
    def side_teacher_file(self, source: str, name: str) -> str:
        """A file of a side teacher copied beside its soft labels (its teacher.json)."""
        return self.path("soft_labels", source, name)
    def study_cohort(self, synth_seed: int) -> str:
        """The study root of a further synthetic cohort (generator seed `synth_seed`)."""
        return self.path(f"cohort_{synth_seed}")
    @property
    def study_results(self) -> str: return self.path("study", "results.json")
    @property
    def study_dir(self) -> str: return self.path("study")


@dataclass(frozen=True)
class StudyFiles:
    """The files of a study's summary directory (RUN/study, or a copy under docs/): what
    `ckd-ehr study` collects from its runs and what the summary is rebuilt from."""

    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def config(self) -> str: return self.path("config.json")
    @property
    def results(self) -> str: return self.path("results.json")
    @property
    def markdown(self) -> str: return self.path("study.md")
    def cohort_dir(self, cohort: str) -> str: return self.path("cohorts", cohort)
    def labels(self, cohort: str) -> str: return self.path("cohorts", cohort, "test_labels.csv.gz")
    def predictions(self, cohort: str, seed: int) -> str:
        return self.path("cohorts", cohort, f"seed_{seed}_predictions.csv.gz")
    def seed_record(self, cohort: str, seed: int) -> str: return self.path("cohorts", cohort, f"seed_{seed}.json")
    def base_record(self, cohort: str) -> str: return self.path("cohorts", cohort, "base.json")
