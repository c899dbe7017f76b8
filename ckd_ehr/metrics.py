"""Multi-label metrics for the 25 phenotypes, thresholds, and patient-level bootstrap intervals.

What the paper reported, and what we add (see shared/paper/NOTES.md):
- "accuracy" is element-wise over all N x 25 cells (1 - Hamming loss); we also give subset
  accuracy (every label of a sample right), which is far stricter.
- AUROC / AUPRC are computed on probabilities, never on thresholded predictions (the release's
  flaw). Without a label set, macro averages skip phenotypes with a single class in y_true and
  say how many. With one (`macro_label_set`: phenotypes with at least 5 positives in the full
  test split, fixed once), every macro metric (F1, AUROC, AUPRC) averages exactly that set, in
  the point estimate and in every bootstrap draw; a draw in which a member has a single class
  gives NaN for the macro ranking metrics (left out of the interval, counted) rather than a
  mean over another set.
- Intervals come from a bootstrap over PATIENTS: consecutive-visit samples of one patient are
  correlated, so resampling samples would give intervals that are too narrow.

The ranking metrics are written with numpy (one sort gives tie-averaged ranks for AUROC and
cumulative counts for average precision) instead of calling scikit-learn per phenotype, because the bootstrap evaluates them
thousands of times; tests/test_metrics.py checks every one against scikit-learn.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from ckd_ehr.contracts import to_matrix  # noqa: F401  (the one conversion; metrics' callers use it from here too)
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names

THRESHOLDED = ("accuracy", "subset_accuracy", "macro_f1", "micro_f1", "weighted_f1", "samples_f1")
"""Metrics of 0/1 predictions: they change with the thresholds."""
RANKING = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc")
"""Metrics of probabilities: independent of the thresholds."""
ALL_METRICS = THRESHOLDED + RANKING


# --- inputs ------------------------------------------------------------------------------

def threshold_vector(thresholds, k: int) -> np.ndarray:
    """Per-phenotype thresholds from a scalar or a length-k sequence (None = 0.5)."""
    if thresholds is None:
        thresholds = 0.5
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(k, float(t))
    if t.shape != (k,):
        raise ValueError(f"expected {k} thresholds, got shape {t.shape}")
    return t


def binarize(probs: np.ndarray, thresholds) -> np.ndarray:
    """0/1 predictions: positive where probability >= the phenotype's threshold."""
    probs = np.asarray(probs, dtype=np.float64)
    return (probs >= threshold_vector(thresholds, probs.shape[1])).astype(np.int8)


# --- thresholded metrics -----------------------------------------------------------------

def element_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """The paper's "accuracy": share of the N x K cells predicted right (1 - Hamming loss)."""
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if np.size(y) else float("nan")


