"""Small end-to-end configs for the pipeline, job and storage tests (tiny models, tiny cohort)."""
from __future__ import annotations

from pathlib import Path


def small_pipeline_config(run_dir: str, teacher_dir: Path, student_dir: Path, patients: int = 150) -> dict:
    """Every stage, minutes not hours: 150 synthetic patients, tiny random Qwen2 / BERT, a
    few optimiser steps each. Numbers are meaningless; the point is that every stage runs."""
    return {
        "run_dir": str(run_dir),
        "ray": {"num_cpus": 2},
        "data": {"source": "synthetic", "synth": {"patients": patients, "seed": 1}},
        "eadf": {"min_support": 3},
        # The demo's recipe and data path in miniature: linear probe then fine-tune (so evaluate
        # has probe rows), mean pooling, soft labels only for the rows the student reads. Autocast
        # off: `auto` times a step, so a busy machine could flip the choice and the predictions
        # (the golden file, tests/helpers/golden.py, compares them bitwise).
        "teacher": {"model": str(teacher_dir), "gguf_file": None, "num_workers": 1, "cpus_per_worker": 1,
                    "epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-3, "max_length": 128,
                    "max_train_samples": 48, "max_eval_samples": 24, "pooling": "mean", "head_init": "probe",
                    "autocast": "off"},
        "soft_labels": {"batch_size": 16, "num_actors": 1, "cpus_per_actor": 0.5, "rows": "student"},
        "student": {"model": str(student_dir), "num_workers": 1, "cpus_per_worker": 1, "epochs": 1,
                    "max_steps": 3, "batch_size": 8, "lr": 1e-3, "max_length": 128,
                    "max_train_samples": 48, "max_eval_samples": 24, "head_init": "probe",
                    "autocast": "off"},
        "evaluate": {"bootstrap": 20, "allow_small": True},   # 150 patients: too small to judge
    }
