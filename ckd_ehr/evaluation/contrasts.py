"""Study statistics: rows and contrasts over cohorts, training seeds and test patients.

Setting: within a cohort (one synthetic generator seed, hence one patient split and one EADF
table) every row (a model variant) is trained once per training seed and scored on the same
test samples. The primary metric is macro AUROC over the phenotypes with at least 5 test
positives, fixed once per cohort on its full test split.

Two sources of noise enter every interval (each study.md states the method beside the figures):

- test patients: a patient bootstrap. Each draw resamples the cohort's test PATIENTS (all their
  samples come along, as sample weights: ckd_ehr.metrics.auroc_draws); within a draw
  every row and seed is scored on the same resampled samples, so the pairing of rows on the same
  patients is kept. V_test = the bootstrap variance of the seed-averaged quantity.
- training seeds: the spread of the quantity between seeds on the whole test split (for a
  contrast of rows with the same seeds, the per-seed paired differences). The seed variance s^2
  is pooled over cohorts (degrees of freedom: seeds - 1 summed over cohorts) and enters as
  s^2 / seeds. Where no cohort has two seeds of a quantity it cannot be estimated: the interval
  then carries test patients only and says so (`seed_noise_estimated` False).

A cohort's estimate is the seed mean with variance V = V_test + s^2 / seeds; cohorts are
pooled with fixed-effect (inverse-variance) weights, which assumes one true value for all
cohorts and cannot estimate between-cohort variance. Intervals and p-values use Student's t
on Welch-Satterthwaite degrees of freedom (the bootstrap part counted as exact, the seed part
with its seed degrees of freedom): with few seeds and noisy seeds the reference is close to
t on seeds - 1; with negligible seed noise it tends to the normal. Multiplicity: Holm's
step-down adjustment of the p-values over the contrasts and simultaneous Bonferroni-t
intervals. A p-value is never reported below 1 / resamples (`p_floor`): neither the bootstrap
nor a handful of seeds supports a finer tail. Detectable effect: the difference a contrast
would detect with 80% power at the Bonferroni level: nc * se, nc the non-centrality at which
a non-central t on the interval's degrees of freedom exceeds t_{1-alpha/2C} in either tail
80% of the time. (The textbook (t_{1-alpha/2C} + t_0.8) * se ignores that se is itself
estimated from a few seeds: at 2.5 degrees of freedom its "80%" found 70% in simulation.)

No Ray, no models: arrays in, a dict out. Tests: tests/evaluation/test_contrasts.py simulates 1,000
studies at the shipped design with no true difference (the intervals must cover 0 in 93-97%
of them) and with a true difference of the detectable size (found at about 80%).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from scipy.optimize import brentq

from ckd_ehr.metrics import auroc_draws, macro_label_set, patient_weights

METHOD = ("per cohort: seed mean of the paired per-seed differences; variance = patient-bootstrap variance of "
          "the seed mean + between-seed variance / seeds (seed variance pooled over cohorts); cohorts pooled "
          "with fixed-effect inverse-variance weights (no between-cohort variance); Student t on "
          "Welch-Satterthwaite degrees of freedom; Holm-adjusted p-values, simultaneous Bonferroni-t intervals; "
          "detectable effect at 80% power, Bonferroni level; p floored at 1/resamples")


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


def detectable_noncentrality(q: float, df: float, power: float = 0.8) -> float:
    """The non-centrality nc at which |T| > q with probability `power`, T a non-central t on
    `df` degrees of freedom (the normal when df is infinite)."""

    def found(nc: float) -> float:
        if not np.isfinite(df) or df > 1e4:   # the normal, where scipy's non-central t turns NaN
            return float(stats.norm.sf(q - nc) + stats.norm.cdf(-q - nc)) - power
        # the far tail is negligible, and scipy returns NaN for it at larger non-centralities
        return float(stats.nct.sf(q, df, nc) + np.nan_to_num(stats.nct.cdf(-q, df, nc))) - power

    hi = q + 1.0
    while found(hi) < 0:   # the power rises with nc; widen until the bracket holds the root
        hi *= 2
    return float(brentq(found, 0.0, hi))


@dataclass
class Cohort:
    """One cohort's test split and every row's test predictions, per training seed."""

    name: str
    y: np.ndarray
    """[N, K] test labels."""
    subject_ids: np.ndarray
    """[N] patient of each test sample (the bootstrap resamples patients)."""
    probs: Mapping[str, Mapping[int, np.ndarray]]
    """row -> training seed -> [N, K] probabilities, rows in the order of `y`."""
    label_set: np.ndarray | None = None
    """Phenotypes the macro averages (default: at least 5 positives in this test split)."""

    def __post_init__(self):
        self.y = np.asarray(self.y)
        self.subject_ids = np.asarray(self.subject_ids)
        self.probs = {r: dict(enumerate(v)) if isinstance(v, (list, tuple)) else dict(v)
                      for r, v in self.probs.items() if len(v)}
        if self.label_set is None:
            self.label_set = macro_label_set(self.y)
        self.label_set = np.asarray(self.label_set, dtype=bool)
        for r, by_seed in self.probs.items():
            for s, p in by_seed.items():
                if np.shape(p) != self.y.shape:
                    raise ValueError(f"cohort {self.name}, row {r}, seed {s}: predictions of shape {np.shape(p)}, "
                                     f"labels {self.y.shape}")


@dataclass
class _Estimate:
    """A seed-averaged quantity of one cohort (or pooled): value, bootstrap variance, seed terms."""

    value: float
    v_boot: float
    """Bootstrap (test-patient) variance of the seed mean, seeds held fixed."""
    seed_terms: dict = field(default_factory=dict)
    """seed quantity -> coefficient a: the seed variance is sum(a * s2[q]), and sum(a * iota2[q])
    of the bootstrap variance is seed-specific (counted in s2 already)."""
    per_seed: list = field(default_factory=list)


@dataclass
class Interval:
    value: float
    se: float
    se_test: float
    """Test patients: the part of the bootstrap variance shared by the seeds."""
    se_seed: float
    """Training seeds: between-seed variance / seeds."""
    df: float
    """Welch-Satterthwaite degrees of freedom (inf: no seed part)."""
    interval: list
    seed_noise_estimated: bool
    per_seed: list


@dataclass
class _SeedVariance:
    """Per seed quantity, pooled over cohorts: between-seed variance s2 with its degrees of
    freedom, and iota2, the seed-specific part of one seed's bootstrap variance."""

    s2: dict
    dof: dict
    iota2: dict

    def known(self, est: _Estimate) -> bool:
        return bool(est.seed_terms) and all(self.dof.get(q, 0) > 0 for q in est.seed_terms)

    def split(self, est: _Estimate) -> tuple[float, float]:
        """(test variance, seed variance) of an estimate. The bootstrap variance of a seed mean
        holds the test patients shared by every seed plus each seed's own test-specific noise
        (iota2 / seeds), which the between-seed variance already counts: taken out once."""
        if not self.known(est):
            return est.v_boot, 0.0
        v_seed = sum(a * self.s2[q] for q, a in est.seed_terms.items())
        v_test = est.v_boot - sum(a * (self.iota2.get(q) or 0.0) for q, a in est.seed_terms.items())
        return max(v_test, 0.0), v_seed

    def resolve(self, est: _Estimate, level: float) -> Interval:
        v_test, v_seed = self.split(est)
        v = v_test + v_seed
        df = float("inf")
        if v_seed > 0:
            df = v ** 2 / sum((a * self.s2[q]) ** 2 / self.dof[q] for q, a in est.seed_terms.items())
        se = float(np.sqrt(v))
        q = float(stats.t.ppf(0.5 + level / 2, df))
        return Interval(value=float(est.value), se=se, se_test=float(np.sqrt(v_test)), se_seed=float(np.sqrt(v_seed)),
                        df=float(df), interval=[float(est.value - q * se), float(est.value + q * se)],
                        seed_noise_estimated=self.known(est), per_seed=list(est.per_seed))

    def pool(self, ests: Sequence[_Estimate]) -> _Estimate:
        """Fixed-effect inverse-variance pooling of cohort estimates (weights from each cohort's
        total variance); the pooled bootstrap variance and seed terms are the weighted sums."""
        if len(ests) == 1:
            return ests[0]
        w = 1.0 / np.maximum([sum(self.split(e)) for e in ests], 1e-18)
        w = w / w.sum()
        terms: dict = {}
        for wi, e in zip(w, ests):
            for q, a in e.seed_terms.items():
                terms[q] = terms.get(q, 0.0) + wi ** 2 * a
        return _Estimate(value=float(sum(wi * e.value for wi, e in zip(w, ests))),
                         v_boot=float(sum(wi ** 2 * e.v_boot for wi, e in zip(w, ests))), seed_terms=terms,
                         per_seed=[v for e in ests for v in e.per_seed])


