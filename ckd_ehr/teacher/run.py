"""The `teacher` stage: RUN/eadf/samples -> RUN/teacher/artifact (ckd_ehr.teacher.train trains)."""
from __future__ import annotations

from ckd_ehr import storage
from ckd_ehr.config import config_hash
from ckd_ehr.contracts import RunLayout
from ckd_ehr.teacher.train import train_teacher
from ckd_ehr.ray_utils import init_ray


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
