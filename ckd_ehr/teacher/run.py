"""The `teacher` stage: RUN/eadf/samples -> RUN/teacher/artifact. The task is built in
ckd_ehr.teacher.train (as the student's in ckd_ehr.student.train); this module trains it on Ray
Train, keeps the checkpoint validation picks and writes the artifact (as ckd_ehr.student.run)."""
from __future__ import annotations

import logging
import time

from ckd_ehr import storage
from ckd_ehr.config import config_hash
from ckd_ehr.contracts import RunLayout
from ckd_ehr.modeling.prompts import load_tokenizer
from ckd_ehr.ray_utils import init_ray
from ckd_ehr.teacher.artifact import write_artifact
from ckd_ehr.teacher.train import read_texts_and_labels, teacher_task
from ckd_ehr.training import TrainResult, fit

log = logging.getLogger("ckd_ehr.teacher")


def train_teacher(tc, train_path: str, val_path: str, storage_path: str, name: str,
                  artifact_dest: str, feature_cache: str | None = None,
                  frozen_cache: str | None = None) -> tuple[TrainResult, dict]:
    """Train on Ray Train and write the artifact from the best checkpoint. Returns
    (TrainResult, teacher.json). `feature_cache`: where head_init probe keeps the frozen
    backbone's features; `frozen_cache`: where train_top_layers keeps the frozen layers' states
    (None: nowhere)."""
    tokenizer = load_tokenizer(tc)
    task = teacher_task(tc, train_path, val_path, tokenizer, feature_cache, frozen_cache)
    start = time.time()
    result = fit(tc, task, storage_path=storage_path, name=name)
    wall = time.time() - start
    metrics = {k: v for k, v in result.kept_metrics.items() if isinstance(v, (int, float, str))}
    metrics.update({"train_wall_s": round(wall, 2), "final_step": result.metrics.get("step"), "curve": result.curve,
                    "stopped_early": bool(result.metrics.get("stopped_early", False)),
                    "train_samples_per_s": result.metrics.get("samples_per_s"),
                    "kept_checkpoint_path": str(result.kept_checkpoint.path),
                    "strategy": result.metrics.get("strategy", tc.strategy), "num_workers": tc.num_workers})
    # Measurements of the whole run (the last report), whichever checkpoint was best.
    for key in ("train_padding_efficiency", "worker_peak_rss_mib", "worker_build_peak_rss_mib",
                "worker_start_rss_mib", "local_param_fraction", "zero_stage", "auto_estimate_gib", "auto_device_gib"):
        if key in result.metrics:
            metrics[key] = result.metrics[key]
    with result.kept_checkpoint.as_directory() as d:
        calibration = None
        if tc.head == "generative":   # scores -> probabilities, fitted on validation (driver, no Ray)
            # not at module level: imported only on this branch
            from ckd_ehr.teacher.generative import fit_calibration

            texts, labels = read_texts_and_labels(val_path, tc.text_column)
            n = min(len(texts), tc.max_eval_samples or len(texts))
            calibration, val_metrics = fit_calibration(tc, str(d), tokenizer, texts[:n], labels[:n])
            metrics.update(val_metrics)
        meta = write_artifact(d, tokenizer, tc, metrics, artifact_dest, calibration=calibration)
    log.info("teacher artifact %s written to %s (best %s=%s)", meta["artifact_id"], artifact_dest,
             tc.best_metric, metrics.get(tc.best_metric))
    return result, meta


def run_teacher(cfg) -> dict:
    """The `teacher` stage: PipelineConfig -> RUN/teacher/artifact. Returns teacher.json."""

    layout = RunLayout(cfg.run_dir)
    train_path, val_path = layout.augmented("train"), layout.augmented("val")
    for p in (train_path, val_path):
        if not storage.exists(p):
            raise FileNotFoundError(f"{p}: no such file (run `ckd-ehr eadf` first)")
    init_ray(cfg.ray)
    # The run name carries the config and the input files: the same ones resume from the last
    # checkpoint (Ray Train resumes a reused name), changed EADF text starts a fresh run.
    name = "teacher-" + config_hash({"teacher": cfg.teacher.model_dump(mode="json"),
                                     "inputs": [storage.fingerprint(p) for p in (train_path, val_path)]})
    _, meta = train_teacher(cfg.teacher, train_path, val_path, layout.teacher_train, name, layout.teacher_artifact,
                            feature_cache=layout.teacher_probe_features,
                            frozen_cache=cfg.teacher.frozen_cache_dir or layout.teacher_frozen_cache)
    return meta
