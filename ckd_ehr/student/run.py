"""`ckd-ehr student`: for each variant, prepare inputs, train on Ray Train, pick the best
checkpoint by validation, tune thresholds, write the artifact and the test predictions.

The driver does the cheap, deterministic work (reading, fitting texts to max_length,
tokenising) once and hands the token ids to the workers through the object store.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..config import PipelineConfig, config_hash
from ..contracts import PREDICTIONS, RunLayout
from ..models import resolve_model_path
from ..storage import join, write_parquet
from .data import Encoded, FitStats, encode, fit_texts, load_efficacy, read_split, variant_spec
from .loss import class_balanced_weights

log = logging.getLogger("ckd_ehr.student")


@dataclass
class Prepared:
    column: str
    distill: bool
    splits: dict[str, Encoded]
    texts: dict[str, list[str]]
    fit: dict[str, dict]


def prepare_variant(cfg: PipelineConfig, variant: str, tokenizer, efficacy: dict) -> Prepared:
    """Read, join, fit and tokenise train / val / test for one variant."""
    s = cfg.student
    layout = RunLayout(cfg.run_dir)
    column, distill = variant_spec(variant)
    splits, texts, fit = {}, {}, {}
    limits = {"train": s.max_train_samples, "val": s.max_eval_samples, "test": None}
    for split in ("train", "val", "test"):
        # soft labels are read only where they are used: the training loss
        soft_path = layout.soft_labels(split) if distill and split == "train" else None
        samples, soft = read_split(layout.augmented(split), soft_path, limits[split], seed=s.seed)
        t, stats = fit_texts(samples, tokenizer, s.max_length, column, efficacy, cfg.text, s.fit_shrink)
        splits[split] = encode(samples, soft, t, tokenizer, s.max_length)
        texts[split], fit[split] = t, stats.as_dict()
    return Prepared(column, distill, splits, texts, fit)


def _predict_remote(checkpoint, pooling: str, pad_id: int, refs: dict, batch_size: int, use_gpu: bool):
    """Probabilities of several splits from a checkpoint, in a Ray task (GPU if training had one)."""
    import ray

    @ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)
    def predict(ckpt, data: dict):
        from .model import load_student_model, predict_ids

        device = "cuda" if use_gpu else "cpu"
        with ckpt.as_directory() as d:
            model = load_student_model(d, pooling=pooling, device=device)
        return {k: predict_ids(model, v.input_ids, pad_id, batch_size, device) for k, v in data.items()}

    return ray.get(predict.remote(checkpoint, refs))


def train_variant(cfg: PipelineConfig, variant: str) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    from ..metrics import all_scores, tune_thresholds
    from .artifact import write_artifact
    from .train import score_order, train_loop_per_worker

    s = cfg.student
    layout = RunLayout(cfg.run_dir)
    model_path = resolve_model_path(s.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eff_table, efficacy = load_efficacy(layout.efficacy_table, cfg.eadf.top_k)
    t0 = time.perf_counter()
    prep = prepare_variant(cfg, variant, tokenizer, efficacy)
    log.info("student %s: %d train / %d val / %d test samples; refit to %d tokens: %s",
             variant, len(prep.splits["train"]), len(prep.splits["val"]), len(prep.splits["test"]),
             s.max_length, prep.fit)
    train = prep.splits["train"]
    class_w = class_balanced_weights(train.labels).tolist() if s.distill.class_balanced else None

    # the run name carries the config: the same config resumes, a changed one starts afresh
    name = f"{variant}-{config_hash({'student': s.model_dump(mode='json'), 'text': cfg.text.model_dump(mode='json'), 'top_k': cfg.eadf.top_k})}"
    storage = layout.student_train(variant)
    loop_cfg = {
        "student": s.model_dump(mode="json"), "distill": prep.distill, "model_path": model_path,
        "train_ref": ray.put(train), "val_ref": ray.put(prep.splits["val"]),
        "class_weights": class_w, "pad_id": tokenizer.pad_token_id or 0,
        "failure_marker": join(storage, f"{name}.failure_injected"),
    }
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=s.best_metric,
                                               checkpoint_score_order=score_order(s.best_metric)),
            failure_config=FailureConfig(max_failures=s.max_failures)))
    result = trainer.fit()
    best = result.get_best_checkpoint(s.best_metric, score_order(s.best_metric))
    if best is None:
        raise RuntimeError(f"student {variant}: training reported no checkpoint ({storage}/{name})")
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), {})
    train_s = time.perf_counter() - t0

    pad_id = tokenizer.pad_token_id or 0
    probs = _predict_remote(best, s.pooling, pad_id, {k: prep.splits[k] for k in ("val", "test")},
                            s.batch_size * 4, s.use_gpu)
    val = prep.splits["val"]
    fixed = [0.5] * val.labels.shape[1]
    tuned = tune_thresholds(val.labels, probs["val"], "f1")
    metrics = {
        "val_fixed": all_scores(val.labels, probs["val"], fixed),
        "val_tuned": all_scores(val.labels, probs["val"], tuned),  # optimistic: tuned on these
        "best_checkpoint": {k: v for k, v in best_metrics.items() if isinstance(v, (int, float))},
        "train_samples": len(train), "wall_s": round(train_s, 1),
    }
    meta = {
        "variant": variant, "config": s.model_dump(mode="json"), "pooling": s.pooling,
        "max_length": s.max_length,
        "text": {"column": prep.column, "config": cfg.text.model_dump(mode="json"), "top_k": cfg.eadf.top_k},
        "thresholds": {"fixed": fixed, "tuned": [float(x) for x in tuned], "served": s.thresholds},
        "metrics": metrics, "fit": prep.fit, "train_run": join(storage, name),
    }
    with tempfile.TemporaryDirectory(prefix="ckd-student-") as tmp, best.as_directory() as ckpt_dir:
        meta = write_artifact(layout.student_artifact(variant), ckpt_dir, tokenizer, meta, eff_table,
                              staging=f"{tmp}/artifact")

    test = prep.splits["test"]
    table = pa.Table.from_arrays([
        pa.array(test.sample_ids, pa.string()), pa.array(test.subject_ids, pa.int64()),
        pa.array(test.labels.astype(np.int8).tolist(), PREDICTIONS.field("labels").type),
        pa.array(probs["test"].tolist(), PREDICTIONS.field("probs").type)], schema=PREDICTIONS)
    write_parquet(table, layout.predictions(variant))
    log.info("student %s: val macro-F1 %.3f (0.5) / %.3f (tuned), artifact %s", variant,
             metrics["val_fixed"]["macro_f1"], metrics["val_tuned"]["macro_f1"], meta["artifact_id"])
    return {"artifact_id": meta["artifact_id"], "metrics": metrics, "fit": prep.fit}


def run_student(cfg: PipelineConfig) -> dict:
    """Train every variant in cfg.student.variants; returns per-variant summaries."""
    from ..ray_utils import init_ray

    init_ray(cfg.ray)
    return {v: train_variant(cfg, v) for v in cfg.student.variants}


__all__ = ["run_student", "train_variant", "prepare_variant", "FitStats"]