class _CohortScores:
    """Every (row, seed)'s macro AUROC on a cohort's whole test split and on each bootstrap draw,
    and the seed quantities (a row; the per-seed difference of two rows with the same seeds)
    that estimates are built from."""

    def __init__(self, cohort: Cohort, resamples: int, seed: int):
        self.cohort = cohort
        weights = patient_weights(cohort.subject_ids, resamples, seed)
        ls = cohort.label_set
        self.point: dict[str, dict[int, float]] = {}
        draws: dict[str, dict[int, np.ndarray]] = {}
        ones = np.ones((1, len(cohort.y)))
        for r, by_seed in cohort.probs.items():
            self.point[r], draws[r] = {}, {}
            for s, p in by_seed.items():
                full = auroc_draws(cohort.y[:, ls], p[:, ls], ones)[0]
                self.point[r][s] = float(full.mean()) if not np.isnan(full).any() else float("nan")
                per = auroc_draws(cohort.y[:, ls], p[:, ls], weights)
                draws[r][s] = np.where(np.isnan(per).any(axis=1), np.nan, per.mean(axis=1))
        flat = [d for by_seed in draws.values() for d in by_seed.values()]
        # a draw where a phenotype of the label set lost a class is dropped for every row
        self.ok = ~np.isnan(np.stack(flat)).any(axis=0) if flat else np.zeros(resamples, bool)
        self.draws = {r: {s: d[self.ok] for s, d in by_seed.items()} for r, by_seed in draws.items()}

    def seeds(self, row: str) -> list[int]:
        return sorted(self.point.get(row, {}))

    def has(self, comp: tuple) -> bool:
        if comp[0] == "row":
            return comp[1] in self.point
        return comp[1] in self.point and comp[2] in self.point and self.seeds(comp[1]) == self.seeds(comp[2])

    def quantity(self, comp: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(per-seed values [S] on the whole split, per-seed bootstrap draws [S, B]) of a seed
        quantity: ("row", r) or ("diff", new, base)."""
        if comp[0] == "row":
            seeds = self.seeds(comp[1])
            return (np.array([self.point[comp[1]][s] for s in seeds]),
                    np.stack([self.draws[comp[1]][s] for s in seeds]))
        _, new, base = comp
        seeds = self.seeds(new)
        return (np.array([self.point[new][s] - self.point[base][s] for s in seeds]),
                np.stack([self.draws[new][s] - self.draws[base][s] for s in seeds]))

    def estimate(self, terms: Sequence[tuple[tuple, float]]) -> _Estimate:
        """sum(sign * seed mean of comp) over `terms`: the value, the bootstrap variance of that
        sum (test patients, interaction parts still in: _resolve takes them out) and its terms."""
        value, draws, per_seed = 0.0, 0.0, []
        for comp, sign in terms:
            vals, d = self.quantity(comp)
            value, draws = value + sign * vals.mean(), draws + sign * d.mean(axis=0)
            per_seed = vals.tolist() if len(terms) == 1 else []
        return _Estimate(float(value), _var(np.asarray(draws)),
                         {comp: 1.0 / len(self.quantity(comp)[0]) for comp, _ in terms}, per_seed)

    def spread(self, comp: tuple) -> tuple[float, int, float | None]:
        """(sum of squares of the per-seed values about their mean, its degrees of freedom, the
        seed-specific part of the bootstrap variance: mean diagonal minus mean off-diagonal of the
        per-seed draws' covariance, None with one seed)."""
        vals, d = self.quantity(comp)
        ss = float(((vals - vals.mean()) ** 2).sum())
        if len(vals) < 2 or d.shape[1] < 2:
            return ss, len(vals) - 1, None
        cov = np.cov(d)
        off = (cov.sum() - np.trace(cov)) / (len(vals) * (len(vals) - 1))
        return ss, len(vals) - 1, float(max(np.trace(cov) / len(vals) - off, 0.0))


def _var(draws: np.ndarray) -> float:
    return float(np.var(draws, ddof=1)) if np.size(draws) > 1 else float("nan")


def _check_contrasts(cohorts: Sequence[Cohort], contrasts: Sequence[tuple[str, str]]) -> None:
    """ValueError for no cohort, or a contrast whose rows no cohort has both of."""
    if not cohorts:
        raise ValueError("no cohort to summarise")
    for new, base in contrasts:   # a contrast is read in the cohorts that have both rows
        if not any(new in c.probs and base in c.probs for c in cohorts):
            missing = sorted({r for c in cohorts for r in (new, base) if r not in c.probs})
            raise ValueError(f"contrast {new} - {base} names rows with no predictions in any cohort: "
                             f"{', '.join(missing)}")


def _seed_variance(scored: Sequence[_CohortScores], quantities: set) -> _SeedVariance:
    """Each quantity's seed variance pooled over the cohorts that have it (sums of squares and
    degrees of freedom added), with the mean test-noise term iota^2 where known."""
    var = _SeedVariance({}, {}, {})
    for q in sorted(quantities, key=str):
        got = [sc.spread(q) for sc in scored if sc.has(q)]
        var.dof[q] = int(sum(d for _, d, _ in got))
        var.s2[q] = float(sum(ss for ss, _, _ in got) / var.dof[q]) if var.dof[q] > 0 else float("nan")
        iotas = [i for _, _, i in got if i is not None]
        var.iota2[q] = float(np.mean(iotas)) if iotas else None
    return var


def study_contrasts(cohorts: Sequence[Cohort], contrasts: Sequence[tuple[str, str]], resamples: int = 1000,
                    seed: int = 0, level: float = 0.95, alpha: float = 0.05) -> dict:
    """Every row's seed-averaged macro AUROC and every contrast `new - base`, per cohort and
    pooled over cohorts, with intervals that carry test patients and seeds (module docstring).

    Returns {"metric", "level", "alpha", "resamples", "method", "p_floor", "rows": {row:
    interval dict}, "contrasts": [contrast dicts], "cohorts": {name: {"rows", "contrasts",
    "resamples_used", "test_samples", "test_patients", "seeds_per_row", "label_set"}},
    "seed_variance"}; the top-level rows and contrasts are pooled over the cohorts (the one
    cohort's own when there is one)."""
    _check_contrasts(cohorts, contrasts)
    scored = [_CohortScores(c, resamples, seed + i) for i, c in enumerate(cohorts)]
    rows = sorted({r for c in cohorts for r in c.probs})

    def contrast_terms(sc: _CohortScores, new: str, base: str) -> list[tuple[tuple, float]]:
        # paired by seed when both rows have the same seeds, else the difference of the seed means
        return [(("diff", new, base), 1.0)] if sc.has(("diff", new, base)) else [(("row", new), 1.0),
                                                                                   (("row", base), -1.0)]

    row_ests = [{r: sc.estimate([(("row", r), 1.0)]) for r in rows if r in sc.point} for sc in scored]
    con_ests = [{i: sc.estimate(contrast_terms(sc, n, b)) for i, (n, b) in enumerate(contrasts)
                 if n in sc.point and b in sc.point} for sc in scored]
    quantities = {q for ests in row_ests for e in ests.values() for q in e.seed_terms} | \
                 {q for ests in con_ests for e in ests.values() for q in e.seed_terms}
    var = _seed_variance(scored, quantities)
    t_simul = 1 - alpha / (2 * max(len(contrasts), 1))
    p_floor = 1.0 / resamples

    def contrast_dicts(ests: Mapping[int, _Estimate], identical: Sequence[bool]) -> list[dict]:
        """Contrast i of `contrasts` for each i in `ests`, Holm over those."""
        out, ps = [], []
        for i, est in ests.items():
            (new, base), same = contrasts[i], identical[i]
            iv = var.resolve(est, level)
            q = float(stats.t.ppf(t_simul, iv.df))
            p = float("nan") if same or not iv.se > 0 else \
                max(float(2 * stats.t.sf(abs(iv.value) / iv.se, iv.df)), p_floor)
            ps.append(p)
            out.append({"name": f"{new} - {base}", "new": new, "base": base, "delta": iv.value, "se": iv.se,
                        "se_test": iv.se_test, "se_seed": iv.se_seed, "df": iv.df, "p": p,
                        "marginal_interval": iv.interval, "interval": [iv.value - q * iv.se, iv.value + q * iv.se],
                        "detectable": float("nan") if same else detectable_noncentrality(q, iv.df) * iv.se,
                        "per_seed": iv.per_seed, "seed_noise_estimated": iv.seed_noise_estimated,
                        "identical": bool(same), "p_at_floor": bool(p == p_floor)})
        for c, ph in zip(out, holm(ps)):
            c["p_holm"] = ph
        return out

    def identical_in(sc_list: Sequence[_CohortScores]) -> list[bool]:
        return [all(sc.cohort.probs[n].keys() == sc.cohort.probs[b].keys() and
                    all(np.array_equal(sc.cohort.probs[n][s], sc.cohort.probs[b][s]) for s in sc.cohort.probs[n])
                    for sc in sc_list if n in sc.point and b in sc.point) for n, b in contrasts]

    by_cohort = {}
    for sc, r_est, c_est in zip(scored, row_ests, con_ests):
        c = sc.cohort
        by_cohort[c.name] = {
            "test_samples": int(len(c.y)), "test_patients": int(len(np.unique(c.subject_ids))),
            "resamples_used": int(sc.ok.sum()), "label_set": np.flatnonzero(c.label_set).tolist(),
            "seeds_per_row": {r: len(sc.seeds(r)) for r in r_est},
            "rows": {r: asdict(var.resolve(e, level)) for r, e in r_est.items()},
            "contrasts": contrast_dicts(c_est, identical_in([sc]))}
    pooled_rows = {r: asdict(var.resolve(var.pool([e[r] for e in row_ests if r in e]), level)) for r in rows}
    pooled_con = contrast_dicts({i: var.pool([e[i] for e in con_ests if i in e]) for i in range(len(contrasts))},
                                identical_in(scored))
    return {"metric": "macro_auroc", "level": level, "alpha": alpha, "resamples": int(resamples),
            "method": METHOD, "p_floor": p_floor, "pooled_over": [c.name for c in cohorts],
            "rows": pooled_rows, "contrasts": pooled_con, "cohorts": by_cohort,
            "seed_variance": {" / ".join(map(str, q)): {"s2": var.s2[q], "df": var.dof[q], "iota2": var.iota2[q]}
                              for q in sorted(quantities, key=str)}}
