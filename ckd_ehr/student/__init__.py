"""The student: an HF encoder + linear head, distilled from the teacher on Ray Train.

    run_student(cfg)            `ckd-ehr student`: every variant -> artifact + test predictions
    load_student(artifact_dir)  -> StudentPredictor (.predict_proba, .thresholds, .efficacy, ...)

Imports are lazy so `import ckd_ehr.student` stays cheap (no torch, no Ray) for the CLI.
"""
from __future__ import annotations


def run_student(cfg):
    # not at module level: pandas, torch, loaded only when this runs
    from ckd_ehr.student.run import run_student as _run

    return _run(cfg)


def load_student(artifact_dir, device: str = "cpu", precision: str = "fp32", compile: bool = False):
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.student.artifact import load_student as _load

    return _load(artifact_dir, device=device, precision=precision, compile=compile)


def __getattr__(name):
    if name == "StudentPredictor":
        # not at module level: imported only on this branch
        from ckd_ehr.student.artifact import StudentPredictor

        return StudentPredictor
    raise AttributeError(name)


__all__ = ["run_student", "load_student", "StudentPredictor"]
