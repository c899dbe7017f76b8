"""The inference of EADF, free of Ray and of tables: intervals, tests, design effects, FDR.

Every function is vectorised over (phenotype, drug) pairs; the stratified ones take arrays
of shape (pairs, strata). Counts may be non-integer: they are the effective counts (counts
divided by a design effect) when visit pairs are clustered by patient.

- `newcombe`: Newcombe's hybrid score interval of p1 - p2 (the crude interval).
- `mantel_haenszel_rd`: the Mantel-Haenszel risk difference over strata with Sato's (1989)
  variance (the adjusted interval is the estimate +- z * sqrt(variance)).
- `cmh_score_p`: one-sided p-value of the Cochran-Mantel-Haenszel score test (one stratum:
  the score test of two proportions). A score test, not a Wald test: its variance is computed
  under the null from the pooled rate, so 10 of 10 resolved against 5 of 10 is not a zero
  variance and p near 0.
- `benjamini_hochberg`: q-values.
- `design_effect`: cluster-robust over binomial variance of a proportion from per-patient sums.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


def z_value(confidence: float) -> float:
    """Two-sided normal quantile of a `confidence` interval (0.95 -> 1.96)."""
    return _NORMAL.inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def normal_sf(z: np.ndarray) -> np.ndarray:
    """Upper tail of the standard normal, vectorised (NaN stays NaN)."""
    # not at module level: scipy, loaded only when this runs
    from scipy.special import ndtr

    return ndtr(-np.asarray(z, dtype=np.float64))


def normal_cdf(z: np.ndarray) -> np.ndarray:
    # not at module level: scipy, loaded only when this runs
    from scipy.special import ndtr

    return ndtr(np.asarray(z, dtype=np.float64))


def wilson(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k/n (vectorised); NaN where n == 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))  # exact at the ends, no float fuzz
    hi = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    nan = np.isnan(p)
    return np.where(nan, np.nan, lo), np.where(nan, np.nan, hi)


def newcombe(k1, n1, k2, n2, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval (his method 10) of p1 - p2; NaN where an arm is empty."""
    k1, n1, k2, n2 = (np.asarray(a, dtype=np.float64) for a in (k1, n1, k2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    lower = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return lower, upper


def _as_strata(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    return [a[:, None] if a.ndim == 1 else a for a in out]


def mantel_haenszel_rd(y1, n1, y0, n0) -> tuple[np.ndarray, np.ndarray]:
    """Mantel-Haenszel risk difference over strata and Sato's variance of it.

    Arrays (pairs, strata): resolved and pairs given (y1, n1) and not given (y0, n0). A
    stratum with an empty arm carries no information and gets weight 0.

        RD = sum_k (y1k n0k - y0k n1k) / Nk  /  W,     W = sum_k n1k n0k / Nk
        Var = (RD * sum_k Pk + sum_k Qk) / W^2
        Pk = (n1k^2 y0k - n0k^2 y1k + n1k n0k (n0k - n1k) / 2) / Nk^2
        Qk = (y1k (n0k - y0k) + y0k (n1k - y1k)) / (2 Nk)

    (Sato 1989, Biometrics 45:1323; consistent for many small strata and for few large ones.)
    NaN where no stratum has both arms.
    """
    y1, n1, y0, n0 = _as_strata(y1, n1, y0, n0)
    use = (n1 > 0) & (n0 > 0)
    big_n = np.where(use, n1 + n0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(use, n1 * n0 / big_n, 0.0).sum(axis=1)
        num = np.where(use, (y1 * n0 - y0 * n1) / big_n, 0.0).sum(axis=1)
        rd = np.where(w > 0, num / w, np.nan)
        p = np.where(use, (n1 ** 2 * y0 - n0 ** 2 * y1 + n1 * n0 * (n0 - n1) / 2) / big_n ** 2, 0.0).sum(axis=1)
        q = np.where(use, (y1 * (n0 - y0) + y0 * (n1 - y1)) / (2 * big_n), 0.0).sum(axis=1)
        var = np.where(w > 0, np.maximum(rd * p + q, 0.0) / w ** 2, np.nan)
    return rd, var


def cmh_score_p(y1, n1, y0, n0) -> np.ndarray:
    """One-sided p-value of the Cochran-Mantel-Haenszel score test that the given arm resolves
    more often (arrays (pairs, strata) or (pairs,) for one stratum).

        Z = sum_k (y1k - n1k mk / Nk) / sqrt(sum_k n1k n0k mk (Nk - mk) / (Nk^2 (Nk - 1)))

    with mk = y1k + y0k resolved in stratum k: the variance is the null (hypergeometric) one.
    Strata with an empty arm or Nk <= 1 carry no information. p = 1 where the null variance is
    0 (everyone resolved, or no one): the data cannot speak for the drug. No continuity
    correction (the counts may be effective, non-integer, counts).
    """
    y1, n1, y0, n0 = _as_strata(y1, n1, y0, n0)
    big_n = n1 + n0
    use = (n1 > 0) & (n0 > 0) & (big_n > 1)
    m = y1 + y0
    safe_n = np.where(use, big_n, 2.0)
    num = np.where(use, y1 - n1 * m / safe_n, 0.0).sum(axis=1)
    var = np.where(use, n1 * n0 * m * (safe_n - m) / (safe_n ** 2 * (safe_n - 1)), 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, num / np.sqrt(np.where(var > 0, var, 1.0)), -np.inf)
    p = normal_sf(z)
    return np.where(use.any(axis=1), p, np.nan)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1); NaN in, NaN out (a NaN
    p-value is not a test and does not count in the number of tests)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def design_effect(n, y, nn, ny, yy) -> np.ndarray:
    """Design effect of the proportion y / n when its n visit pairs come in patient clusters.

        deff = sum_c (y_c - p n_c)^2 / (n p (1 - p)),   p = y / n

    the cluster-robust (ratio estimator) variance over the binomial one, from the per-patient
    sums nn = sum_c n_c^2, ny = sum_c n_c y_c, yy = sum_c y_c^2. Where p is 0 or 1 every
    residual is 0 and the data cannot tell how correlated a patient's pairs are; then the
    value for complete within-patient correlation, nn / n (the pair-weighted mean number of
    pairs per patient), is used. Never below 1: clustering may not narrow an interval (a ratio
    below 1 is the sampling noise of few clusters). 1 where n == 0.
    """
    n, y, nn, ny, yy = (np.asarray(a, dtype=np.float64) for a in (n, y, nn, ny, yy))
    safe_n = np.where(n > 0, n, 1.0)
    p = y / safe_n
    ss = yy - 2.0 * p * ny + p * p * nn
    inner = (p > 0) & (p < 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(inner, ss / np.where(inner, safe_n * p * (1 - p), 1.0), nn / safe_n)
    return np.where(n > 0, np.maximum(1.0, ratio), 1.0)


def power_one_sided(p1, n1, p0, n0, alpha) -> np.ndarray:
    """Power of the one-sided score (z) test of two proportions at level `alpha` when the true
    rates are p1 (given, n1 pairs) and p0 (not given, n0 pairs):

        Phi((p1 - p0 - z_{1-alpha} sigma0) / sigma1),
        sigma0^2 = pbar (1 - pbar) (1/n1 + 1/n0),   sigma1^2 = p1 (1-p1)/n1 + p0 (1-p0)/n0.
    """
    # not at module level: scipy, loaded only when this runs
    from scipy.special import ndtri

    p1, n1, p0, n0 = (np.asarray(a, dtype=np.float64) for a in (p1, n1, p0, n0))
    alpha = np.asarray(alpha, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pbar = (n1 * p1 + n0 * p0) / (n1 + n0)
        s0 = np.sqrt(pbar * (1 - pbar) * (1 / n1 + 1 / n0))
        s1 = np.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        z_alpha = ndtri(1.0 - np.clip(alpha, 1e-15, 1.0 - 1e-15))
        out = normal_cdf((p1 - p0 - z_alpha * s0) / np.where(s1 > 0, s1, np.nan))
    return np.where((n1 > 0) & (n0 > 0), np.nan_to_num(out, nan=0.0), 0.0)
