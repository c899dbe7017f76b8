"""Where things live: the splits, the files inside teacher and student artifacts, the run
directory (RunLayout) and a study's summary directory (StudyFiles); the tree is drawn in
ckd_ehr.contracts' docstring."""
from __future__ import annotations

from dataclasses import dataclass

from ckd_ehr.contracts.variants import SIDE_TEACHERS, SOFT_LABEL_SOURCES
from ckd_ehr.storage import join

SPLITS = ("train", "val", "test")


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


@dataclass(frozen=True)
class _Rooted:
    """Paths under one directory (local path or URI)."""

    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)


@dataclass(frozen=True)
class RunLayout(_Rooted):
    """Paths inside one run directory (local path or URI)."""

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
    @property
    def write_probe(self) -> str:
        """A file prepare writes and removes first: is the run directory writable?"""
        return self.path("data", ".write_check")
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
    def scoring_subsets(self) -> str:
        """Where the soft-label stage writes the rows it scores when not a whole split (removed after)."""
        return self.path("soft_labels", "to_score")
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
    def predictions(self, name: str) -> str: return join(self.predictions_dir, f"{name}.parquet")
    @property
    def predictions_dir(self) -> str: return self.path("evaluate", "predictions")
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
class StudyFiles(_Rooted):
    """The files of a study's summary directory (RUN/study, or a copy under docs/): what
    `ckd-ehr study` collects from its runs and what the summary is rebuilt from."""

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
