"""The one stage registry: every pipeline stage, in order, with what it reads and writes.

`ckd_ehr.pipeline` runs these in order (manifest, --resume, --from/--to); `ckd_ehr.cli` builds
one subcommand per stage from them (`ckd-ehr <stage>`, with `_` written `-`); `jobs/run.py`,
the `ray job submit` entrypoint, calls the CLI. tests/test_pipeline.py checks they agree.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import SIDE_TEACHERS, SPLITS, TEACHER_ROWS, RunLayout, student_variant


@dataclass(frozen=True)
class Stage:
    name: str
    """Pipeline name (`--from`/`--to`, manifest key); the CLI subcommand writes `_` as `-`."""
    module: str
    """Module under ckd_ehr holding `function` (imported only when the stage runs)."""
    function: str
    """`run_<stage>(cfg: PipelineConfig) -> dict`."""
    sections: tuple[str, ...]
    """Config sections the stage reads (`student`), or single fields of one (`student.seed`): a
    change in any of them reruns it under --resume, and reading anything else fails (stage_config)."""
    inputs: Callable[[PipelineConfig, RunLayout], list[str]]
    """Files and directories the stage reads: each must exist before it runs, and its
    fingerprint decides whether --resume may skip the stage."""
    outputs: Callable[[PipelineConfig, RunLayout], list[str]]
    """What the stage writes for later stages and the user (fingerprinted in the manifest)."""
    help: str
    """One line for `ckd-ehr --help`."""
    optional_inputs: Callable[[PipelineConfig, RunLayout], list[str]] = lambda c, r: []
    """What the stage reads where present (a report of an earlier stage it copies): neither
    required nor fingerprinted; a planned stage that writes one reruns this one (plan_resume)."""
    caches: Callable[[PipelineConfig, RunLayout], list[str]] = lambda c, r: []
    """Directories the stage keeps beside its outputs, read where present and added to: per-row
    caches keyed by their content (frozen features and states), Ray Train's checkpoints (a
    rerun resumes from them), evaluate's reference rows. Not required to exist and not
    fingerprinted; a planned stage that writes one reruns the stages that read it (plan_resume)."""

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def function_ref(self) -> Callable:
        return getattr(importlib.import_module(f"ckd_ehr.{self.module}"), self.function)

    def run(self, cfg: PipelineConfig):
        """Run the stage on the view of `cfg` it declares; UndeclaredFileError after it when it
        touched (through ckd_ehr.storage, in this process) a path it does not declare."""
        check_inputs(self, cfg)
        with storage.recording() as touched:
            result = self.function_ref()(stage_config(cfg, self))
        undeclared = undeclared_files(self, cfg, touched)
        if undeclared:
            raise UndeclaredFileError(f"stage {self.name} touched {len(undeclared)} path(s) it does not declare "
                                      f"(ckd_ehr/stages.py: inputs, optional inputs, outputs, caches): "
                                      f"{', '.join(undeclared[:12])}")
        return result

    def declared(self, cfg: PipelineConfig) -> list[str]:
        """Every path the stage declares (inputs, outputs, caches), as storage.canonical writes them."""
        layout = RunLayout(cfg.run_dir)
        return [storage.canonical(p) for p in (*self.inputs(cfg, layout), *self.optional_inputs(cfg, layout),
                                               *self.outputs(cfg, layout), *self.caches(cfg, layout)) if p]


class UndeclaredFileError(RuntimeError):
    """A stage touched a path that is neither its input, its output nor its cache."""


def undeclared_files(stage: Stage, cfg: PipelineConfig, touched: set[str]) -> list[str]:
    """The `touched` paths (storage.canonical) neither declared by `stage` nor under a declared
    directory; the run's manifest and config (the pipeline's, not the stage's) excepted."""
    layout = RunLayout(cfg.run_dir)
    allowed = stage.declared(cfg) + [storage.canonical(layout.manifest), storage.canonical(layout.path("config.yaml"))]
    prefixes = tuple(d.rstrip("/") + "/" for d in allowed)
    return sorted(p for p in touched if p not in allowed and not p.startswith(prefixes))


ALWAYS_READABLE = ("run_dir", "ray")
"""Fields every stage may read: where the run lives and how to reach Ray (neither changes a result)."""


class UndeclaredSectionError(AttributeError):
    """A stage read a config section it does not declare (Stage.sections)."""


