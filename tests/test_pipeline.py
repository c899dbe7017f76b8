"""The pipeline runner: manifest, --resume, --from/--to, and failures that name the stage."""
from __future__ import annotations

import os

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
