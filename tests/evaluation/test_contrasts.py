"""Study statistics (ckd_ehr.evaluation.contrasts): the weighted bootstrap AUROC, Holm, intervals
that carry test patients and training seeds (checked by simulating whole studies at the shipped
design), cohorts pooled, and the summary the study builds from its directory alone."""
import numpy as np
import pytest
from scipy import stats

from ckd_ehr.evaluation.contrasts import Cohort, detectable_noncentrality, holm, study_contrasts
from ckd_ehr.metrics import auroc_draws, auroc_per_label, patient_resamples, patient_weights


def test_holm_matches_hand_computation():
    # sorted p 0.01, 0.02, 0.04 with m=3: 0.03, 0.04, 0.04 (monotone); NaN kept
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_weighted_draws_equal_the_auroc_of_resampled_rows():
    """auroc_draws with patient_weights is the AUROC of patient_resamples' rows, ties included."""
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 100, 230)
    y = (rng.random((230, 6)) < 0.2).astype(np.int8)
    p = rng.random((230, 6))
    p[:80, :3] = np.round(p[:80, :3], 1)            # ties
    p[:, 5] = (y[:, 5] + rng.random(230) > 0.8)     # a 0/1 predictor (copy-forward): ties only
    weights = patient_weights(subjects, 30, 7)
    for b, idx in enumerate(patient_resamples(subjects, 30, 7)):
        assert np.allclose(auroc_draws(y, p, weights[b:b + 1])[0], auroc_per_label(y[idx], p[idx]), equal_nan=True)


def _cohort(rng, patients=120, k=5):
    per = rng.integers(1, 4, patients)
    subjects = np.repeat(np.arange(patients), per)
    latent = rng.normal(size=(len(subjects), k)) + rng.normal(size=(patients, 1))[subjects]
    y = (rng.random(latent.shape) < 1 / (1 + np.exp(-2 * latent))).astype(np.int8)
    return y, subjects, latent


def _row(rng, latent, noise, seeds=2):
    return [latent + noise * rng.normal(size=latent.shape) for _ in range(seeds)]


def _contrasts(y, subjects, probs, contrasts, **kw):
    return study_contrasts([Cohort("c", y, subjects, probs)], contrasts, **kw)


# --- the shipped design, simulated ------------------------------------------------------------
# 3 training seeds, the demo test split's 231 patients (about 440 pairs), 8 phenotypes. Each row's
# score is the truth plus noise shared by every row (what any model sees), noise of the row shared
# by its seeds, and noise of the seed. Sized to the study's measured noise (docs/study/unverified/recipe_3seeds, (d)-(a)):
# between-seed SD of a contrast about 0.008, test-patient standard error under 0.005.
SIM = {"patients": 231, "labels": 8, "seeds": 3, "shared": 1.0, "row": 0.3, "seed": 1.5, "draws": 200}


def _sim_study(rng, seed_noise_b=SIM["seed"]):
    """One simulated study: rows a and b, b's seed noise `seed_noise_b` (a's: SIM's)."""
    per = 1 + rng.poisson(0.9, SIM["patients"])
    subjects = np.repeat(np.arange(SIM["patients"]), per)
    n, k = len(subjects), SIM["labels"]
    truth = rng.normal(size=(n, k)) + rng.normal(size=(SIM["patients"], 1))[subjects]
    y = (rng.random((n, k)) < 1 / (1 + np.exp(-(1.5 * truth - 2.5)))).astype(np.int8)
    shared = SIM["shared"] * rng.normal(size=(n, k))

    def row(seed_noise):
        own = SIM["row"] * rng.normal(size=(n, k))
        return {s: truth + shared + own + seed_noise * rng.normal(size=(n, k)) for s in range(SIM["seeds"])}

    out = _contrasts(y, subjects, {"a": row(SIM["seed"]), "b": row(seed_noise_b)}, [("b", "a")],
                     resamples=SIM["draws"], seed=int(rng.integers(1 << 30)))
    return out["contrasts"][0]


def _true_difference(seed_noise_b, n=200_000, seed=11):
    """The expected macro AUROC difference b - a of the simulation, from one very large cohort
    (test sampling and seed noise both negligible at this size)."""
    rng = np.random.default_rng(seed)
    k = SIM["labels"]
    truth = rng.normal(size=(n, k)) + rng.normal(size=(n, 1))
    y = (rng.random((n, k)) < 1 / (1 + np.exp(-(1.5 * truth - 2.5)))).astype(np.int8)
    base = truth + SIM["shared"] * rng.normal(size=(n, k))

    def score(noise):
        return np.nanmean(auroc_per_label(y, base + np.hypot(SIM["row"], noise) * rng.normal(size=(n, k))))

    return score(seed_noise_b) - score(SIM["seed"])