class _Undeclared:
    """Stands in a stage's config for a section the stage did not declare: any read raises."""

    def __init__(self, section: str, stage: str):
        object.__setattr__(self, "_where", (section, stage))

    def __getattr__(self, name: str):
        section, stage = object.__getattribute__(self, "_where")
        raise UndeclaredSectionError(
            f"stage {stage} read config section '{section}' ({section}.{name}), which it does not declare: "
            f"add '{section}' to its sections in ckd_ehr/stages.py, so --resume reruns it when {section} changes")

    def __repr__(self) -> str:
        section, stage = object.__getattribute__(self, "_where")
        return f"<config section {section!r}: not declared by stage {stage}>"


class _Partial:
    """A section of which a stage declares some fields: those read through, the others raise."""

    def __init__(self, section, name: str, fields: set[str], stage: str):
        object.__setattr__(self, "_parts", (section, name, fields, stage))

    def __getattr__(self, field: str):
        section, name, fields, stage = object.__getattribute__(self, "_parts")
        if field in fields:
            return getattr(section, field)
        raise UndeclaredSectionError(
            f"stage {stage} read {name}.{field}, which it does not declare (it declares "
            f"{', '.join(sorted(name + '.' + f for f in fields))}): add it to its sections in ckd_ehr/stages.py")


def stage_config(cfg: PipelineConfig, stage: Stage) -> PipelineConfig:
    """`cfg` as `stage` may see it: its declared sections and fields (and ALWAYS_READABLE); every
    other section is a stand-in whose reads raise UndeclaredSectionError naming it and the stage."""
    whole = set(stage.sections) | set(ALWAYS_READABLE)
    fields: dict[str, set[str]] = {}
    for entry in stage.sections:
        if "." in entry:
            section, field = entry.split(".", 1)
            fields.setdefault(section, set()).add(field)
    values = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if name in whole or not isinstance(value, BaseModel):
            values[name] = value
        elif name in fields:
            values[name] = _Partial(value, name, fields[name], stage.name)
        else:
            values[name] = _Undeclared(name, stage.name)
    return type(cfg).model_construct(**values)


class StageInputError(ValueError):
    """A stage's input is missing or empty; the message names the file and the stage that makes it."""


def _made_by(path: str, cfg: PipelineConfig, layout: RunLayout) -> str:
    for s in STAGES:
        if path in s.outputs(cfg, layout):
            return f"; it is made by stage {s.name} (`ckd-ehr {s.command}`)"
    return ""


def check_inputs(stage: Stage, cfg: PipelineConfig) -> None:
    """StageInputError, in one line, when an input of `stage` is missing, or is a sample table
    (prepare's or EADF's split of a fraction above 0) with no row: the stage would otherwise
    fail later inside its workers, or succeed on nothing. prepare's own input (the MIMIC
    directory) is checked by prepare."""
    if stage.name == "prepare":
        return
    layout = RunLayout(cfg.run_dir)
    needs_rows = {f(split) for split in SPLITS if getattr(cfg.split, split) > 0
                  for f in (layout.samples, layout.augmented)}
    for path in stage.inputs(cfg, layout):
        if not path:
            continue
        if not storage.exists(path):
            raise StageInputError(f"stage {stage.name}: input {path} is missing{_made_by(path, cfg, layout)}")
        if path in needs_rows and storage.parquet_num_rows(path) == 0:
            raise StageInputError(f"stage {stage.name}: input {path} is empty (0 rows){_made_by(path, cfg, layout)}: "
                                  f"run it again and read its report")


def _variants(cfg: PipelineConfig) -> list[str]:
    return list(cfg.student.variants)


def _needs(cfg: PipelineConfig, source: str) -> bool:
    """Whether a trained variant distils from soft labels of `source` (contracts.SOFT_LABEL_SOURCES)."""
    return any(student_variant(v).distills and student_variant(v).soft_labels == source for v in cfg.student.variants)


