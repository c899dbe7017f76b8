"""Typed configuration: one class per stage, composed into `PipelineConfig`.

Load with `load_config(PipelineConfig, "jobs/configs/demo.yaml", ["split.seed=7"])`.
"""
from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator

from ckd_ehr.storage import is_uri
from ckd_ehr.config.base import ConfigError, Section, apply_overrides, build, config_hash, dump_yaml, load_config, load_yaml
from ckd_ehr.config.data import DataConfig, SplitConfig, TextConfig
from ckd_ehr.config.synth import SynthConfig
from ckd_ehr.config.eadf import EADFConfig
from ckd_ehr.config.ray import RayConfig
from ckd_ehr.config.serve import ServeConfig
from ckd_ehr.config.soft_labels import SoftLabelsConfig
from ckd_ehr.config.evaluate import EvaluateConfig
from ckd_ehr.config.student import DistillConfig, StudentConfig
from ckd_ehr.config.study import StudyConfig
from ckd_ehr.config.teacher import LoraConfig, TeacherConfig, TrainerConfig
from ckd_ehr.config.tune import TuneConfig
from ckd_ehr.contracts import CONTROL_TEXTS, student_variant


class PipelineConfig(Section):
    """Everything one run needs, from tables to served model."""

    run_dir: str = "runs/default"
    """Run directory: a local path or a URI pyarrow.fs understands (s3://, gs://)."""
    seed: int = Field(0)
    """Global seed (each stage also has its own where it matters)."""
    ray: RayConfig = RayConfig()
    """How to reach Ray (local 127.0.0.1 by default)."""
    data: DataConfig = DataConfig()
    """Where the EHR tables come from."""
    split: SplitConfig = SplitConfig()
    """Patient-level train/val/test split."""
    text: TextConfig = TextConfig()
    """How a visit is rendered as text."""
    eadf: EADFConfig = EADFConfig()
    """Efficacy-aware data fusion."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher LLM, its LoRA, head and training."""
    soft_labels: SoftLabelsConfig = SoftLabelsConfig()
    """Teacher batch inference on Ray Data."""
    student: StudentConfig = StudentConfig()
    """The student encoder, distillation loss and training."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation on the test split."""
    tune: TuneConfig = TuneConfig()
    """Ray Tune searches."""
    serve: ServeConfig = ServeConfig()
    """The Ray Serve endpoint."""
    study: StudyConfig = StudyConfig()
    """`ckd-ehr study`: seeds, rows and contrasts (see jobs/configs/synthetic_study.yaml)."""

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, v: str) -> str:
        # Ray workers run in other working directories: a relative local path would point
        # somewhere else there. URIs are left as they are.
        if not v:
            raise ValueError("run_dir must not be empty")
        return v if is_uri(v) else os.path.abspath(v)

    @model_validator(mode="after")
    def _control_variants_have_their_inputs(self):

        for name in self.student.variants:
            v = student_variant(name)
            if v.text_column in CONTROL_TEXTS and not self.eadf.control_texts:
                raise ValueError(f"student.variants has '{name}', which reads {v.text_column}: "
                                 f"set eadf.control_texts: true so that EADF renders it")
            if v.soft_labels == "oracle" and self.data.source != "synthetic":
                raise ValueError(f"student.variants has '{name}' (soft labels from the generator's latent "
                                 f"oracle): only a synthetic cohort has one (data.source is {self.data.source!r})")
        return self

    @model_validator(mode="after")
    def _unit_terms_have_their_targets(self):
        """A student with multi-granularity terms needs the teacher's unit targets: asked of the
        soft-label stage here, and the teacher must be able to give them."""
        weights = {v: self.student.distill.unit_weights(v) for v in self.student.variants}
        if any(label > 0 for label, _ in weights.values()):
            if self.teacher.head != "mlaph" or self.teacher.pooling != "label_attention":
                names = [v for v, (label, _) in weights.items() if label > 0]
                raise ValueError(f"student variant(s) {', '.join(names)} distil label attention: set "
                                 f"teacher.pooling: label_attention (it is {self.teacher.pooling!r}, head "
                                 f"{self.teacher.head!r})")
        if any(rel > 0 for _, rel in weights.values()) and self.soft_labels.relation_layer is None:
            raise ValueError("a student variant distils unit relations: set soft_labels.relation_layer "
                             "(the teacher layer they compare; -1 the last)")
        if any(label > 0 or rel > 0 for label, rel in weights.values()) and not self.soft_labels.unit_targets:
            self.soft_labels = self.soft_labels.model_copy(update={"unit_targets": True})
        return self


__all__ = [
    "ConfigError", "Section", "PipelineConfig", "DataConfig", "SplitConfig", "SynthConfig", "TextConfig",
    "EADFConfig", "RayConfig", "ServeConfig", "SoftLabelsConfig", "DistillConfig", "EvaluateConfig",
    "StudentConfig", "StudyConfig", "LoraConfig", "TeacherConfig", "TrainerConfig", "TuneConfig",
    "apply_overrides", "build", "config_hash", "dump_yaml", "load_config", "load_yaml",
]
