"""Ray Tune: a 4-trial student search on tiny models, its report, the best config, restore."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build, load_config
from ckd_ehr.tune import run_tune, tune_report

REPO = Path(__file__).resolve().parents[1]


def test_student_search_report_best_config_and_restore(tiny_run_to_soft_labels, tmp_path):
    cfg_dict = {**tiny_run_to_soft_labels,
                "student": {**tiny_run_to_soft_labels["student"], "epochs": 2, "max_steps": None,
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
    summary = run_tune(cfg, str(space), num_samples=4, experiment_dir=exp)
    assert summary["trials"] == 4 and summary["errors"] == 0

    report = tune_report(exp)
    trials = pd.read_csv(Path(exp) / "report" / "trials.csv")
    assert len(trials) == 4
    assert trials["best_val_macro_auroc"].notna().all()
    # Early stopping is recorded: a trial stopped by ASHA ran fewer iterations than max_t (2).
    assert (trials["stopped_early"] == ((trials["status"] == "TERMINATED") & (trials["iterations"] < 2))).all()
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

    # Restore the experiment from its directory: nothing left to run, same trials.
    again = run_tune(cfg, str(space), experiment_dir=exp, resume=True)
    assert again["trials"] == 4
    assert storage.exists(str(Path(exp) / "search.json"))


def test_search_without_soft_labels_says_what_to_run(tmp_path):
    cfg = build(PipelineConfig, {"run_dir": str(tmp_path / "empty")})
    try:
        run_tune(cfg, str(REPO / "tune_spaces" / "student_distill.yaml"), num_samples=1)
    except FileNotFoundError as exc:
        assert "--to soft_labels" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