@pytest.mark.slow
def test_intervals_cover_at_the_shipped_design_and_find_the_detectable_difference():
    """Null control: 1,000 simulated studies with no true difference; the 95% intervals must cover
    0 in 93-97% of them (intervals from the test-patient bootstrap alone covered far less, adding
    the whole bootstrap variance to the seeds' far more). Then 1,000 studies with a true difference
    of the median detectable size: found (Holm p < 0.05) at about the stated 80% power."""
    rng = np.random.default_rng(2026)
    null = [_sim_study(rng) for _ in range(1000)]
    covered = np.mean([c["marginal_interval"][0] <= 0.0 <= c["marginal_interval"][1] for c in null])
    print(f"null: coverage {covered:.3f}, median detectable {np.median([c['detectable'] for c in null]):.4f}, "
          f"median df {np.median([c['df'] for c in null]):.1f}")
    assert 0.93 <= covered <= 0.97, covered
    assert np.mean([c["p_holm"] < 0.05 for c in null]) <= 0.07
    assert all(c["seed_noise_estimated"] and np.isfinite(c["df"]) for c in null)
    # The design's detectable difference: the non-centrality that gives 80% power at the median
    # degrees of freedom, times the estimate's true spread (the null studies' standard deviation).
    # Each study reports the same with its own se in place of the true spread (a noisy estimate
    # of it at 2-3 degrees of freedom); their median is printed beside it.
    q = stats.t.ppf(0.975, np.median([c["df"] for c in null]))
    detectable = detectable_noncentrality(q, np.median([c["df"] for c in null])) * np.std([c["delta"] for c in null])
    print(f"design detectable {detectable:.4f}; studies report a median {np.median([c['detectable'] for c in null]):.4f}")
    # the sizes the simulation stands for: seed spread and test-patient error as measured
    assert 0.005 < np.sqrt(np.mean([np.var(c["per_seed"], ddof=1) for c in null])) < 0.012
    assert np.median([c["se_test"] for c in null]) < 0.005

    # a row with less seed noise, its true advantage within 5% of the detectable difference
    lo, hi = 0.0, SIM["seed"]
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _true_difference(mid) > detectable else (lo, mid)
    better = (lo + hi) / 2
    assert _true_difference(better, seed=12) == pytest.approx(detectable, rel=0.05)
    found = np.mean([(c["p_holm"] < 0.05) and c["delta"] > 0 for c in (_sim_study(rng, better) for _ in range(1000))])
    print(f"true difference {detectable:.4f}: found in {found:.3f} of 1000 studies")
    assert 0.74 <= found <= 0.86, found   # 80% +- 5 binomial standard errors


def test_null_rows_are_rejected_at_the_nominal_rate_and_a_real_difference_is_found():
    """Null control with a real difference beside it: two rows drawn alike (same signal, same
    noise level, independent noise per seed) are rejected about 5% of the time, not more; a row
    with less noise is found most of the time."""
    rng = np.random.default_rng(0)
    reps, rejected, found = 40, 0, 0
    for _ in range(reps):
        y, subjects, latent = _cohort(rng)
        probs = {"a": _row(rng, latent, 1.5, 3), "b": _row(rng, latent, 1.5, 3), "better": _row(rng, latent, 0.6, 3)}
        out = _contrasts(y, subjects, probs, [("a", "b"), ("better", "b")], resamples=80,
                         seed=int(rng.integers(1 << 30)))
        null, real = out["contrasts"]
        rejected += null["p_holm"] < 0.05
        found += real["p_holm"] < 0.05
    # binomial(40, 0.05): P(X > 7) < 0.005
    assert rejected <= 7, rejected
    assert found >= 0.8 * reps, found


def test_rows_intervals_unpaired_contrasts_and_bad_input():
    rng = np.random.default_rng(1)
    y, subjects, latent = _cohort(rng)
    probs = {"a": _row(rng, latent, 0.5, seeds=3), "b": _row(rng, latent, 2.0, seeds=1),
             "in_no_contrast": _row(rng, latent, 1.0, seeds=2)}
    out = _contrasts(y, subjects, probs, [("a", "b")], resamples=50)
    c = out["contrasts"][0]
    assert out["cohorts"]["c"]["seeds_per_row"] == {"a": 3, "b": 1, "in_no_contrast": 2}
    # every row, in a contrast or not, gets its seed mean, an interval around it, its per-seed values
    for r, e in out["rows"].items():
        assert e["interval"][0] < e["value"] < e["interval"][1] and len(e["per_seed"]) == len(probs[r])
    assert out["rows"]["a"]["value"] == pytest.approx(np.mean(out["rows"]["a"]["per_seed"]))
    # one seed: its seed noise cannot be estimated, and the interval says it carries test patients only
    assert not out["rows"]["b"]["seed_noise_estimated"] and out["rows"]["b"]["df"] == float("inf")
    assert out["rows"]["a"]["seed_noise_estimated"] and out["rows"]["a"]["df"] >= 2
    assert out["rows"]["a"]["interval"][0] > out["rows"]["b"]["interval"][1]   # less noise: clearly better
    # seeds differ (3 against 1): not paired, the difference of the seed means, b's seed noise unknown
    assert c["per_seed"] == [] and not c["seed_noise_estimated"]
    assert c["delta"] == pytest.approx(out["rows"]["a"]["value"] - out["rows"]["b"]["value"])
    assert c["interval"][0] < c["marginal_interval"][0] < c["delta"] < c["marginal_interval"][1] < c["interval"][1] \
        or len(out["contrasts"]) == 1   # one contrast: Bonferroni is the marginal interval
    assert c["p"] >= out["p_floor"] == 1 / 50
    with pytest.raises(ValueError, match="no predictions in any cohort: c"):
        _contrasts(y, subjects, probs, [("c", "a")], resamples=5)
    with pytest.raises(ValueError, match="shape"):
        _contrasts(y, subjects, {"a": [latent[:5]], "b": probs["b"]}, [("a", "b")], resamples=5)


