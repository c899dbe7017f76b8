"""Contrasts between models over training seeds, with a patient bootstrap, multiplicity
adjustment and simultaneous intervals: the statistics the study states before it runs.

Setting: every row (a model variant) is trained once per seed on the same fixed split and
scored on the same test samples. For one contrast new - base on the primary metric (macro
AUROC over the phenotypes with at least 5 test positives, fixed once on the full test split):

- point estimate: the seed-averaged metric of `new` minus that of `base` on the whole test split;
- bootstrap: each draw resamples test PATIENTS (all their samples come along); within a draw
  every row and seed is scored on the same resampled samples and the difference of the
  seed-averaged metrics is taken, so the seeds' training noise and the test sampling noise
  both enter, and the pairing of rows on the same patients is kept;
- standard error: the bootstrap standard deviation of that difference; p-value: two-sided,
  normal approximation z = delta / se (stated, so it can be checked against the draws);
- multiplicity: Holm's step-down adjustment of the p-values over the contrasts, and
  simultaneous intervals from the max-T method (the `level` quantile over draws of the largest
  standardised deviation across contrasts), which hold for all contrasts together;
- detectable effect: the difference a contrast would detect with 80% power at the
  Bonferroni level (Holm is never stricter for its first step): (z_{1-alpha/2C} + z_0.8) * se.

No Ray, no models: arrays in, a dict out. Null control: tests/test_contrasts.py draws rows with
no difference and checks the rejection rate stays at the nominal level.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

from ckd_ehr.evaluation.metrics import _macro, auroc_per_label, macro_label_set, patient_resamples

_NORMAL = NormalDist()


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(len(p), np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def macro_auroc(y: np.ndarray, probs: np.ndarray, label_set: np.ndarray) -> float:
    """Mean AUROC over `label_set` (NaN when one of its phenotypes has a single class here):
    evaluate's macro definition (metrics._macro, strict), without the AUPRC it also computes."""
    return _macro(auroc_per_label(y, probs), label_set, True)


@dataclass
class Contrast:
    name: str
    new: str
    base: str
    delta: float
    """Seed-averaged metric of `new` minus `base`, on the whole test split."""
    se: float
    """Bootstrap standard deviation of the difference (patients resampled, seeds averaged)."""
    p: float
    """Two-sided, unadjusted (normal approximation)."""
    p_holm: float
    interval: list[float]
    """Simultaneous (max-T) interval at `level`, valid for all contrasts together."""
    marginal_interval: list[float]
    """Percentile interval of this contrast alone (not adjusted)."""
    detectable: float
    """Smallest |delta| detected with 80% power at the Bonferroni-adjusted level."""
    per_seed: list[float]
    """The difference per seed on the whole test split (the seeds' spread)."""
    identical: bool = False
    """`new` and `base` gave the same predictions in every seed (e.g. both kept the same step-0
    probe): nothing was compared, so there is no p-value (NaN) and no detectable effect."""


