"""The suite's one end-to-end run: the whole pipeline (tiny models, tiny cohort) submitted with
`ray job submit` (the shipped entrypoint and runtime_env) to the session's Ray head, waited on
until it ends. tests/test_jobs.py checks the job and its outputs; the tests that need trained
artifacts (Tune, ...) take copies of what they need instead of training their own.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from helpers.pipeline_configs import small_pipeline_config
from helpers.ray_head import RayHead, job_cli, submit_job

REPO = Path(__file__).resolve().parents[2]


TINY_RUN_VARIANTS = ("hard_eadf", "ckd_ehr", "hard_names", "oracle_distill")


@dataclass
class TinyRun:
    run_dir: Path
    config: dict
    """The pipeline config the job ran (a dict, as written to its YAML)."""
    job_id: str
    status: str
    """SUCCEEDED, FAILED or STOPPED (or "" if it never ended within the deadline)."""
    logs: str


def submit_pipeline_job(head: RayHead, root: Path, teacher_dir: Path, student_dir: Path,
                        deadline_s: float = 900) -> TinyRun:
    run_dir = root / "run"
    cfg = small_pipeline_config(str(run_dir), teacher_dir, student_dir)
    cfg["ray"] = {}   # inside the job: join the job's cluster (RAY_ADDRESS), not a new one
    # Four students, chosen so that one run covers the pipeline and the study's controls
    # (tests/study/test_study_controls.py): every student is one Ray Train fit (~30 s on 2 cores,
    # mostly process start-up), so the suite trains each kind once. hard_eadf / ckd_ehr are the
    # primary hard and distilled students; hard_names (a control text column, which needs
    # control_texts) and oracle_distill (soft labels from another source) exercise what the
    # remaining variants vary: hard_plain and distill_plain differ from them only in the column.
    cfg["eadf"] = {**cfg["eadf"], "control_texts": True}
    cfg["student"] = {**cfg["student"], "variants": list(TINY_RUN_VARIANTS)}
    # Multi-granularity distillation (tests/student/test_multigranularity.py): a label-attention teacher
    # (probe start: zero queries) whose soft-label stage also writes the unit targets, and a
    # ckd_ehr student trained on all three terms; oracle_distill (oracle soft labels) has none.
    cfg["teacher"] = {**cfg["teacher"], "pooling": "label_attention"}
    cfg["student"]["distill"] = {"label_attention": 1.0, "relation": 1.0}
    # the students keep their last step, as the multi-granularity study's do: a kept probe would
    # carry none of the terms (and leave checkpoint choice to chance on a tiny random model)
    cfg["student"]["keep_checkpoint"] = "last"
    cfg["evaluate"] = {**cfg["evaluate"], "baseline": "hard_eadf"}   # paired deltas against a model the run has
    cfg_file = root / "job.yaml"   # same machine: the job reads it by absolute path
    cfg_file.write_text(yaml.safe_dump(cfg))
    job_id = submit_job(head, [sys.executable, "jobs/run.py", "pipeline", "--config", str(cfg_file)])

    # Polled through the CLI against this head's dashboard, as a user would.
    end = time.time() + deadline_s
    status = ""
    while time.time() < end:
        # `ray job status` ends with "Job '<id>' succeeded" / "... failed" / "... was stopped"
        # once the job is over, and names the status in capitals while it runs.
        text = job_cli(head, "status", job_id)
        done = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
        found = re.findall(r"\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b", text)
        if done:
            status = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[done.group(1)]
        else:
            status = found[-1] if found else ""
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(5)   # each `ray job status` is a Python process importing Ray: ~1.5 s of CPU
    return TinyRun(run_dir=run_dir, config=cfg, job_id=job_id, status=status, logs=job_cli(head, "logs", job_id))


# What a test may copy out of the shared run: the inputs of the stages after soft labels.
TO_SOFT_LABELS = ("manifest.json", "raw/ground_truth.json", "raw/latent_oracle.parquet", "data", "eadf",
                  "teacher/artifact", "soft_labels")


def copy_run(src: Path, dst: Path, parts: tuple[str, ...] = TO_SOFT_LABELS) -> Path:
    """A private copy of parts of a finished run, for a test that writes into its run directory."""
    for part in parts:
        s, d = src / part, dst / part
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)
    return dst