def test_cohorts_pool_with_fixed_effect_weights_and_borrow_seed_variance():
    """Two cohorts, the second with one seed: per cohort and pooled; the second borrows the first's
    seed variance (so its interval is not test patients only); the pooled value lies between the
    cohorts' and its standard error is below both; a contrast missing from a cohort is read where
    both rows exist."""
    rng = np.random.default_rng(4)
    y1, s1, l1 = _cohort(rng, patients=150)
    y2, s2, l2 = _cohort(rng, patients=150)
    c1 = Cohort("one", y1, s1, {"a": _row(rng, l1, 1.0, 3), "b": _row(rng, l1, 1.5, 3), "x": _row(rng, l1, 2.0, 1)})
    c2 = Cohort("two", y2, s2, {"a": _row(rng, l2, 1.0, 1), "b": _row(rng, l2, 1.5, 1)})
    out = study_contrasts([c1, c2], [("a", "b"), ("x", "a")], resamples=60)
    one, two = (out["cohorts"][n]["contrasts"][0] for n in ("one", "two"))
    pooled = out["contrasts"][0]
    assert two["seed_noise_estimated"] and two["se_seed"] > 0   # borrowed from cohort one
    assert min(one["delta"], two["delta"]) <= pooled["delta"] <= max(one["delta"], two["delta"])
    assert pooled["se"] < min(one["se"], two["se"])
    assert out["pooled_over"] == ["one", "two"]
    assert [c["name"] for c in out["cohorts"]["two"]["contrasts"]] == ["a - b"]   # x is not in cohort two
    assert out["contrasts"][1]["delta"] == pytest.approx(out["cohorts"]["one"]["contrasts"][1]["delta"])


def test_forest_plot_and_table_render():
    from ckd_ehr.evaluation.report import fmt_p, plot_contrasts, render_markdown
    from ckd_ehr.study.summary import contrast_blocks

    rng = np.random.default_rng(2)
    y, subjects, latent = _cohort(rng, patients=60)
    probs = {"a": _row(rng, latent, 0.5), "b": _row(rng, latent, 1.0), "c": _row(rng, latent, 1.0)}
    study = _contrasts(y, subjects, probs, [("a", "b"), ("c", "b")], resamples=30)
    png = plot_contrasts(study)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = render_markdown(contrast_blocks(study))
    assert "a - b" in md and "c - b" in md and "Holm" in md and "Satterthwaite" in md
    assert fmt_p(0.0) == "< 1e-15" and fmt_p(0.0131) == "0.0131"   # an underflowed p is not printed as 0


def test_rows_with_identical_predictions_are_named_not_given_a_nan_p():
    """Two rows that kept the same step-0 probe give the same predictions in every seed (the
    multi-granularity study of 2026-12-06): the contrast says so instead of printing p = nan;
    a row equal in one seed only is still compared."""
    from ckd_ehr.evaluation.report import plot_contrasts, render_markdown
    from ckd_ehr.study.summary import contrast_blocks

    rng = np.random.default_rng(3)
    y, subjects, latent = _cohort(rng, patients=60)
    a = _row(rng, latent, 0.5, seeds=2)
    probs = {"a": a, "copy": [p.copy() for p in a], "half": [a[0].copy(), _row(rng, latent, 0.5)[0]]}
    study = _contrasts(y, subjects, probs, [("copy", "a"), ("half", "a")], resamples=30)
    same, half = study["contrasts"]
    assert same["identical"] and same["delta"] == 0.0 and np.isnan(same["p_holm"])
    assert not half["identical"] and np.isfinite(half["p_holm"])
    md = render_markdown(contrast_blocks(study))
    assert "identical predictions in every seed: nothing compared" in md and "nan" not in md
    assert plot_contrasts(study)[:8] == b"\x89PNG\r\n\x1a\n"