def seed_averaged_contrasts(y: np.ndarray, subject_ids: Sequence, probs: Mapping[str, Sequence[np.ndarray]],
                            contrasts: Sequence[tuple[str, str]], resamples: int = 1000, seed: int = 0,
                            level: float = 0.95, alpha: float = 0.05, label_set: np.ndarray | None = None) -> dict:
    """Contrasts `new - base` of the seed-averaged macro AUROC, see the module docstring.

    `probs[row]` is a list with one [N, K] array per seed, rows of every array in the order of
    `y` and `subject_ids`; rows may have different numbers of seeds (a teacher trained once).
    """
    y = np.asarray(y)
    if label_set is None:
        label_set = macro_label_set(y)
    label_set = np.asarray(label_set, dtype=bool)
    missing = sorted({r for c in contrasts for r in c if not probs.get(r)})
    if missing:
        raise ValueError(f"contrasts name rows with no predictions: {', '.join(missing)}")
    # every row with predictions is scored (a row in no contrast still gets its interval)
    rows = sorted(r for r in probs if probs[r])
    for r in rows:
        for s, p in enumerate(probs[r]):
            if np.shape(p) != y.shape:
                raise ValueError(f"row {r}, seed {s}: predictions of shape {np.shape(p)}, labels {y.shape}")

    def row_means(idx: np.ndarray | None) -> dict[str, float]:
        yy = y if idx is None else y[idx]
        return {r: float(np.mean([macro_auroc(yy, p if idx is None else p[idx], label_set) for p in probs[r]]))
                for r in rows}

    point = row_means(None)
    draws = np.full((resamples, len(contrasts)), np.nan)
    row_draws = np.full((resamples, len(rows)), np.nan)
    for b, idx in enumerate(patient_resamples(subject_ids, resamples, seed)):
        m = row_means(idx)
        draws[b] = [m[new] - m[base] for new, base in contrasts]
        row_draws[b] = [m[r] for r in rows]
    delta = np.array([point[new] - point[base] for new, base in contrasts])
    ok = ~np.isnan(draws).any(axis=1)          # a draw where a phenotype lost a class: dropped
    draws = draws[ok]
    row_draws = row_draws[ok]
    se = draws.std(axis=0, ddof=1) if len(draws) > 1 else np.full(len(contrasts), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(delta) / se
        max_t = np.nanmax(np.abs(draws - delta) / se, axis=1) if len(draws) else np.array([np.nan])
    p = [2 * (1 - _NORMAL.cdf(float(v))) if np.isfinite(v) else float("nan") for v in z]
    p_holm = holm(p)
    q = float(np.quantile(max_t, level)) if len(draws) else float("nan")
    z_bonf = _NORMAL.inv_cdf(1 - alpha / (2 * max(len(contrasts), 1)))
    seed_scores = {r: [macro_auroc(y, p, label_set) for p in probs[r]] for r in rows}
    # per seed: seed k of new against seed k of base, over the seeds both have
    per_seed = {(new, base): [a - b for a, b in zip(seed_scores[new], seed_scores[base])] for new, base in contrasts}
    tail = (1 - level) / 2
    same = {(new, base): len(probs[new]) == len(probs[base])
            and all(np.array_equal(a, b) for a, b in zip(probs[new], probs[base])) for new, base in contrasts}
    out = []
    for c, (new, base) in enumerate(contrasts):
        out.append(Contrast(
            name=f"{new} - {base}", new=new, base=base, delta=float(delta[c]), se=float(se[c]), p=p[c],
            p_holm=p_holm[c], interval=[float(delta[c] - q * se[c]), float(delta[c] + q * se[c])],
            marginal_interval=[float(np.quantile(draws[:, c], tail)), float(np.quantile(draws[:, c], 1 - tail))]
            if len(draws) else [float("nan")] * 2,
            detectable=float((z_bonf + _NORMAL.inv_cdf(0.8)) * se[c]), per_seed=per_seed[(new, base)],
            identical=same[(new, base)]))
    return {"metric": "macro_auroc", "level": level, "alpha": alpha, "resamples": int(resamples),
            "resamples_used": int(len(draws)), "max_t_quantile": q,
            "label_set": np.flatnonzero(label_set).tolist(), "rows": point,
            # each row's seed-averaged metric: its marginal percentile interval over the same draws
            "row_intervals": {r: [float(np.quantile(row_draws[:, i], tail)), float(np.quantile(row_draws[:, i], 1 - tail))]
                              if len(row_draws) else [float("nan")] * 2 for i, r in enumerate(rows)},
            "per_seed_rows": seed_scores,
            "seeds_per_row": {r: len(probs[r]) for r in rows},
            "contrasts": [asdict(c) for c in out],
            "method": "patient bootstrap, seeds averaged within each draw; two-sided normal p-values, "
                      "Holm-adjusted; simultaneous max-T intervals; detectable effect at 80% power, "
                      "Bonferroni level"}
