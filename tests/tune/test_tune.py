"""Ray Tune: a 2-trial student search on tiny models, its report, the best config (loaded
and built into the student's training task), restore; a teacher LoRA search whose trials train
the sampled rank."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build, config_hash, load_config
from ckd_ehr.contracts import RunLayout
from ckd_ehr.student.train import build_student_task
from ckd_ehr.tune.run import run_tune

from helpers.paths import REPO


def test_student_search_report_best_config_and_restore(tiny_run_copy, tmp_path):
    cfg_dict = {**tiny_run_copy,
                "student": {**tiny_run_copy["student"], "epochs": 2, "max_steps": None,
                            "max_train_samples": 32, "max_eval_samples": 24, "variants": ["ckd_ehr"]},
                "tune": {"scheduler": "asha", "grace_period": 1, "cpus_per_trial": 0.5,
                         "metric": "val_macro_auroc", "max_concurrent_trials": 2}}
    cfg = build(PipelineConfig, cfg_dict)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"target": "student", "metric": "val_macro_auroc", "params": {
        "student.distill.alpha": {"uniform": [0.5, 1.0]},
        "student.distill.schedule": {"choice": ["constant", "linear", "cosine", "curriculum"]},
        "student.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}))
    exp = str(tmp_path / "exp")
    # Two trials, run at once: each is a Ray Train fit (~25 s of start-up on 2 cores), and two
    # show what a search shows (the report across trials, the best of them, the restore).
    summary = run_tune(cfg, str(space), num_samples=2, experiment_dir=exp)
    assert summary["trials"] == 2 and summary["errors"] == 0

    # As a user runs it: a fresh process with no Ray running, a relative path.
    done = subprocess.run([sys.executable, "-m", "ckd_ehr", "tune-report", "exp"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((Path(exp) / "report" / "summary.json").read_text())
    trials = pd.read_csv(Path(exp) / "report" / "trials.csv")
    assert len(trials) == 2
    assert trials["best_val_macro_auroc"].notna().all()
    # The noise floor: each trial against the best on the same validation rows (0 for the best).
    assert trials["vs_best_auroc_delta"].notna().all() and (trials["vs_best_auroc_delta"] <= 1e-12).all()
    assert (trials["vs_best_auroc_low"] <= trials["vs_best_auroc_delta"]).all()
    assert "other trials cannot be told from the best" in report["noise_floor"]
    # Under head_init probe the probe's report (step 0) comes first: max_t counts it, so a trial
    # trains its epochs instead of ending at its probe (it did: ASHA stopped every 1-epoch trial
    # there). The best trial runs to the end; early stopping is recorded against max_t.
    search = json.loads((Path(exp) / "search.json").read_text())
    assert cfg.student.head_init == "probe" and search["max_t"] == 3
    assert trials["iterations"].max() == 3
    assert (trials["stopped_early"] == ((trials["status"] == "TERMINATED") & (trials["iterations"] < 3))).all()
    assert report["stopped_early"] == int(trials["stopped_early"].sum())
    assert (Path(exp) / "report" / "student_distill_alpha.png").exists()
    assert (Path(exp) / "report" / "student_distill_schedule.png").exists()
    # TensorBoard event files for the dashboard.
    assert list(Path(exp).rglob("events.out.tfevents*"))

    # The best configuration is a pipeline config, accepted unchanged, with the best params.
    best_file = Path(exp) / "report" / "best_config.yaml"
    assert best_file.read_text().startswith("# How to run: ckd-ehr pipeline")
    best = load_config(PipelineConfig, best_file)
    top = trials.sort_values("best_val_macro_auroc", ascending=False).iloc[0]
    assert best.student.distill.schedule == top["student.distill.schedule"]
    assert abs(best.student.distill.alpha - top["student.distill.alpha"]) < 1e-9
    assert best.run_dir == cfg.run_dir

    # ... and drives the student stage: its training task builds from it (the trials trained
    # through this same function; the tiny run trains the stage itself through Ray Train).
    built = build_student_task(best, "ckd_ehr")
    assert built.task.loss_fn.cfg.alpha == best.student.distill.alpha
    assert len(built.prep.splits["train"]) == 32

    # Restore the experiment from its directory: nothing left to run, same trials.
    again = run_tune(cfg, str(space), experiment_dir=exp, resume=True)
    assert again["trials"] == 2
    assert storage.exists(str(Path(exp) / "search.json"))

    # Trials are keyed on what they read: their Train runs are named by the inputs' fingerprints,
    # and a resume after an input changed is refused (its trials would be compared with trials
    # of other data), naming the file.
    soft = RunLayout(cfg.run_dir).soft_labels("train")
    assert search["inputs"][soft] == storage.fingerprint(soft)
    assert {p.name for p in Path(exp, "train").glob("*/train-*")} == {f"train-{config_hash(search['inputs'])}"}
    storage.write_parquet(storage.read_parquet(soft), soft)   # same rows, written again
    with pytest.raises(ValueError, match=re.escape(f"{soft} changed since this search started")):
        run_tune(cfg, str(space), experiment_dir=exp, resume=True)


def test_search_without_soft_labels_says_what_to_run(tmp_path):
    cfg = build(PipelineConfig, {"run_dir": str(tmp_path / "empty")})
    try:
        run_tune(cfg, str(REPO / "tune_spaces" / "student_distill.yaml"), num_samples=1)
    except FileNotFoundError as exc:
        assert "--to soft_labels" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_teacher_lora_search_trains_the_sampled_rank(tiny_run_copy, tmp_path):
    """Two teacher trials through the pipeline's teacher code: each trains LoRA at its sampled
    rank with alpha = rank * alpha_over_rank, and the best config carries both. Each trial
    fails once (an injected error at step 1, with no Train-level retries) and Tune retries it."""
    from safetensors.torch import load_file

    cfg_dict = {**tiny_run_copy,
                "teacher": {**tiny_run_copy["teacher"], "epochs": 2, "max_steps": None,
                            "max_train_samples": 16, "max_eval_samples": 16,
                            "fail_at_step": 1, "max_failures": 0},
                "tune": {"scheduler": "fifo", "cpus_per_trial": 0.5, "metric": "val_macro_auroc",
                         "max_failures": 1}}
    cfg = build(PipelineConfig, cfg_dict)
    space = tmp_path / "teacher.yaml"
    space.write_text(yaml.safe_dump({"target": "teacher", "params": {
        "teacher.lora.rank": {"grid_search": [2, 4]},
        "teacher.lora.alpha_over_rank": {"choice": [3]},
        "teacher.lr": {"loguniform": [1.0e-4, 1.0e-2]}}}))
    exp = tmp_path / "exp"
    summary = run_tune(cfg, str(space), num_samples=1, experiment_dir=str(exp))
    assert summary["trials"] == 2 and summary["errors"] == 0

    trials = pd.read_csv(exp / "report" / "trials.csv")
    assert sorted(trials["teacher.lora.rank"]) == [2, 4]
    assert (trials["iterations"] == 2).all()   # FIFO: every trial runs its 2 epochs
    assert (trials["failures"] == 1).all() and (trials["status"] == "TERMINATED").all()
    assert trials["best_val_macro_auroc"].notna().all()
    # Each trial's checkpoint holds LoRA matrices of the rank it sampled.
    for rank, trial_id in zip(trials["teacher.lora.rank"], trials["trial_id"]):
        weights = sorted((exp / "train" / trial_id).rglob("trainable.safetensors"))
        assert weights, f"no checkpoint for trial {trial_id}"
        lora_a = [t for k, t in load_file(str(weights[-1])).items() if "lora_A" in k]
        assert lora_a and all(t.shape[0] == rank for t in lora_a)
    assert (exp / "report" / "teacher_lora_rank.png").exists()

    best = load_config(PipelineConfig, exp / "report" / "best_config.yaml")
    assert best.teacher.lora.rank in (2, 4)
    assert best.teacher.lora.alpha == 3 * best.teacher.lora.rank


def test_noise_floor_tells_trials_apart_only_beyond_validation_noise(tmp_path):
    """tune-report's noise floor: each trial's validation macro AUROC against the best trial's,
    from the scores its checkpoints keep, with a paired bootstrap interval. A copy of the best
    is indistinguishable (delta 0); a trial scoring noise is clearly worse; a trial that
    validated other rows voids the comparison (it would compare different things)."""
    import numpy as np

    from ckd_ehr.tune.run import noise_floor

    rng = np.random.default_rng(0)
    y = (rng.random((120, 25)) < 0.3).astype(np.int8)
    signal = np.where(y == 1, 1.5, -1.5) + rng.normal(0, 1.0, y.shape)

    def trial(name, logits, labels=y, step=0):
        d = tmp_path / "exp" / "train" / name / "train" / f"checkpoint_{step}"
        d.mkdir(parents=True)
        np.save(d / "val_logits.npy", logits.astype(np.float32))
        np.save(d / "val_labels.npy", labels.astype(np.float32))

    trial("best", signal)
    trial("best", signal - 10 * rng.random(y.shape), step=1)   # a worse later checkpoint: the best one counts
    trial("copy", signal)
    trial("noise", rng.normal(0, 1, y.shape))
    floor, note = noise_floor(str(tmp_path / "exp"), ["best", "copy", "noise", "never_validated"], resamples=100)
    assert set(floor) == {"best", "copy", "noise"}
    assert floor["copy"]["delta"] == 0 and floor["copy"]["low"] <= 0 <= floor["copy"]["high"]
    assert floor["noise"]["delta"] < -0.3 and floor["noise"]["high"] < 0
    assert "1 of 2 other trials cannot be told from the best" in note

    trial("other_rows", signal[::-1], labels=y[::-1])
    floor, note = noise_floor(str(tmp_path / "exp"), ["best", "other_rows"], resamples=10)
    assert floor == {} and "different rows" in note
