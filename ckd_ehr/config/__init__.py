"""Typed configuration: one class per stage, composed into `PipelineConfig`.

Load with `load_config(PipelineConfig, "jobs/configs/demo.yaml", ["split.seed=7"])`.
"""
from __future__ import annotations

import os

from pydantic import Field, field_validator

from ..storage import is_uri
from .base import ConfigError, Section, apply_overrides, build, config_hash, dump_yaml, load_config, load_yaml
from .data import DataConfig, SplitConfig, TextConfig
from .synth import SynthConfig
from .eadf import EADFConfig
from .ray import RayConfig
from .serve import ServeConfig
from .soft_labels import SoftLabelsConfig
from .evaluate import EvaluateConfig
from .student import DistillConfig, StudentConfig
from .teacher import LoraConfig, TeacherConfig, TrainerConfig
from .tune import TuneConfig


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

    @field_validator("run_dir")
    @classmethod
    def _absolute_run_dir(cls, v: str) -> str:
        # Ray workers run in other working directories: a relative local path would point
        # somewhere else there. URIs are left as they are.
        if not v:
            raise ValueError("run_dir must not be empty")
        return v if is_uri(v) else os.path.abspath(v)


__all__ = [
    "ConfigError", "Section", "PipelineConfig", "DataConfig", "SplitConfig", "SynthConfig", "TextConfig",
    "EADFConfig", "RayConfig", "ServeConfig", "SoftLabelsConfig", "DistillConfig", "EvaluateConfig",
    "StudentConfig", "LoraConfig", "TeacherConfig", "TrainerConfig", "TuneConfig",
    "apply_overrides", "build", "config_hash", "dump_yaml", "load_config", "load_yaml",
]
