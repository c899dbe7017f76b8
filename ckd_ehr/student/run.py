"""`ckd-ehr student`: for each variant, build its task (ckd_ehr.student.train), train on Ray
Train, keep the checkpoint validation picks, tune thresholds, write the artifact and the test
predictions.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import numpy as np
import pyarrow as pa

from ckd_ehr.config import PipelineConfig, config_hash
from ckd_ehr.contracts import PREDICTIONS, PROBE_HEAD, RunLayout, student_variant
from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, layer_cache_key
from ckd_ehr.storage import exists, scratch_dir, write_parquet
from ckd_ehr.text import diagnosis_title_column
from ckd_ehr.student.data import Encoded, read_split
from ckd_ehr.training import TrainTask
from ckd_ehr.modeling.frozen import cached_states, predict_through_cache
from ckd_ehr.student.model import predict_ids, features_ids, save_student
from ckd_ehr.student.train import StudentTraining, build_student_task, data_fingerprint, student_from_checkpoint
from ckd_ehr.modeling.feature_cache import FeatureCache
from ckd_ehr.modeling.probe import LinearProbe
from ckd_ehr.metrics import all_scores, tune_thresholds
from ckd_ehr.student.artifact import write_artifact
from ckd_ehr.training import fit
from ckd_ehr.ray_utils import init_ray

log = logging.getLogger("ckd_ehr.student")


def _predict_remote(checkpoint, model_path: str, pooling: str, pad_id: int, data: dict,
                    batch_size: int, use_gpu: bool, token_bag=None, frozen=None) -> dict[str, np.ndarray]:
    """Probabilities of several splits from a checkpoint; in a Ray task on a GPU when training
    had them (the driver of a cluster job may have none), else in this process. `frozen` (a
    LayerCache, CPU): rows it holds run through the top layers only; the others through the
    bottom once, added to it (the next variant reading the same text, evaluate's probe row)."""
    # not at module level: ray, loaded only when this runs
    import ray

    def predict(ckpt, splits: dict):

        device = "cuda" if use_gpu else "cpu"
        with ckpt.as_directory() as d:
            model = student_from_checkpoint(d, model_path, pooling, device, token_bag)
        if frozen is None or use_gpu:
            return {k: predict_ids(model, v.input_ids, pad_id, batch_size, device) for k, v in splits.items()}
        out = {}
        for k, v in splits.items():
            logits, _, hit = predict_through_cache(model, v.input_ids, pad_id, batch_size, model.head.out_features,
                                                   cached_states(frozen, v.input_ids), frozen, device)
            log.info("student: %s probabilities of %d rows, %d through the top layers on cached states", k,
                     len(v.input_ids), int(hit.sum()))
            out[k] = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return out

    if not use_gpu:  # CPU: here, sparing a worker process start
        return predict(checkpoint, data)
    return ray.get(ray.remote(num_cpus=1, num_gpus=1)(predict).remote(checkpoint, data))


def checkpoint_val_probs(checkpoint, n_val: int) -> np.ndarray | None:
    """Probabilities of the validation rows the training loop saved with a validated checkpoint
    (`val_logits.npy`, rows in load_data's order), or None when it saved none or another number of
    rows (then the caller predicts them)."""
    with checkpoint.as_directory() as d:
        path = os.path.join(d, "val_logits.npy")
        if not os.path.exists(path):
            return None
        logits = np.load(path).astype(np.float64)
    if logits.shape[0] != n_val:
        return None
    return 1.0 / (1.0 + np.exp(-logits))


def probe_test_probs(checkpoint, metrics: dict, task: TrainTask, model_path: str, pooling: str, pad_id: int,
                     test: Encoded, batch_size: int) -> np.ndarray | None:
    """Test probabilities of a checkpoint that is its probe, or None. Checkpoint selection kept
    step 0 (head_init probe): no update was applied, so the model is the frozen encoder with the
    probe as head, and its probabilities are the probe's on the frozen features. Those come from
    the variants' feature cache (a sibling variant reading the same text and keeping its probe
    scored them already); rows not there are computed once and added, for the next variant."""

    if metrics.get("step") != 0 or not task.feature_cache or getattr(task.build_model, "token_bag", None) is not None:
        return None   # (a token bag's probe also reads the bag, which the feature cache does not hold)
    with checkpoint.as_directory() as d:
        if not os.path.exists(os.path.join(d, PROBE_HEAD)):
            return None
        probe = LinearProbe.load(os.path.join(d, PROBE_HEAD))
        cache = FeatureCache(task.feature_cache, task.feature_key)
        features, found = cache.lookup(test.input_ids)
        missing = np.flatnonzero(~found)
        if len(missing):
            model = student_from_checkpoint(d, model_path, pooling, "cpu")
            computed = features_ids(model, [test.input_ids[i] for i in missing], pad_id, batch_size)
            cache.add([test.input_ids[i] for i in missing], computed)
            features = np.zeros((len(test), computed.shape[1]), np.float32) if features is None else features
            features[missing] = computed
    log.info("student: test probabilities from the probe on frozen features (kept step 0; %d of %d rows cached)",
             int(found.sum()), len(test))
    return probe.probs(features)


def diagnosis_title_map(cfg: PipelineConfig) -> dict[str, str]:
    """ICD-9 code -> the title the sample text used (cfg.text.titles), from the run's visits:
    the dictionary Serve needs to render a record's codes exactly as training did."""
    # not at module level: the name is taken at module level
    from ckd_ehr.storage import exists, read_parquet

    layout = RunLayout(cfg.run_dir)
    if not exists(layout.visits):
        return {}
    col = diagnosis_title_column(cfg.text)
    t = read_parquet(layout.visits, columns=["diagnosis_codes", col])
    codes = t.column("diagnosis_codes").combine_chunks().flatten().to_pylist()
    titles = t.column(col).combine_chunks().flatten().to_pylist()
    return dict(sorted(zip(codes, titles)))


def training_vocabulary(cfg: PipelineConfig) -> dict[str, list[str]]:
    """The drugs and procedures (titles and codes) of the training samples' visits i: what Serve
    checks a record against to say when the model is guessing."""
    # not at module level: the name is taken at module level
    from ckd_ehr.storage import exists, read_parquet

    path = RunLayout(cfg.run_dir).augmented("train")
    if not exists(path):
        return {}
    t = read_parquet(path, columns=["drugs", "procedure_titles", "procedure_codes"])

    def items(*cols: str) -> list[str]:
        return sorted({str(v) for c in cols for v in t.column(c).combine_chunks().flatten().to_pylist() if v})

    return {"drugs": items("drugs"), "procedures": items("procedure_titles", "procedure_codes")}


def kept_probs(s, built: StudentTraining, kept, kept_metrics: dict) -> dict[str, np.ndarray]:
    """{val, test: probabilities} of the kept checkpoint. Validation's come with the checkpoint
    (the loop validated it on these rows, in this order); the test split's from the probe's
    features when it kept step 0, else one pass of the kept model."""
    prep = built.prep
    val_probs = checkpoint_val_probs(kept, len(prep.splits["val"]))
    test_probs = None if s.use_gpu else probe_test_probs(kept, kept_metrics, built.task, built.model_path, s.pooling,
                                                          built.pad_id, prep.splits["test"], s.batch_size * 4)
    wanted = tuple(k for k, got in (("val", val_probs), ("test", test_probs)) if got is None)
    frozen = None
    if s.train_top_layers and built.task.frozen_cache:   # the states training cached (and the test rows')
        frozen = LayerCache(built.task.frozen_cache,
                            layer_cache_key(built.task.frozen_key or built.task.feature_key, s.train_top_layers,
                                            s.frozen_cache_dtype), CACHE_DTYPES[s.frozen_cache_dtype])
    probs = _predict_remote(kept, built.model_path, s.pooling, built.pad_id, {k: prep.splits[k] for k in wanted},
                            s.batch_size * 4, s.use_gpu, built.token_bag, frozen) if wanted else {}
    probs.update({k: got for k, got in (("val", val_probs), ("test", test_probs)) if got is not None})
    return probs


def write_test_predictions(path: str, test, probs: np.ndarray) -> None:
    """PREDICTIONS of the test split (an Encoded split and its probabilities) -> `path`."""
    table = pa.Table.from_arrays([
        pa.array(test.sample_ids, pa.string()), pa.array(test.subject_ids, pa.int64()),
        pa.array(test.labels.astype(np.int8).tolist(), PREDICTIONS.field("labels").type),
        pa.array(probs.tolist(), PREDICTIONS.field("probs").type)], schema=PREDICTIONS)
    write_parquet(table, path)


def train_variant(cfg: PipelineConfig, variant: str) -> dict:
    """Train one variant on Ray Train, keep its checkpoint by validation, tune its thresholds,
    write its artifact and its test predictions; returns its summary."""

    s = cfg.student
    layout = RunLayout(cfg.run_dir)
    t0 = time.perf_counter()
    built = build_student_task(cfg, variant)
    prep, tokenizer, model_path, eff_table = built.prep, built.tokenizer, built.model_path, built.efficacy_table
    log.info("student %s: %d train / %d val / %d test samples; refit to %d tokens: %s",
             variant, len(prep.splits["train"]), len(prep.splits["val"]), len(prep.splits["test"]),
             s.max_length, prep.fit)
    train = prep.splits["train"]

    # the run name carries the config and the data: the same ones resume (Ray Train V2 resumes
    # a reused name), a changed config or re-generated input starts a fresh run
    name = f"{variant}-" + config_hash({
        "student": s.model_dump(mode="json"), "text": cfg.text.model_dump(mode="json"),
        "top_k": cfg.eadf.top_k, "data": data_fingerprint(prep)})
    storage = layout.student_train(variant)
    if variant in s.probe_only_variants:   # no step: the frozen encoder and its probe, no states to cache
        s = s.model_copy(update={"max_steps": 0, "train_top_layers": None})
        log.info("student %s: probe only (student.probe_only_variants)", variant)
    result = fit(s, built.task, storage_path=storage, name=name)
    kept, kept_metrics = result.kept_checkpoint, result.kept_metrics
    if kept is None:
        raise RuntimeError(f"student {variant}: training reported no checkpoint ({storage}/{name})")
    train_s = time.perf_counter() - t0

    val = prep.splits["val"]
    probs = kept_probs(s, built, kept, kept_metrics)
    fixed = [0.5] * val.labels.shape[1]
    tuned = tune_thresholds(val.labels, probs["val"], "f1")
    metrics = {
        "val_fixed": all_scores(val.labels, probs["val"], fixed),
        "val_tuned": all_scores(val.labels, probs["val"], tuned),  # optimistic: tuned on these
        "kept_checkpoint": {k: v for k, v in kept_metrics.items() if isinstance(v, (int, float))},
        "train_samples": len(train), "wall_s": round(train_s, 1),
        "train_samples_per_s": result.metrics.get("samples_per_s"),
        "curve": result.curve, "stopped_early": bool(result.metrics.get("stopped_early", False)),
        "setup": {k: v for k, v in result.metrics.items() if k.startswith(("frozen_", "autocast_", "probe_"))},
    }
    meta = {
        "variant": variant, "config": s.model_dump(mode="json"), "pooling": s.pooling,
        "max_length": s.max_length,
        "text": {"column": prep.column, "config": cfg.text.model_dump(mode="json"), "top_k": cfg.eadf.top_k},
        "thresholds": {"fixed": fixed, "tuned": [float(x) for x in tuned], "served": s.thresholds},
        "metrics": metrics, "fit": prep.fit, "train_run": result.path,
        "unit_terms": dict(zip(("label_attention", "relation"), s.distill.unit_weights(variant))),
        # what the weights were trained on: `export-hf` marks credentialed (MIMIC) weights restricted
        "data": {"source": cfg.data.source, "split": cfg.split.model_dump(mode="json"),
                 "icd10_crosswalk": cfg.data.icd10_crosswalk},  # Serve maps ICD-10 records the same way
    }
    with scratch_dir("ckd-student-") as tmp:
        with kept.as_directory() as ckpt_dir:
            save_student(student_from_checkpoint(ckpt_dir, model_path, s.pooling, token_bag=built.token_bag),
                         f"{tmp}/weights")
            if os.path.exists(os.path.join(ckpt_dir, PROBE_HEAD)):  # head_init: probe (evaluate's probe row)
                shutil.copy2(os.path.join(ckpt_dir, PROBE_HEAD), os.path.join(tmp, "weights", PROBE_HEAD))
        meta = write_artifact(layout.student_artifact(variant), f"{tmp}/weights", tokenizer, meta, eff_table,
                              staging=f"{tmp}/artifact", diagnosis_titles=diagnosis_title_map(cfg),
                              vocabulary=training_vocabulary(cfg))

    write_test_predictions(layout.predictions(variant), prep.splits["test"], probs["test"])
    log.info("student %s: val macro-F1 %.3f (0.5) / %.3f (tuned), artifact %s", variant,
             metrics["val_fixed"]["macro_f1"], metrics["val_tuned"]["macro_f1"], meta["artifact_id"])
    return {"artifact_id": meta["artifact_id"], "metrics": metrics, "fit": prep.fit}


def run_student(cfg: PipelineConfig) -> dict:
    """Train every variant in cfg.student.variants; returns per-variant summaries."""

    s, layout = cfg.student, RunLayout(cfg.run_dir)
    for source in sorted({student_variant(v).soft_labels for v in s.variants if student_variant(v).distills}):
        if source == "oracle" and not exists(layout.soft_labels("train", "oracle")):
            # not at module level: imported only on this branch
            from ckd_ehr.soft_labels.oracle import write_oracle_soft_labels

            write_oracle_soft_labels(layout)   # no model: the generator's probabilities, seconds
        # fail before hours of hard-label training, not after: distillation needs soft labels
        read_split(layout.augmented("train"), layout.soft_labels("train", source), s.max_train_samples, s.seed)
    init_ray(cfg.ray)
    return {v: train_variant(cfg, v) for v in s.variants}


__all__ = ["run_student", "train_variant"]
