"""Reading what the stages wrote for evaluation: a model's test predictions, its thresholds, the
checkpoint step its artifact kept and its learning curve; shared by evaluate, its probe rows and
the study."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import (PREDICTIONS, TEACHER_META, TEACHER_ROWS, ContractError, RunLayout, base_variant,
                               check_schema)
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.metrics import to_matrix, tune_thresholds


def read_predictions(path: str) -> pd.DataFrame:
    """One model's PREDICTIONS, checked against the contract and sorted by sample_id."""
    table = check_schema(storage.read_parquet(path), PREDICTIONS, path)
    df = table.to_pandas()
    if df["sample_id"].duplicated().any():
        raise ContractError(f"{path}: duplicated sample_id values")
    return df.sort_values("sample_id", kind="stable").reset_index(drop=True)


def teacher_predictions_from_soft_labels(layout: RunLayout, split: str = "test",
                                         source: str = "teacher") -> pd.DataFrame | None:
    """A teacher's predictions on a split as PREDICTIONS rows, from its soft labels (the
    soft-labels stage's output, or a side teacher's copied by `ckd-ehr study`: TEACHER_ROWS)
    joined by sample_id with the split's samples (patient and labels). None when either file
    is missing."""
    soft_path = layout.soft_labels(split, source)
    samples_path = next((p for p in (layout.augmented(split), layout.samples(split)) if storage.exists(p)), None)
    if not storage.exists(soft_path) or samples_path is None:
        return None
    soft = storage.read_parquet(soft_path, columns=["sample_id", "probs"]).to_pandas()
    samples = storage.read_parquet(samples_path, columns=["sample_id", "subject_id", "labels"]).to_pandas()
    joined = samples.merge(soft, on="sample_id", how="inner")
    if not len(joined):
        raise ContractError(f"{soft_path}: no sample_id in common with {samples_path}")
    table = check_schema(pa.Table.from_pandas(joined[["sample_id", "subject_id", "labels", "probs"]],
                                              preserve_index=False), PREDICTIONS, soft_path)
    return table.to_pandas().sort_values("sample_id", kind="stable").reset_index(drop=True)


def artifact_json(layout: RunLayout, name: str) -> str:
    """The artifact JSON of a model row: the teacher's, a side teacher's, a student variant's."""
    if name == "teacher":
        return layout.teacher_meta
    if name in TEACHER_ROWS:   # a side teacher's teacher.json, copied beside its soft labels
        return layout.side_teacher_file(name, TEACHER_META)
    return layout.student_meta(base_variant(name))


def read_thresholds(layout: RunLayout, name: str) -> tuple[dict[str, list[float]], dict[str, str]]:
    """({mode: 25 thresholds}, {mode: where they came from}). The artifact JSON may hold
    "thresholds": {"fixed": [...], "tuned": [...]} (or a bare list, taken as tuned); anything
    missing or malformed falls back to 0.5, and the source says so. The teacher's tuned
    thresholds, when its artifact has none, are tuned here on its validation soft labels."""
    fixed = [0.5] * NUM_PHENOTYPES
    thresholds = {"fixed": fixed, "tuned": fixed}
    source = {"fixed": "0.5 for every phenotype", "tuned": "0.5 (no tuned thresholds found)"}
    path = artifact_json(layout, name)
    if not storage.exists(path):
        source["tuned"] = f"0.5 ({path} not found)"
    stored = storage.read_json(path).get("thresholds") if storage.exists(path) else None
    if isinstance(stored, list):
        stored = {"tuned": stored}
    for mode in ("fixed", "tuned"):
        values = (stored or {}).get(mode)
        if values is None:
            continue
        if len(values) != NUM_PHENOTYPES or not all(isinstance(v, (int, float)) for v in values):
            source[mode] = f"0.5 ({path}: thresholds.{mode} is not {NUM_PHENOTYPES} numbers)"
            continue
        thresholds[mode], source[mode] = [float(v) for v in values], f"{path}: thresholds.{mode}"
    if name in TEACHER_ROWS and not source["tuned"].startswith(path):
        val = teacher_predictions_from_soft_labels(layout, "val", name)
        if val is not None:
            thresholds["tuned"] = tune_thresholds(to_matrix(val["labels"], np.int8), to_matrix(val["probs"]), "f1")
            source["tuned"] = f"maximising F1 per phenotype on {layout.soft_labels('val', name)}"
    return thresholds, source


def kept_step(layout: RunLayout, name: str) -> int | None:
    """The training step of the checkpoint a model's artifact holds, or None when unknown.
    0 means checkpoint selection kept the probe (head_init: probe validates it as step 0):
    no fine-tuning or distillation update is in that model's predictions."""
    path = artifact_json(layout, name)
    if not storage.exists(path):
        return None
    metrics = storage.read_json(path).get("metrics") or {}
    # student: a dict of the kept checkpoint's metrics; teacher: flat (kept_checkpoint_path names
    # it). "best_checkpoint": the student's key in artifacts written before it was renamed.
    kept = metrics.get("kept_checkpoint", metrics.get("best_checkpoint"))
    step = (kept if isinstance(kept, dict) else metrics).get("step")
    return int(step) if isinstance(step, (int, float)) and np.isfinite(step) else None


def learning_curve(layout: RunLayout, name: str) -> list[dict]:
    """A model's validations during training (ckd_ehr.training: step, epoch, samples seen, the
    selection metric, val_loss; step 0 is its probe under head_init probe), from its artifact JSON;
    [] when it recorded none."""
    path = artifact_json(layout, name)
    if not storage.exists(path):
        return []
    return list((storage.read_json(path).get("metrics") or {}).get("curve") or [])


def as_predictions(df: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """PREDICTIONS rows: the samples' ids and labels, and `probs` [N, 25]."""
    return pd.DataFrame({"sample_id": df["sample_id"].to_numpy(), "subject_id": df["subject_id"].to_numpy(),
                         "labels": list(to_matrix(df["labels"], np.int8)), "probs": list(probs)})


def reference_thresholds(y_val: np.ndarray, p_val: np.ndarray) -> tuple[dict, dict]:
    """(thresholds, sources) of a row fitted here: 0.5, and tuned for F1 on validation."""
    return ({"fixed": [0.5] * NUM_PHENOTYPES, "tuned": tune_thresholds(y_val, p_val, "f1")},
            {"fixed": "0.5 for every phenotype", "tuned": "maximising F1 per phenotype on the validation split"})
