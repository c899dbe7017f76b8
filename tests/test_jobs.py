"""`ray job submit`: a local Ray head on 127.0.0.1, the pipeline submitted as a job with the
shipped entrypoint and runtime_env, waited on until SUCCEEDED, outputs checked, head stopped.

This is also the end-to-end test of the whole pipeline (tiny models, tiny cohort)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_configs import small_pipeline_config
from ray_head import RAY, start_head

from ckd_ehr import storage
from ckd_ehr.contracts import STUDENT_VARIANTS, RunLayout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ray_head():
    """A separate Ray head with the job API (its own temp dir and ports), stopped afterwards."""
    head = start_head(num_cpus=2)
    try:
        yield head.dashboard, head.address, head.env
    finally:
        head.stop()


def test_pipeline_submitted_as_a_ray_job(ray_head, tmp_path, tiny_qwen_dir, tiny_bert_dir, monkeypatch):
    dashboard, _, env = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")   # the job API of a local head wants the token
    run_dir = tmp_path / "run"
    cfg = small_pipeline_config(str(run_dir), tiny_qwen_dir, tiny_bert_dir)
    cfg["ray"] = {}   # inside the job: join the job's cluster (RAY_ADDRESS), not a new one
    cfg_file = tmp_path / "job.yaml"   # same machine: the job reads it by absolute path
    cfg_file.write_text(yaml.safe_dump(cfg))
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--no-wait", "--",
           sys.executable, "jobs/pipeline.py", "--config", str(cfg_file)]
    # The head's job agent registers a little after the dashboard answers: retry while it says so.
    for _ in range(30):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or "No available agent" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)  # output has ANSI colours

    # Poll through the CLI too, against this head only: an in-process JobSubmissionClient
    # would be steered to the session's Ray (RAY_ADDRESS) when the suite runs one.
    def job_cli(*args: str) -> str:
        res = subprocess.run([RAY, "job", *args, "--address", dashboard], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        return re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)   # no ANSI colours

    deadline = time.time() + 900
    status = ""
    while time.time() < deadline:
        # `ray job status` ends with "Job '<id>' succeeded" / "... failed" / "... was stopped"
        # once the job is over, and names the status in capitals while it runs.
        text = job_cli("status", job_id)
        done = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
        found = re.findall(r"\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b", text)
        if done:
            status = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[done.group(1)]
        else:
            status = found[-1] if found else ""
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(5)
    logs = job_cli("logs", job_id)
    assert status == "SUCCEEDED", logs[-5000:]

    layout = RunLayout(str(run_dir))
    manifest = storage.read_json(layout.manifest)
    assert all(rec["status"] == "done" for rec in manifest["stages"].values()), manifest["stages"]
    assert set(manifest["stages"]) == {"prepare", "eadf", "teacher", "soft_labels", "student", "evaluate", "report"}
    metrics = storage.read_json(layout.metrics)
    assert metrics  # evaluated
    for v in STUDENT_VARIANTS:
        assert storage.exists(layout.student_artifact(v))
    assert (run_dir / "report" / "report.html").exists()
    assert "stage" in logs and "report" in logs   # the summary table was printed


def test_tiny_run_has_probe_rows_and_text_fit(tiny_run):
    """The demo's recipe in miniature: evaluate scores each frozen model with the linear probe
    its training started from, and EADF reports how much of each text the models see."""
    layout = RunLayout(str(tiny_run.run_dir))
    metrics = storage.read_json(layout.metrics)
    for name in ("probe_teacher", "probe_student"):
        row = metrics["baselines"][name]
        assert row["role"].startswith("probe") and 0.0 <= row["modes"]["fixed"]["metrics"]["macro_auroc"] <= 1.0
        assert row["details"]["train_samples"] == 48
    fit = storage.read_json(layout.text_fit)
    assert set(fit["splits"]) == {"train", "val", "test"}
    assert all(0.0 <= fit["splits"][s][m]["share_whole"] <= 1.0 for s in fit["splits"] for m in ("teacher", "student"))
    # soft labels only for the rows the student reads (48 of the training split), all of test
    assert storage.read_parquet(layout.soft_labels("train")).num_rows == 48
    assert storage.read_parquet(layout.soft_labels("test")).num_rows == \
        storage.read_parquet(layout.augmented("test")).num_rows
