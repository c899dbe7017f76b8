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
# One import path for every contract: `from ckd_ehr.contracts import RunLayout, SOFT_LABELS, ...`.
from ckd_ehr.contracts.layout import (  # noqa: F401
    SPLITS, ARTIFACT_HEAD, ARTIFACT_TOKENIZER, TEACHER_META, TEACHER_CALIBRATION, TEACHER_ADAPTER,
    STUDENT_META, STUDENT_ENCODER, STUDENT_EFFICACY, PROBE_HEAD, GROUND_TRUTH, RunLayout, StudyFiles,
)
from ckd_ehr.contracts.schemas import (  # noqa: F401
    MULTI_HOT, VECTOR25, STRINGS, VISITS, SAMPLES, AUGMENTED_SAMPLES, CONTROL_TEXTS,
    AUGMENTED_WITH_CONTROLS, EFFICACY, SOFT_LABELS, UNIT_TARGETS, PREDICTIONS, to_matrix, ContractError,
    check_schema,
)
from ckd_ehr.contracts.variants import (  # noqa: F401
    StudentVariant, STUDENT_VARIANT_TABLE, UNIT_TERMS, UNIT_TERM_DEFAULT_WEIGHT, STUDENT_VARIANTS,
    PRIMARY_VARIANTS, SOFT_LABEL_SOURCES, TEACHER_ROLE, TEACHER_ROWS, SIDE_TEACHERS, REFERENCE_ROWS,
    student_variant, SERVE_PRECISIONS, precision_name, base_variant,
)
