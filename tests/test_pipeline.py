"""The pipeline runner: manifest, --resume, --from/--to, and failures that name the stage."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

from ckd_ehr import storage
from ckd_ehr.cli import main
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import SPLITS, TEACHER_META, RunLayout
from ckd_ehr.pipeline import PipelineError, run_pipeline

from helpers.pipeline_configs import small_pipeline_config


@pytest.fixture()
def cfg_dict(tmp_path, tiny_qwen_dir, tiny_bert_dir):
    return small_pipeline_config(str(tmp_path / "run"), tiny_qwen_dir, tiny_bert_dir)


def test_data_stages_resume_and_rerun_on_change(cfg_dict, ray_local):
    cfg = build(PipelineConfig, cfg_dict)
    layout = RunLayout(cfg.run_dir)
    manifest = run_pipeline(cfg, to_stage="eadf")
    stages = manifest["stages"]
    assert [stages[s]["status"] for s in ("prepare", "eadf")] == ["done", "done"]
    assert "teacher" not in stages
    rows = stages["prepare"]["outputs"][layout.samples("train")]["rows"]
    assert rows == storage.read_parquet(layout.samples("train")).num_rows > 0
    assert manifest["versions"]["ray"].startswith("2.60")
    # every stage records the code it ran at, read at run time (the study compares them)
    from ckd_ehr.provenance import code_state

    assert stages["eadf"]["code"] == code_state() and len(stages["prepare"]["code"]["commit"] or "x" * 40) == 40

    again = run_pipeline(cfg, resume=True, to_stage="eadf")
    assert again["stages"]["prepare"]["skipped"] and again["stages"]["eadf"]["skipped"]

    # A changed EADF setting reruns EADF only.
    cfg2 = build(PipelineConfig, {**cfg_dict, "eadf": {**cfg_dict["eadf"], "top_k": 3}})
    third = run_pipeline(cfg2, resume=True, to_stage="eadf")
    assert third["stages"]["prepare"]["skipped"] and not third["stages"]["eadf"]["skipped"]
    assert third["stages"]["eadf"]["config_hash"] != again["stages"]["eadf"]["config_hash"]


def test_changed_eadf_text_retrains_the_teacher(cfg_dict, ray_local):
    """The teacher's run name carries its input files' fingerprints: after EADF reruns, --resume
    starts a fresh teacher run instead of resuming the old one's checkpoints (issue 43: it once
    "resumed" at the old run's last step and never trained on the new text)."""
    cfg = build(PipelineConfig, cfg_dict)
    layout = RunLayout(cfg.run_dir)
    run_pipeline(cfg, to_stage="teacher")
    first = set(os.listdir(layout.teacher_train))
    cfg2 = build(PipelineConfig, {**cfg_dict, "eadf": {**cfg_dict["eadf"], "top_k": 3}})
    manifest = run_pipeline(cfg2, resume=True, to_stage="teacher")
    assert not manifest["stages"]["eadf"]["skipped"] and not manifest["stages"]["teacher"]["skipped"]
    runs = set(os.listdir(layout.teacher_train))
    assert len(first) == 1 and len(runs - first) == 1, (first, runs)
    meta = storage.read_json(storage.join(layout.teacher_artifact, TEACHER_META))
    assert meta["metrics"]["resumed_from_step"] == -1


def test_failing_stage_is_named_and_earlier_outputs_survive(cfg_dict, ray_local, tmp_path):
    cfg = build(PipelineConfig, cfg_dict)
    layout = RunLayout(cfg.run_dir)
    run_pipeline(cfg, to_stage="eadf")
    before = {s: storage.read_parquet(layout.augmented(s)).num_rows for s in SPLITS}
    broken = build(PipelineConfig, {**cfg_dict, "teacher": {**cfg_dict["teacher"], "model": str(tmp_path / "no-model")}})
    with pytest.raises(PipelineError, match="stage teacher failed"):
        run_pipeline(broken, resume=True, to_stage="teacher")
    manifest = storage.read_json(layout.manifest)
    assert manifest["stages"]["teacher"]["status"] == "failed"
    assert "no-model" in manifest["stages"]["teacher"]["error"]
    assert manifest["stages"]["eadf"]["status"] == "done"
    assert {s: storage.read_parquet(layout.augmented(s)).num_rows for s in SPLITS} == before


