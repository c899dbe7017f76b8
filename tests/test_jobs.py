"""`ray job submit`: the pipeline submitted as a job to a local Ray head on 127.0.0.1 with the
shipped entrypoint and runtime_env, waited on until SUCCEEDED, outputs checked.

This is also the end-to-end test of the whole pipeline (tiny models, tiny cohort). The job is
the suite's one shared end-to-end run (the `tiny_run` fixture, tests/helpers/tiny_run.py), which the
tests that need trained artifacts reuse."""
from __future__ import annotations

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from helpers.tiny_run import TINY_RUN_VARIANTS, TO_SOFT_LABELS, copy_run


def test_pipeline_submitted_as_a_ray_job(tiny_run):
    assert tiny_run.status == "SUCCEEDED", tiny_run.logs[-5000:]
    assert tiny_run.config["ray"] == {}   # the job joined the cluster it was submitted to
    run_dir = tiny_run.run_dir
    layout = RunLayout(str(run_dir))
    manifest = storage.read_json(layout.manifest)
    assert all(rec["status"] == "done" for rec in manifest["stages"].values()), manifest["stages"]
    assert set(manifest["stages"]) == {"prepare", "eadf", "teacher", "soft_labels", "student", "evaluate", "report"}
    metrics = storage.read_json(layout.metrics)
    assert metrics  # evaluated
    for v in TINY_RUN_VARIANTS:
        assert storage.exists(layout.student_artifact(v))
    assert (run_dir / "report" / "report.html").exists()
    logs = tiny_run.logs
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


def test_evaluate_scores_each_served_student_at_bf16_as_its_own_row(tiny_run, tmp_path):
    """serve.precision: bf16: evaluate scores every served student's artifact at bf16 on the
    test split (`<variant>_bf16`), beside its fp32 row, with probabilities close to fp32's."""
    from ckd_ehr.config import PipelineConfig, build
    from ckd_ehr.evaluation.evaluate import run_evaluate
    from ckd_ehr.metrics import to_matrix

    run_dir = copy_run(tiny_run.run_dir, tmp_path / "run", TO_SOFT_LABELS + ("student", "evaluate"))
    cfg = build(PipelineConfig, {**tiny_run.config, "run_dir": str(run_dir), "serve": {"precision": "bf16"},
                                 "evaluate": {**tiny_run.config["evaluate"], "baselines": False, "probes": False,
                                              "bootstrap": 20}})
    models = run_evaluate(cfg)["models"]
    layout = RunLayout(str(run_dir))
    assert {"hard_eadf_bf16", "ckd_ehr_bf16"} <= set(models)
    assert not any(n.startswith(("hard_names", "oracle_distill")) and n.endswith("_bf16") for n in models)  # controls: not served
    assert models["ckd_ehr_bf16"]["role"].endswith("served at bf16 (serve.precision)")
    for v in ("hard_eadf", "ckd_ehr"):
        p32, p16 = (to_matrix(storage.read_parquet(layout.predictions(n)).column("probs").to_pylist())
                    for n in (v, f"{v}_bf16"))
        assert p32.shape == p16.shape and np.abs(p32 - p16).max() <= 0.02


def test_cli_names_the_cpu_accelerator_for_deepspeed_only_without_cuda(monkeypatch):
    """Without CUDA the CLI sets DS_ACCELERATOR=cpu (DeepSpeed's own warning asks for it) before
    Ray starts; a value already set, or a machine with CUDA, is left alone."""
    import os

    import torch

    from ckd_ehr.cli import quiet_cpu_deepspeed

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quiet_cpu_deepspeed()
    assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quiet_cpu_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    quiet_cpu_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def test_tiny_run_predictions_equal_the_golden_file(tiny_run):
    """Behaviour stays through refactors: the tiny pipeline's test predictions (every student,
    the teacher's soft labels) equal tests/golden/tiny_run_predictions.npz, bitwise on the
    machine that wrote it (tests/helpers/golden.py)."""
    from helpers.golden import compare_with_golden, tiny_run_predictions

    how = compare_with_golden(tiny_run_predictions(tiny_run.run_dir, TINY_RUN_VARIANTS))
    print(f"golden file: {how}")