def subset_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Share of samples with all K labels right (exact match)."""
    return float(np.mean(np.all(np.asarray(y) == np.asarray(pred), axis=1))) if len(y) else float("nan")


def _f1(tp, fp, fn) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn), 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def per_label_counts(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    tp = np.sum(y & pred, axis=0)
    fp = np.sum(~y & pred, axis=0)
    fn = np.sum(y & ~pred, axis=0)
    return tp, fp, fn


def macro_label_set(y_test: np.ndarray, min_positives: int = 5) -> np.ndarray:
    """Boolean mask of the phenotypes that macro metrics average: at least `min_positives`
    positives in the FULL test split (computed once, before any bootstrap)."""
    return np.sum(np.asarray(y_test) > 0, axis=0) >= min_positives


def _macro(per_label: np.ndarray, label_set: np.ndarray | None, strict: bool) -> float:
    """Mean over the label set (NaN if `strict` and a member is NaN); without a set, the mean
    over the non-NaN labels."""
    if label_set is None:
        return _nanmean(per_label)
    vals = np.asarray(per_label, dtype=np.float64)[np.asarray(label_set, dtype=bool)]
    if not len(vals) or (strict and np.isnan(vals).any()):
        return float("nan")
    return float(vals.mean())


def f1_scores(y: np.ndarray, pred: np.ndarray, label_set: np.ndarray | None = None) -> dict[str, float]:
    """F1 averaged four ways, as scikit-learn's f1_score(average=..., zero_division=0); macro
    over `label_set` when given."""
    tp, fp, fn = per_label_counts(y, pred)
    per_label = _f1(tp, fp, fn)
    support = tp + fn
    yb, pb = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    row_tp = np.sum(yb & pb, axis=1)
    row = _f1(row_tp, np.sum(~yb & pb, axis=1), np.sum(yb & ~pb, axis=1))
    return {
        "macro_f1": float(per_label.mean()) if label_set is None else _macro(per_label, label_set, False),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "weighted_f1": float(np.sum(per_label * support) / support.sum()) if support.sum() else 0.0,
        "samples_f1": float(row.mean()) if len(row) else float("nan"),
    }


def thresholded_scores(y: np.ndarray, pred: np.ndarray, label_set: np.ndarray | None = None) -> dict[str, float]:
    return {"accuracy": element_accuracy(y, pred), "subset_accuracy": subset_accuracy(y, pred),
            **f1_scores(y, pred, label_set)}


# --- ranking metrics (on probabilities) ---------------------------------------------------

def single_class_labels(y: np.ndarray) -> np.ndarray:
    """Boolean mask of the columns whose y_true has one class only (AUROC undefined)."""
    pos = np.sum(np.asarray(y) > 0, axis=0)
    return (pos == 0) | (pos == len(y))


def auroc_and_ap_per_label(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of each column from one sort; NaN where the column has a
    single class (AUROC undefined; AP undefined with no positives, trivially 1 with no negatives).

    AUROC is the Mann-Whitney U with average ranks for ties. AP is scikit-learn's
    average_precision_score: the sum over distinct thresholds of (recall gained) x (precision
    there); samples tied on a score enter together, so each positive is credited with the
    precision at the END of its tie block.
    """
    y = np.asarray(y) > 0
    probs = np.asarray(probs, dtype=np.float64)
    n, k = y.shape
    if n == 0:
        return np.full(k, np.nan), np.full(k, np.nan)
    order = np.argsort(-probs, axis=0, kind="stable")
    scores = np.take_along_axis(probs, order, axis=0)
    hits = np.take_along_axis(y, order, axis=0)
    rows = np.arange(n)[:, None]
    # Tie blocks: a row ends one where the next score differs; a row starts one where the
    # previous differs. Fill every row with its block's end (backwards) and start (forwards).
    ends_here = np.ones_like(scores, dtype=bool)
    ends_here[:-1] = scores[:-1] != scores[1:]
    starts_here = np.ones_like(scores, dtype=bool)
    starts_here[1:] = ends_here[:-1]
    block_end = np.minimum.accumulate(np.where(ends_here, rows, n)[::-1], axis=0)[::-1]
    block_start = np.maximum.accumulate(np.where(starts_here, rows, 0), axis=0)

    n_pos = hits.sum(axis=0).astype(np.float64)
    n_neg = n - n_pos
    single = (n_pos == 0) | (n_neg == 0)
    # Descending position i has ascending rank n - i; a tie block shares its average rank.
    ranks = n - (block_start + block_end) / 2
    u = np.sum(ranks * hits, axis=0) - n_pos * (n_pos + 1) / 2
    precision_at_end = np.take_along_axis(np.cumsum(hits, axis=0) / (rows + 1), block_end, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
        ap = np.sum(precision_at_end * hits, axis=0) / n_pos
    auc[single] = np.nan
    ap[single] = np.nan
    return auc, ap


def auroc_per_label(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC of each column (as scikit-learn's roc_auc_score); NaN where single-class."""
    return auroc_and_ap_per_label(y, probs)[0]


def macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over the labels that have both classes in `y` (nan if none has)."""
    auc = auroc_per_label(y, probs)
    return float(np.nanmean(auc)) if np.any(~np.isnan(auc)) else float("nan")


def ranking_scores(y: np.ndarray, probs: np.ndarray, label_set: np.ndarray | None = None) -> dict[str, float]:
    """Macro and micro AUROC / AUPRC on probabilities. Macro: over `label_set` (NaN when one of
    its phenotypes has a single class here), else over the phenotypes with both classes."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    auc, ap = auroc_and_ap_per_label(y, probs)
    micro_auc, micro_ap = auroc_and_ap_per_label(y.reshape(-1, 1), probs.reshape(-1, 1))
    return {"macro_auroc": _macro(auc, label_set, True), "micro_auroc": float(micro_auc[0]),
            "macro_auprc": _macro(ap, label_set, True), "micro_auprc": float(micro_ap[0])}


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.any(~np.isnan(a)) else float("nan")


def all_scores(y: np.ndarray, probs: np.ndarray, thresholds=0.5, label_set: np.ndarray | None = None
               ) -> dict[str, float]:
    """Every metric of ALL_METRICS at the given thresholds (macro over `label_set` if given)."""
    return {**thresholded_scores(y, binarize(probs, thresholds), label_set), **ranking_scores(y, probs, label_set)}


def per_phenotype_table(y: np.ndarray, probs: np.ndarray, thresholds=0.5,
                        names: Sequence[str] | None = None) -> list[dict]:
    """One row per phenotype: support, prevalence, precision, recall, F1, AUROC, AUPRC, threshold."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    k = y.shape[1]
    names = list(names) if names is not None else (phenotype_names() if k == NUM_PHENOTYPES else
                                                    [f"label_{j}" for j in range(k)])
    t = threshold_vector(thresholds, k)
    tp, fp, fn = per_label_counts(y, binarize(probs, t))
    auc, ap = auroc_and_ap_per_label(y, probs)
    rows = []
    for j in range(k):
        predicted, support = tp[j] + fp[j], tp[j] + fn[j]
        rows.append({
            "phenotype": names[j],
            "support": int(support),
            "prevalence": float(support / len(y)) if len(y) else float("nan"),
            "precision": float(tp[j] / predicted) if predicted else 0.0,
            "recall": float(tp[j] / support) if support else 0.0,
            "f1": float(_f1(tp[j], fp[j], fn[j])),
            "auroc": None if np.isnan(auc[j]) else float(auc[j]),
            "auprc": None if np.isnan(ap[j]) else float(ap[j]),
            "threshold": float(t[j]),
        })
    return rows


# --- thresholds ----------------------------------------------------------------------------

def tune_thresholds(y: np.ndarray, probs: np.ndarray, mode: str = "f1", default: float = 0.5) -> list[float]:
    """Per-phenotype thresholds. `fixed`: `default` everywhere (the paper's 0.5). `f1`: the cut
    that maximises the phenotype's F1 on these (validation) labels.

    The cut is placed halfway between the lowest score still predicted positive and the next
    lower score, so unseen scores between the two are not decided by the tie. A phenotype with
    no positive in y keeps `default` (every cut has F1 = 0).
    """
    y = np.asarray(y) > 0
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    if mode == "fixed":
        return [float(default)] * k
    if mode != "f1":
        raise ValueError(f"threshold mode must be 'fixed' or 'f1', got {mode!r}")
    out = []
    for j in range(k):
        n_pos = int(y[:, j].sum())
        if n_pos == 0:
            out.append(float(default))
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        s, hits = probs[order, j], y[order, j]
        tp = np.cumsum(hits)
        predicted = np.arange(1, len(s) + 1)
        # Only cuts at the end of a tie block are realisable ("score >= t" takes ties together).
        ends = np.flatnonzero(np.append(s[:-1] != s[1:], True))
        f1 = 2 * tp[ends] / (predicted[ends] + n_pos)
        best = ends[int(np.argmax(f1))]
        nxt = s[best + 1] if best + 1 < len(s) else None
        out.append(float(s[best] if nxt is None else (s[best] + nxt) / 2))
    return out


# --- calibration ---------------------------------------------------------------------------

def reliability_bins(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Reliability diagram data over all N x K cells: per equal-width bin, count, mean
    probability, observed positive rate; and the expected calibration error (ECE)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    sum_p = np.bincount(which, weights=p, minlength=bins)
    sum_y = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p, rate = sum_p / count, sum_y / count
    used = count > 0
    ece = float(np.sum(count[used] * np.abs(mean_p[used] - rate[used])) / max(count.sum(), 1))
    return {"edges": np.linspace(0, 1, bins + 1).round(6).tolist(), "count": count.tolist(),
            "mean_prob": [None if not u else float(v) for u, v in zip(used, mean_p)],
            "positive_rate": [None if not u else float(v) for u, v in zip(used, rate)],
            "ece": ece}


# --- patient-level bootstrap ----------------------------------------------------------------

def patient_resamples(subject_ids, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of `resamples` bootstrap samples over patients: draw as many patients as
    there are, with replacement; every sample of a drawn patient comes along, once per draw.

    The same subject_ids (same row order) and seed give the same resamples, which is what
    makes paired intervals for the difference between two models possible.
    """
    subjects, inverse = np.unique(np.asarray(subject_ids), return_inverse=True)
    order = np.argsort(inverse, kind="stable")       # rows grouped by patient
    counts = np.bincount(inverse, minlength=len(subjects))
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        drawn = rng.integers(0, len(subjects), len(subjects))
        lengths = counts[drawn]
        first = np.repeat(starts[drawn], lengths)
        offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        yield order[first + offset]


def patient_weights(subject_ids, resamples: int, seed: int) -> np.ndarray:
    """[resamples, N] sample weights of patient_resamples' draws (the same draws for the same
    subject_ids and seed): how many times each sample's patient was drawn. A metric computed
    with these weights equals the metric on the resampled rows (auroc_draws)."""
    subjects, inverse = np.unique(np.asarray(subject_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(subjects), len(subjects)), minlength=len(subjects))
                       for _ in range(resamples)]) if resamples else np.zeros((0, len(subjects)), np.int64)
    return counts[:, inverse].astype(np.float64)


def auroc_draws(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B, K] AUROC of each column under each row of sample weights [B, N] (bootstrap counts):
    the weighted Mann-Whitney statistic, ties counted one half, equal to auroc_per_label on the
    rows repeated by their weights; NaN where a draw leaves a column with one class. One sort per
    column serves every draw, so a thousand patient draws cost about as much as a few plain AUROCs."""
    y = np.asarray(y) > 0
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    out = np.full((weights.shape[0], y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        order = np.argsort(probs[:, j], kind="stable")
        s, hit = probs[order, j], y[order, j]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])       # tie blocks of equal scores
        w = weights[:, order]
        pos, neg = w * hit, w * ~hit
        if len(starts) < len(s):   # ties: one block per distinct score
            pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        out[(n_pos == 0) | (n_neg == 0), j] = np.nan
    return out


def bootstrap_scores(y: np.ndarray, probs: np.ndarray, subject_ids, thresholds: Mapping[str, Sequence[float]],
                     resamples: int, seed: int, label_set: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap distributions over patients: {mode: {metric: array(resamples)}} for each set of
    thresholds in `thresholds` ({mode: thresholds}). The ranking metrics do not depend on the
    thresholds, so they are computed once per resample and shared by the modes."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    preds = {mode: binarize(probs, t) for mode, t in thresholds.items()}
    out = {mode: {m: np.empty(resamples) for m in ALL_METRICS} for mode in thresholds}
    for b, idx in enumerate(patient_resamples(subject_ids, resamples, seed)):
        ranking = ranking_scores(y[idx], probs[idx], label_set)
        for mode, pred in preds.items():
            scores = {**thresholded_scores(y[idx], pred[idx], label_set), **ranking}
            for m in ALL_METRICS:
                out[mode][m][b] = scores[m]
    return out


def interval(distribution: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile interval of a bootstrap distribution (NaN resamples ignored)."""
    d = np.asarray(distribution, dtype=np.float64)
    d = d[~np.isnan(d)]
    if not len(d):
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))]