def test_missing_inputs_and_bad_ranges_are_errors(cfg_dict, tmp_path, capsys):
    cfg = build(PipelineConfig, cfg_dict)
    with pytest.raises(PipelineError, match="input.*missing"):
        run_pipeline(cfg, from_stage="student")
    with pytest.raises(PipelineError, match="unknown stage 'nope'"):
        run_pipeline(cfg, from_stage="nope")
    # Through the CLI: one line, non-zero exit.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict))
    assert main(["pipeline", "--config", str(cfg_file), "--from", "report", "--to", "prepare"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "comes after" in err[0]


def test_cli_pipeline_and_jobs_share_one_stage_registry():
    """One registry (ckd_ehr/stages.py): the pipeline runs its stages in its order, the CLI has
    one subcommand per stage calling the stage's function, and jobs/ holds one entrypoint."""
    import argparse
    from pathlib import Path

    from ckd_ehr import pipeline, stages
    from ckd_ehr.cli import build_parser

    assert pipeline.STAGES is stages.STAGES
    assert stages.STAGE_NAMES == ("prepare", "eadf", "teacher", "soft_labels", "student", "evaluate", "report")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for stage in stages.STAGES:
        assert stage.command in sub.choices, stage.command
        assert callable(stage.function_ref()), stage   # the module and function exist
        args = build_parser().parse_args([stage.command])
        assert args.handler.__closure__ and any(c.cell_contents is stage for c in args.handler.__closure__)
    assert stages.stage("soft-labels") is stages.stage("soft_labels")
    with pytest.raises(KeyError, match="stages are"):
        stages.stage("teach")
    repo = Path(__file__).resolve().parents[1]
    assert sorted(p.name for p in (repo / "jobs").glob("*.py")) == ["run.py"]


def _running_record(owner: dict, started: float) -> dict:
    return {"status": "running", "started_s": started, "owner": owner, "config_hash": "x", "inputs": {}}


def test_a_stage_whose_process_ended_is_reported_failed_and_a_live_one_stops_the_run(cfg_dict, tmp_path, capsys,
                                                                                     monkeypatch):
    """No Ray: the owner's host and pid. A stage marked running by a process that has ended
    (killed: it could not write) is failed in `status` and settled as failed before a run; one
    whose process still runs stops the next run instead of letting two write the same files."""
    import socket
    import subprocess
    import sys
    import time

    from ckd_ehr.pipeline import read_manifest, settle_abandoned

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = build(PipelineConfig, cfg_dict)
    layout = RunLayout(cfg.run_dir)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"host": socket.gethostname(), "pid": int(ended.stdout), "job_submission_id": None}
    storage.write_json(layout.manifest, {"stages": {
        "prepare": {"status": "done", "seconds": 1.0},
        "eadf": _running_record(dead, time.time() - 60)}})
    assert main(["status", "--run-dir", cfg.run_dir]) == 0
    out = capsys.readouterr().out
    eadf_line = [ln for ln in out.splitlines() if ln.startswith("eadf")][0]
    assert "failed" in eadf_line and f"process {dead['pid']}" in eadf_line and "has ended" in eadf_line
    assert read_manifest(layout)["stages"]["eadf"]["status"] == "running"   # status only reads
    manifest = read_manifest(layout)
    settle_abandoned(manifest, layout)
    assert read_manifest(layout)["stages"]["eadf"]["status"] == "failed"
    assert "abandoned" in read_manifest(layout)["stages"]["eadf"]["error"]

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {"host": socket.gethostname(), "pid": sleeper.pid, "job_submission_id": None}
        manifest["stages"]["eadf"] = _running_record(alive, time.time())
        with pytest.raises(PipelineError, match="stage eadf is still running"):
            settle_abandoned(manifest, layout)
    finally:
        sleeper.kill()
    # this very process: an earlier run in it was interrupted (Ctrl-C), it is not running now
    manifest["stages"]["eadf"] = _running_record({**alive, "pid": os.getpid()}, time.time())
    settle_abandoned(manifest, layout)
    assert read_manifest(layout)["stages"]["eadf"]["status"] == "failed"


def test_a_stage_of_a_stopped_ray_job_is_reported_failed(cfg_dict, ray_cluster, tmp_path, capsys):
    """The pipeline submitted as a Ray job and stopped (`ray job stop`) while its teacher trains:
    the job cannot write on its way out, so the manifest still says running; `status` asks Ray
    about the owner's job and reports the stage failed, and the next run marks it so."""
    import time

    import yaml as _yaml

    from ckd_ehr.pipeline import read_manifest, settle_abandoned, ray_job_status
    from helpers.ray_head import job_cli, submit_job

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(_yaml.safe_dump({**cfg_dict, "ray": {}}))   # the job joins the cluster
    layout = RunLayout(cfg_dict["run_dir"])
    job = submit_job(ray_cluster, [sys.executable, "jobs/run.py", "pipeline", "--config", str(cfg_file),
                                   "--to", "teacher"])
    deadline = time.time() + 300
    while time.time() < deadline:
        stages = read_manifest(layout)["stages"] if storage.exists(layout.manifest) else {}
        if stages.get("teacher", {}).get("status") == "running":
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the teacher never started: {job_cli(ray_cluster, 'logs', job)[-3000:]}")
    assert stages["teacher"]["owner"]["job_submission_id"] == job
    job_cli(ray_cluster, "stop", job)
    while ray_job_status(job) not in {"STOPPED", "FAILED", "SUCCEEDED"} and time.time() < deadline:
        time.sleep(1)
    assert read_manifest(layout)["stages"]["teacher"]["status"] == "running"   # nobody wrote it
    capsys.readouterr()
    assert main(["status", "--run-dir", cfg_dict["run_dir"]]) == 0
    teacher_line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("teacher")][0]
    assert "failed" in teacher_line and f"Ray job {job} is STOPPED" in teacher_line
    manifest = read_manifest(layout)
    settle_abandoned(manifest, layout, ray_job_status)
    assert read_manifest(layout)["stages"]["teacher"]["status"] == "failed"


def test_a_relative_run_dir_under_a_ray_job_is_refused(monkeypatch, capsys):
    """Ray's job supervisor marks a job's entrypoint with its JobConfig (metadata: the submission
    id); there a relative run_dir would land in the job's temporary working directory."""
    import json

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}}))
    assert main(["pipeline", "--config", "jobs/configs/demo.yaml", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "'run_dir' = \"runs/demo\"" in err and "relative under `ray job submit`" in err and "s3://" in err and "demo.yaml" in err
    assert main(["pipeline", "--config", "jobs/configs/demo.yaml", "--run-dir", "/tmp/x", "--dry-run"]) == 0
