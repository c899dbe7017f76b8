"""How good are the soft labels? Entropy, calibration and teacher metrics per split.

Written to RUN/soft_labels/quality/: quality.json and reliability.png. Soft labels that are
all near 0 or 1 carry little more than hard labels (low entropy); badly calibrated ones
teach the student wrong confidences. The numbers here say which, before a student is trained.

Calibration treats every (sample, phenotype) cell as one binary prediction: the probability
of "present". ECE = sum over equal-width bins of (cells in bin / all cells) *
|mean predicted probability - observed fraction present|.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import SPLITS, RunLayout
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.metrics import to_matrix
from ckd_ehr.metrics import reliability_bins, binarize, f1_scores, ranking_scores, single_class_labels
from ckd_ehr.plots import plot_reliability_curves


def binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy of Bernoulli(p) in bits, element-wise; 0 at p in {0, 1}."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability-diagram data and ECE over all cells (the project's one definition:
    ckd_ehr.metrics.reliability_bins, also used by evaluate)."""

    return reliability_bins(np.asarray(labels), np.asarray(probs), n_bins)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    if np.size(probs) == 0:
        return float("nan")
    return reliability(probs, labels, n_bins)["ece"]


def teacher_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Macro-F1 at threshold 0.5 and macro AUROC on probabilities (ckd_ehr.metrics).

    Macro AUROC averages the phenotypes with both classes present in `labels` (others have
    no AUROC); how many were used is reported beside it.
    """

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    auc = ranking_scores(y, p)["macro_auroc"]
    return {"macro_f1": f1_scores(y, binarize(p, 0.5))["macro_f1"],
            "macro_auroc": None if np.isnan(auc) else auc,
            "auroc_phenotypes": int(np.sum(~single_class_labels(y)))}


def split_quality(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict:
    """n, ECE, mean and per-phenotype entropy, reliability bins, teacher metrics of one split."""
    out: dict = {"n": int(len(probs))}
    if not len(probs):
        return out
    ent = binary_entropy_bits(probs)
    rel = reliability(probs, labels, n_bins)
    out.update(ece=rel["ece"], mean_entropy_bits=float(ent.mean()),
               entropy_bits=dict(zip(phenotype_names(), map(float, ent.mean(axis=0)))),
               reliability=rel, **teacher_metrics(probs, labels))
    return out


def load_split(layout: RunLayout, split: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(probs, labels, teacher_id) of one split, labels joined to soft labels by sample_id."""
    soft = storage.read_parquet(layout.soft_labels(split), columns=["sample_id", "probs", "teacher_id"])
    lab = storage.read_parquet(layout.augmented(split), columns=["sample_id", "labels"])
    pos = {sid: i for i, sid in enumerate(lab.column("sample_id").to_pylist())}
    lab = lab.take(pa.array([pos[s] for s in soft.column("sample_id").to_pylist()], pa.int64()))
    tid = soft.column("teacher_id")[0].as_py() if soft.num_rows else None
    return to_matrix(soft.column("probs"), np.float64), to_matrix(lab.column("labels"), np.int64), tid


def write_quality_report(layout: RunLayout, n_bins: int = 10, splits=SPLITS) -> dict:
    """quality.json + reliability.png under RUN/soft_labels/quality/; returns the JSON dict."""

    per_split, all_p, all_y, teacher_id = {}, [], [], None
    for split in splits:
        p, y, tid = load_split(layout, split)
        teacher_id = teacher_id or tid
        per_split[split] = split_quality(p, y, n_bins)
        all_p.append(p)
        all_y.append(y)
    overall = split_quality(np.concatenate(all_p), np.concatenate(all_y), n_bins)
    report = {"teacher_id": teacher_id, "bins": n_bins,
              "calibration": "ECE over all (sample, phenotype) cells, equal-width bins",
              "entropy": "mean binary entropy of the soft label, bits (1 = p of 0.5, 0 = certain)",
              "metrics": "macro-F1 at 0.5; macro AUROC on probabilities over phenotypes with both classes",
              "splits": per_split, "overall": overall}
    out = layout.soft_label_quality
    storage.write_json(storage.join(out, "quality.json"), report)
    curves = {s: q["reliability"] for s, q in per_split.items() if "reliability" in q}
    storage.write_bytes(storage.join(out, "reliability.png"),
                        plot_reliability_curves(curves, "Teacher soft labels: reliability"))
    return report
