"""The teacher on real Ray Train with 2 CPU workers: ddp with an injected worker failure,
DeepSpeed ZeRO-2 and ZeRO-3. Each run: 32 short toy samples, max_length 64, a handful of steps;
the artifact must reload without Ray/DeepSpeed and reproduce the checkpoint's validation logits."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig
from ckd_ehr.teacher import load_teacher, predict_logits, run_teacher
from ckd_ehr.bench.toy_samples import write_toy_samples
from ckd_ehr.teacher.train import read_texts_and_labels
from ckd_ehr.training import FAIL_MARKER


def _pipeline(run_dir, tiny_qwen_dir, **teacher) -> PipelineConfig:
    base = dict(model=str(tiny_qwen_dir), gguf_file=None, num_workers=2, cpus_per_worker=1, epochs=1,
                batch_size=4, lr=1e-2, head_lr=1e-2, max_length=64, warmup_ratio=0.0, pooling="last")
    base.update(teacher)
    return PipelineConfig(run_dir=str(run_dir), ray={"num_cpus": 2}, teacher=base)


def _check_artifact(cfg: PipelineConfig, meta: dict) -> None:
    """The artifact reproduces the validation logits of the checkpoint it was made from."""
    from ckd_ehr.contracts import RunLayout

    layout = RunLayout(cfg.run_dir)
    model, tok, loaded = load_teacher(layout.teacher_artifact)
    assert loaded["artifact_id"] == meta["artifact_id"]
    texts, labels = read_texts_and_labels(layout.augmented("val"), "text_eadf")
    got = predict_logits(model, tok, texts, max_length=cfg.teacher.max_length)
    ckpt = meta["metrics"]["kept_checkpoint_path"]
    ref_logits = np.load(storage.join(ckpt, "val_logits.npy"))
    ref_labels = np.load(storage.join(ckpt, "val_labels.npy"))
    np.testing.assert_array_equal(ref_labels, labels)
    np.testing.assert_allclose(got, ref_logits, atol=2e-4)
    for key in ("val_loss", "val_macro_f1", "val_macro_auroc"):
        assert np.isfinite(meta["metrics"][key]), key


def test_ddp_recovers_from_a_worker_failure(ray_local, tmp_path, tiny_qwen_dir):
    write_toy_samples(str(tmp_path), n_train=32, n_val=16)
    # 32 samples / (batch 4 x 2 workers) = 4 steps per epoch, 2 epochs; checkpoint at step 3
    # (and 4, the epoch end); rank 1 dies once at step 5, the run resumes from step 4.
    cfg = _pipeline(tmp_path, tiny_qwen_dir, epochs=2, checkpoint_every_steps=3, fail_at_step=5,
                    max_failures=1, num_checkpoints_to_keep=3, best_metric="val_loss")
    meta = run_teacher(cfg)
    m = meta["metrics"]
    runs = list((tmp_path / "teacher" / "train").glob("teacher-*"))   # named by config and inputs
    assert len(runs) == 1 and (runs[0] / FAIL_MARKER).exists(), "the injected failure did not happen"
    assert m["final_step"] == 8                       # no step lost or repeated across the restart
    assert m["step"] in (4, 8)                        # best checkpoint by val_loss: an epoch end
    assert m["resumed_from_step"] == 4 or m["step"] == 4
    assert m["train_loss"] < 0.8 * m["train_loss_first"], (m["train_loss_first"], m["train_loss"])
    # strategy auto (the default): a tiny model and its optimiser fit a worker's memory -> ddp
    assert cfg.teacher.strategy == "auto" and m["strategy"] == "ddp" and m["local_param_fraction"] == 1.0
    assert 0 < m["auto_estimate_gib"] < 0.8 * m["auto_device_gib"]
    assert 0.5 < m["train_padding_efficiency"] <= 1.0 and 0.5 < m["val_padding_efficiency"] <= 1.0
    _check_artifact(cfg, meta)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero(ray_local, tmp_path, tiny_qwen_dir, stage):
    write_toy_samples(str(tmp_path), n_train=32, n_val=16)
    cfg = _pipeline(tmp_path, tiny_qwen_dir, strategy="deepspeed",
                    deepspeed={"zero_optimization": {"stage": stage}})
    meta = run_teacher(cfg)
    m = meta["metrics"]
    assert m["final_step"] == 4 and m["strategy"] == "deepspeed" and m["zero_stage"] == stage
    assert m["train_loss"] < 0.8 * m["train_loss_first"], (m["train_loss_first"], m["train_loss"])
    # ZeRO-3 builds the model partitioned (each of the 2 workers held about half of it, LoRA
    # and head aside); ZeRO-2 builds it whole. The artifact check below reloads the weights
    # without DeepSpeed and must reproduce the logits the partitioned model computed.
    if stage == 3:
        assert 0.45 < m["local_param_fraction"] < 0.6, m["local_param_fraction"]
    else:
        assert m["local_param_fraction"] == 1.0
    print(f"ZeRO-{stage}: worker peak RSS after build {m['worker_build_peak_rss_mib']} MiB, over the run "
          f"{m['worker_peak_rss_mib']} MiB, local parameter fraction {m['local_param_fraction']}")
    _check_artifact(cfg, meta)


def test_a_run_the_cluster_cannot_seat_gives_up_after_the_capacity_timeout(ray_local, tmp_path, tiny_qwen_dir,
                                                                           monkeypatch):
    """ray.capacity_timeout_s: workers the cluster cannot give (64 CPUs each on a 2-CPU cluster)
    end the stage after one wait, in one line saying what it waited for, instead of Ray Train
    retrying every minute forever."""
    from ckd_ehr.ray_utils import CAPACITY_TIMEOUT_ENV
    from ckd_ehr.training.ray_train import CapacityTimeoutError

    monkeypatch.setenv(CAPACITY_TIMEOUT_ENV, os.environ.get(CAPACITY_TIMEOUT_ENV, "60"))   # restored after
    write_toy_samples(str(tmp_path), n_train=16, n_val=8)
    cfg = _pipeline(tmp_path, tiny_qwen_dir, cpus_per_worker=64, max_failures=0)
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"capacity_timeout_s": 5.0})})
    start = time.time()
    with pytest.raises(CapacityTimeoutError, match=r"gave up after 5 s waiting for 2 training worker\(s\) with "
                                                    r"\{'CPU': 64"):
        run_teacher(cfg)
    assert time.time() - start < 120