def delta_summary(point_base: Mapping[str, float], point_new: Mapping[str, float],
                  dist_base: Mapping[str, np.ndarray] | None, dist_new: Mapping[str, np.ndarray] | None) -> dict:
    """{metric: {base, new, delta, relative, interval}} for new - base. The distributions must
    come from the same resamples (paired), so the interval is of the per-resample difference."""
    out = {}
    for m in ALL_METRICS:
        base, new = point_base[m], point_new[m]
        delta = new - base
        out[m] = {"base": base, "new": new, "delta": delta,
                  "relative": delta / base if base else None,
                  "interval": interval(dist_new[m] - dist_base[m]) if dist_base is not None else None}
    return out


def paired_bootstrap_delta(y, probs_base, thresholds_base, probs_new, thresholds_new, subject_ids,
                           resamples: int, seed: int, label_set: np.ndarray | None = None) -> dict:
    """Delta (new - base) of every metric between two models scored on the same samples, with a
    95% interval from the SAME resampled patients for both models."""
    y = np.asarray(y)
    point_base = all_scores(y, probs_base, thresholds_base, label_set)
    point_new = all_scores(y, probs_new, thresholds_new, label_set)
    if resamples <= 0:
        return delta_summary(point_base, point_new, None, None)
    dist_base = bootstrap_scores(y, probs_base, subject_ids, {"m": thresholds_base}, resamples, seed, label_set)["m"]
    dist_new = bootstrap_scores(y, probs_new, subject_ids, {"m": thresholds_new}, resamples, seed, label_set)["m"]
    return delta_summary(point_base, point_new, dist_base, dist_new)


