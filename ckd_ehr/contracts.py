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
      soft_labels/{split}.parquet      SOFT_LABELS
      soft_labels/quality/             entropy, calibration, reliability diagram
      student/{variant}/artifact/      STUDENT ARTIFACT (below)
      student/{variant}/train/         Ray Train storage
      evaluate/predictions/{name}.parquet  PREDICTIONS on the test split
      evaluate/metrics.json            all metrics with bootstrap intervals
      report/report.md, report.html, *.png
      tune/                            Ray Tune experiments

Teacher artifact: adapter/ (peft LoRA), head.safetensors, tokenizer/, teacher.json
  (config, label_names, metrics, artifact_id). Loads without Ray and without DeepSpeed.
Student artifact: model/ (encoder save_pretrained), head.safetensors, tokenizer/,
  student.json (config, label_names, thresholds, metrics, text options, artifact_id),
  efficacy_table.parquet (the training efficacy table, so Serve renders text as training did).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ckd_ehr.data.phenotypes import NUM_PHENOTYPES
from ckd_ehr.storage import join

SPLITS = ("train", "val", "test")
STUDENT_VARIANTS = ("hard_plain", "hard_eadf", "distill_plain", "ckd_ehr")
PROBE_HEAD = "probe_head.safetensors"
"""In a checkpoint and in teacher and student artifacts trained with `head_init: probe`: the
linear probe the head started from (ckd_ehr.modeling.probe.LinearProbe), read by evaluate's probe rows."""


def quantized_name(variant: str) -> str:
    """Name of a student variant served at int8 (serve.precision: int8): its evaluate row and
    predictions file (RUN/evaluate/predictions/{variant}_int8.parquet)."""
    return f"{variant}_int8"


def base_variant(name: str) -> str:
    """The student variant behind an evaluate row name (`ckd_ehr_int8` -> `ckd_ehr`)."""
    return name[:-len("_int8")] if name.endswith("_int8") else name

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

PREDICTIONS = pa.schema([
    ("sample_id", pa.string()),
    ("subject_id", pa.int64()),
    ("labels", MULTI_HOT),
    ("probs", VECTOR25),
])


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
    def text_fit(self) -> str: return self.path("eadf", "text_fit.json")
    @property
    def teacher_artifact(self) -> str: return self.path("teacher", "artifact")
    @property
    def teacher_train(self) -> str: return self.path("teacher", "train")
    def soft_labels(self, split: str) -> str: return self.path("soft_labels", f"{split}.parquet")
    @property
    def soft_label_quality(self) -> str: return self.path("soft_labels", "quality")
    def student_artifact(self, variant: str = "ckd_ehr") -> str: return self.path("student", variant, "artifact")
    def student_train(self, variant: str = "ckd_ehr") -> str: return self.path("student", variant, "train")
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