def _synthetic(c: PipelineConfig, paths: list[str]) -> list[str]:
    """`paths` for a synthetic cohort (the generator's files under RUN/raw), none for MIMIC."""
    return paths if c.data.source == "synthetic" else []


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "data.prepare", "run_prepare", ("data", "split", "text", "seed"),
          lambda c, r: [c.data.mimic_dir] if c.data.source == "mimic" else [],
          lambda c, r: [r.visits] + [r.samples(s) for s in SPLITS] + [r.prepare_report] + _synthetic(c, [r.raw_dir]),
          "MIMIC-III or MIMIC-IV tables -> visits, visit-pair samples, patient split",
          lambda c, r: [r.write_probe]),
    Stage("eadf", "eadf.run", "run_eadf", ("eadf", "text"),
          lambda c, r: [r.samples(s) for s in SPLITS] + _synthetic(c, [r.ground_truth]),
          lambda c, r: [r.efficacy_table] + [r.augmented(s) for s in SPLITS] + _synthetic(c, [r.eadf_validity]),
          "EADF: efficacy table on training pairs, fused into every split's text (Ray Data)"),
    Stage("teacher", "teacher.run", "run_teacher", ("teacher",),
          lambda c, r: [r.augmented("train"), r.augmented("val")],
          lambda c, r: [r.teacher_artifact],
          "train the teacher LLM with LoRA + MLAPH (Ray Train, ddp or DeepSpeed)",
          lambda c, r: [r.teacher_train, r.teacher_probe_features, c.teacher.frozen_cache_dir or r.teacher_frozen_cache]),
    Stage("soft_labels", "soft_labels.run", "run_soft_labels",
          # the student's fields that say which rows it reads (soft_labels.rows: student)
          ("soft_labels", "text", "student.max_train_samples", "student.max_eval_samples", "student.seed"),
          lambda c, r: [r.teacher_artifact] + [r.augmented(s) for s in SPLITS],
          lambda c, r: [r.soft_labels(s) for s in SPLITS] + [r.soft_label_quality]
          + ([r.unit_targets(s) for s in SPLITS] if c.soft_labels.unit_targets else []),
          "teacher probabilities for every sample (Ray Data batch inference)",
          # what the teacher cached of its rows (its probe's features, its frozen layers' states);
          # the subsets of rows it scores when not whole splits
          lambda c, r: [r.teacher_probe_features, c.teacher.frozen_cache_dir or r.teacher_frozen_cache,
                        r.scoring_subsets]),
    Stage("student", "student.run", "run_student", ("student", "text", "eadf", "data", "split"),
          lambda c, r: [r.efficacy_table] + [r.augmented(s) for s in SPLITS] + [r.soft_labels(s) for s in SPLITS]
          + [r.soft_labels("train", source) for source in SIDE_TEACHERS if _needs(c, source)]
          + ([r.raw_dir] if _needs(c, "oracle") else [])   # the generator's latent oracle
          + ([r.unit_targets("train")] if c.soft_labels.unit_targets else [])   # the unit terms' targets
          + [r.visits],   # the titles and items the artifact records for Serve
          lambda c, r: [r.student_artifact(v) for v in _variants(c)] + [r.predictions(v) for v in _variants(c)]
          + ([r.soft_labels(s, "oracle") for s in ("train", "val")] if _needs(c, "oracle") else []),
          "train the student variants (Ray Train)",
          lambda c, r: [r.student_train(v) for v in _variants(c)]
          + [r.probe_features, c.student.frozen_cache_dir or r.student_frozen_cache]),
    Stage("evaluate", "evaluation.evaluate", "run_evaluate",
          ("evaluate", "serve", "student", "teacher", "eadf", "text", "data", "split"),
          lambda c, r: [r.predictions(v) for v in _variants(c)] + [r.soft_labels("test")]
          + [r.soft_labels("test", t) for t in TEACHER_ROWS if t in SIDE_TEACHERS and _needs(c, t)]
          + [r.path("soft_labels", t) for t in TEACHER_ROWS if t in SIDE_TEACHERS and _needs(c, t)]
          # the probe rows' models and texts; the reference rows' samples; the ceilings' generator
          + [r.teacher_artifact, r.efficacy_table] + [r.student_artifact(v) for v in _variants(c)]
          + [r.samples(s) for s in SPLITS] + [r.augmented(s) for s in SPLITS] + [r.soft_labels("val")]
          + _synthetic(c, [r.raw_dir]),
          lambda c, r: [r.metrics] + ([r.text_fit] if c.eadf.text_fit_report else []),
          "metrics of every student variant and the teacher on the test split",
          # caches: the reference rows kept between runs; the predictions directory, where it
          # writes the reference, probe and served-precision rows beside the student stage's.
          # Optional inputs: the frozen models' states the teacher, soft-label and student stages
          # cached, which the probe rows read.
          caches=lambda c, r: [c.evaluate.reference_dir or r.path("evaluate", "references"), r.predictions_dir],
          optional_inputs=lambda c, r: [c.teacher.frozen_cache_dir or r.teacher_frozen_cache,
                                        c.student.frozen_cache_dir or r.student_frozen_cache]),
    Stage("report", "evaluation.report", "run_report", ("evaluate",),
          lambda c, r: [r.metrics],
          lambda c, r: [r.report_md, r.report_html, r.report_dir],   # the figures beside them
          "Markdown/HTML report with plots from evaluate/metrics.json",
          optional_inputs=lambda c, r: [r.soft_label_quality]),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage called `name` (`soft-labels` and `soft_labels` alike); KeyError names the known ones."""
    for s in STAGES:
        if name.replace("-", "_") == s.name:
            return s
    raise KeyError(f"unknown stage '{name}'; stages are: {', '.join(STAGE_NAMES)}")