# --- one call for everyone ------------------------------------------------------------------

def evaluate_predictions(labels, probs, subject_ids=None, thresholds=0.5, bootstrap: int = 0,
                         seed: int = 0, label_set: np.ndarray | None = None) -> dict:
    """All metrics of one model's predictions at one set of thresholds, for teacher/student
    validation, Tune and the evaluate stage.

    Returns {"n_samples", "n_patients", "thresholds", "metrics": {name: value},
    "intervals": {name: [low, high]} (empty when bootstrap == 0), "auroc_skipped": [phenotypes
    with a single class, left out of the macro averages], "per_phenotype": [...],
    "calibration": reliability bins}. Without subject_ids every sample counts as its own patient.
    """
    y = to_matrix(labels, np.int8)
    p = to_matrix(probs)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    subject_ids = np.arange(len(y)) if subject_ids is None else np.asarray(subject_ids)
    t = threshold_vector(thresholds, y.shape[1])
    table = per_phenotype_table(y, p, t)
    skipped = [row["phenotype"] for row, single in zip(table, single_class_labels(y)) if single]
    result = {
        "n_samples": int(len(y)),
        "n_patients": int(len(np.unique(subject_ids))),
        "thresholds": t.tolist(),
        "metrics": all_scores(y, p, t, label_set),
        "intervals": {},
        "auroc_skipped": skipped,
        "per_phenotype": table,
        "calibration": reliability_bins(y, p),
    }
    if bootstrap > 0:
        dist = bootstrap_scores(y, p, subject_ids, {"m": t}, bootstrap, seed, label_set)["m"]
        result["intervals"] = {m: interval(dist[m]) for m in ALL_METRICS}
    return result
