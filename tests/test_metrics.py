"""Every metric against scikit-learn on random data, thresholds, and the patient bootstrap."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from ckd_ehr import metrics as M
from ckd_ehr.phenotypes import phenotype_names


def random_case(n=300, k=25, seed=0, all_positive=True):
    """Labels with an all-negative phenotype (3), an all-positive one (4) unless all_positive
    is False (then some rows are all zero), and probabilities rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.05, 0.5, k)).astype(np.int8)
    y[:, 3] = 0
    y[:15] = 0
    if all_positive:
        y[:, 4] = 1
    p = np.clip(0.35 * y + 0.65 * rng.random((n, k)), 0, 1).round(2)
    return y, p


def test_thresholded_metrics_match_sklearn():
    y, p = random_case(all_positive=False)
    assert (y.sum(axis=1) == 0).any()               # rows with no label: samples-F1 zero division
    for thresholds in (0.5, np.random.default_rng(1).uniform(0.2, 0.8, 25)):
        pred = M.binarize(p, thresholds)
        got = M.thresholded_scores(y, pred)
        assert got["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred))
        assert got["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        for avg in ("macro", "micro", "weighted", "samples"):
            assert got[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, pred, average=avg, zero_division=0)), avg


def test_ranking_metrics_match_sklearn_and_skip_single_class():
    y, p = random_case()
    auc, ap = M.auroc_and_ap_per_label(y, p)
    single = M.single_class_labels(y)
    assert single.tolist() == [j in (3, 4) for j in range(25)]
    assert np.isnan(auc[single]).all() and np.isnan(ap[single]).all()
    for j in np.flatnonzero(~single):
        assert auc[j] == pytest.approx(skm.roc_auc_score(y[:, j], p[:, j]))
        assert ap[j] == pytest.approx(skm.average_precision_score(y[:, j], p[:, j]))
    got = M.ranking_scores(y, p)
    ok = ~single
    assert got["macro_auroc"] == pytest.approx(skm.roc_auc_score(y[:, ok], p[:, ok], average="macro"))
    assert got["macro_auprc"] == pytest.approx(skm.average_precision_score(y[:, ok], p[:, ok], average="macro"))
    assert got["micro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, average="micro"))
    assert got["micro_auprc"] == pytest.approx(skm.average_precision_score(y, p, average="micro"))
    result = M.evaluate_predictions(y, p)
    assert result["auroc_skipped"] == [phenotype_names()[3], phenotype_names()[4]]


def test_ranking_metrics_use_probabilities_not_predictions():
    y, p = random_case()
    at_half = M.all_scores(y, p, 0.5)
    at_other = M.all_scores(y, p, 0.3)
    for m in M.RANKING:
        assert at_half[m] == at_other[m]
    # The release's flaw: AUROC of 0/1 predictions is a different (lower) number.
    flawed = skm.roc_auc_score(y.ravel(), M.binarize(p, 0.5).ravel())
    assert at_half["micro_auroc"] > flawed + 0.01


def test_per_phenotype_table_matches_sklearn():
    y, p = random_case()
    t = np.linspace(0.3, 0.7, 25)
    rows = M.per_phenotype_table(y, p, t)
    prec, rec, f1, support = skm.precision_recall_fscore_support(y, M.binarize(p, t), average=None, zero_division=0)
    assert [r["phenotype"] for r in rows] == phenotype_names()
    for j, r in enumerate(rows):
        assert (r["support"], r["threshold"]) == (support[j], pytest.approx(t[j]))
        assert r["prevalence"] == pytest.approx(support[j] / len(y))
        assert (r["precision"], r["recall"], r["f1"]) == (pytest.approx(prec[j]), pytest.approx(rec[j]),
                                                         pytest.approx(f1[j]))
    assert rows[3]["auroc"] is None and rows[4]["auprc"] is None
    assert rows[0]["auroc"] == pytest.approx(skm.roc_auc_score(y[:, 0], p[:, 0]))


def test_tune_thresholds_maximise_f1_per_phenotype():
    y, p = random_case(n=200, seed=3)
    tuned = M.tune_thresholds(y, p, "f1")
    assert M.tune_thresholds(y, p, "fixed") == [0.5] * 25
    assert tuned[3] == 0.5                      # no positives: every cut has F1 0, keep the default
    for j in range(25):
        if j == 3:
            continue
        # Brute force: F1 of every cut "p >= c" at the observed scores c.
        cuts = p[:, j][:, None] >= np.unique(p[:, j])[None, :]
        tp = np.sum(cuts & (y[:, j][:, None] > 0), axis=0)
        best = np.max(2 * tp / (cuts.sum(axis=0) + y[:, j].sum()))
        got = skm.f1_score(y[:, j], (p[:, j] >= tuned[j]).astype(int), zero_division=0)
        assert got == pytest.approx(best), j
    with pytest.raises(ValueError):
        M.tune_thresholds(y, p, "youden")


def test_bootstrap_interval_contains_point_and_narrows_with_more_patients():
    widths = []
    for n in (100, 1600):
        y, p = random_case(n=n, seed=5)
        subjects = np.arange(n) // 2                            # two samples per patient
        result = M.evaluate_predictions(y, p, subjects, 0.5, bootstrap=100, seed=0)
        assert result["n_patients"] == n // 2
        for m in M.ALL_METRICS:
            lo, hi = result["intervals"][m]
            assert lo <= result["metrics"][m] <= hi, m
        widths.append(np.diff(result["intervals"]["macro_f1"])[0])
    assert widths[1] < widths[0] / 2


def test_resamples_draw_patients_with_all_their_samples():
    subjects = np.array([7, 7, 7, 3, 9, 9, 1, 1, 1, 1, 5])   # unsorted ids, uneven sample counts
    n_patients = len(np.unique(subjects))
    for idx in M.patient_resamples(subjects, 50, seed=1):
        drawn = subjects[idx]
        for s in np.unique(subjects):
            rows = np.flatnonzero(subjects == s)
            counts = [np.sum(idx == r) for r in rows]
            assert len(set(counts)) == 1                    # the patient's samples come together
            assert np.sum(drawn == s) == counts[0] * len(rows)
        assert sum(np.sum(drawn == s) // np.sum(subjects == s) for s in np.unique(subjects)) == n_patients


def test_duplicating_a_patients_samples_keeps_them_one_unit():
    subjects = np.arange(30)
    dup = np.concatenate([subjects, [4, 4, 4]])                # three more samples of patient 4
    for idx in M.patient_resamples(dup, 100, seed=2):
        copies = [np.sum(idx == r) for r in (4, 30, 31, 32)]
        assert len(set(copies)) == 1                            # drawn together, as one patient
    # Given fresh ids, the same rows are separate units and get drawn independently.
    fresh = np.concatenate([subjects, [100, 101, 102]])
    differs = any(len({np.sum(idx == r) for r in (4, 30, 31, 32)}) > 1
                  for idx in M.patient_resamples(fresh, 100, seed=2))
    assert differs


def test_patient_bootstrap_is_wider_than_sample_bootstrap_on_clustered_errors():
    """A patient's samples are all right or all wrong: resampling samples would pretend each
    is independent evidence and give an interval that is too narrow."""
    rng = np.random.default_rng(0)
    n_patients, per = 40, 10
    subjects = np.repeat(np.arange(n_patients), per)
    y = (rng.random((n_patients * per, 25)) < 0.3).astype(np.int8)
    right = np.repeat(rng.random(n_patients) < 0.6, per)[:, None]
    p = np.where(right, y * 0.8 + 0.1, (1 - y) * 0.8 + 0.1)
    patient = M.evaluate_predictions(y, p, subjects, 0.5, bootstrap=200)["intervals"]["accuracy"]
    sample = M.evaluate_predictions(y, p, None, 0.5, bootstrap=200)["intervals"]["accuracy"]
    assert np.diff(patient)[0] > 2 * np.diff(sample)[0]


def test_paired_delta_uses_the_same_patients_for_both_models():
    y, p = random_case(n=400, seed=7)
    subjects = np.arange(400) // 4
    rng = np.random.default_rng(8)
    better = np.clip(p + 0.1 * (2 * y - 1) + 0.02 * rng.standard_normal(p.shape), 0, 1)
    same = M.paired_bootstrap_delta(y, p, 0.5, p, 0.5, subjects, 20, seed=0)
    assert same["macro_f1"]["delta"] == 0 and same["macro_f1"]["interval"] == [0.0, 0.0]
    delta = M.paired_bootstrap_delta(y, p, 0.5, better, 0.5, subjects, 100, seed=0)
    point = M.all_scores(y, better, 0.5)["macro_f1"] - M.all_scores(y, p, 0.5)["macro_f1"]
    assert delta["macro_f1"]["delta"] == pytest.approx(point)
    assert delta["macro_f1"]["relative"] == pytest.approx(point / M.all_scores(y, p, 0.5)["macro_f1"])
    lo, hi = delta["macro_f1"]["interval"]
    assert 0 < lo <= point <= hi
    # Pairing cancels the shared patient-to-patient variation: the delta's interval is
    # narrower than either model's own interval.
    own = M.evaluate_predictions(y, p, subjects, 0.5, bootstrap=100)["intervals"]["macro_f1"]
    assert hi - lo < own[1] - own[0]


def test_reliability_bins_and_ece():
    y = np.array([[0, 1], [1, 1], [0, 0], [0, 1]])
    p = np.array([[0.05, 0.95], [0.95, 0.85], [0.15, 0.05], [0.55, 0.65]])
    cal = M.reliability_bins(y, p, bins=10)
    assert sum(cal["count"]) == 8
    assert cal["count"][0] == 2 and cal["positive_rate"][0] == 0.0 and cal["mean_prob"][0] == pytest.approx(0.05)
    expected = (2 * 0.05 + 0.15 + 0.55 + 0.35 + 0.15 + 2 * 0.05) / 8
    assert cal["ece"] == pytest.approx(expected)


def test_to_matrix_accepts_list_columns():
    import pyarrow as pa

    col = pa.chunked_array([pa.array([[1, 0], [0, 1]], pa.list_(pa.int8(), 2))])
    assert M.to_matrix(col, np.int8).tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError):
        M.threshold_vector([0.5, 0.5], 3)
