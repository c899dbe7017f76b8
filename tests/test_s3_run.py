"""Shared storage: a run directory on S3 (moto on 127.0.0.1). Prepare, EADF and the teacher
run with every file, the Ray Train checkpoints and the artifact going through pyarrow.fs, as
on a multi-node cluster where workers share no disk."""
from __future__ import annotations

import pyarrow.fs as pafs
from helpers.pipeline_configs import small_pipeline_config

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import SPLITS, RunLayout
from ckd_ehr.pipeline import run_pipeline
from ckd_ehr.teacher import load_teacher


def test_stages_and_train_checkpoints_on_s3(s3_bucket, ray_local, tiny_qwen_dir, tiny_bert_dir, tmp_path):
    run_dir = f"{s3_bucket}/runs/s3-test-{tmp_path.name}"
    cfg = build(PipelineConfig, small_pipeline_config(run_dir, tiny_qwen_dir, tiny_bert_dir, patients=80))
    manifest = run_pipeline(cfg, to_stage="teacher")
    assert [manifest["stages"][s]["status"] for s in ("prepare", "eadf", "teacher")] == ["done"] * 3
    layout = RunLayout(run_dir)
    for split in SPLITS:
        assert storage.read_parquet(layout.augmented(split)).num_rows == \
            storage.read_parquet(layout.samples(split)).num_rows
    # Ray Train wrote its checkpoints to the bucket.
    fs, inner = storage.resolve(layout.teacher_train)
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))]
    assert any("checkpoint_" in f and f.endswith("trainable.safetensors") for f in files), files[:20]
    # The artifact loads from the URI, without Ray or DeepSpeed in the loop.
    model, tok, meta = load_teacher(layout.teacher_artifact)
    assert meta["artifact_id"] and len(meta["label_names"]) == 25
    assert storage.exists(layout.manifest)
