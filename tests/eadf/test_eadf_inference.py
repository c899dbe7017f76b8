"""EADF inference: FDR on a null cohort, per-patient clustering, Mantel-Haenszel by hand,
adjustment for confounding by indication. No Ray (the Ray path is checked equal to the
reference in test_eadf.py)."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from ckd_ehr.bench.eadf import random_samples
from ckd_ehr.config import EADFConfig
from ckd_ehr.eadf.inference import benjamini_hochberg, cmh_score_p, design_effect, mantel_haenszel_rd
from ckd_ehr.eadf.stats import efficacy_table_reference, top_drugs

from helpers.eadf_samples import hot, samples_table


def rows_of(table, phenotype: int = 0) -> dict:
    return {r["drug"]: r for r in table.to_pylist() if r["phenotype_index"] == phenotype}


@pytest.mark.slow   # two 4,000-sample cohorts
def test_fdr_on_a_null_cohort_lists_almost_nothing():
    """No drug does anything: uncorrected one-sided tests at 5% find chance effects, the
    Benjamini-Hochberg lists hold at most one drug in all 25 phenotypes."""
    table = efficacy_table_reference(random_samples(4000, seed=2, effect=0.0), EADFConfig())
    p = np.array([v for v in table["p_value"].to_pylist() if v is not None])
    assert len(p) > 200  # many tests
    assert (p < 0.05).sum() >= 5  # what the uncorrected rule would list
    listed = sum(len(v) for v in top_drugs(table, 5).values())
    assert listed <= 1
    # The same cohort with an effect lists plenty: the test is not blind.
    planted = efficacy_table_reference(random_samples(4000, seed=2), EADFConfig())
    assert sum(len(v) for v in top_drugs(planted, 5).values()) >= 25


def test_benjamini_hochberg_matches_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.20])
    q = benjamini_hochberg(p)
    # m = 4 tests: sorted 0.01, 0.03, 0.04, 0.20 -> 0.04, 0.0533, 0.0533, 0.20
    assert q[0] == pytest.approx(0.04) and q[1] == pytest.approx(0.16 / 3) and q[2] == pytest.approx(0.16 / 3)
    assert np.isnan(q[3]) and q[4] == pytest.approx(0.20)


def _one_patient_cohort(clustered: bool):
    """Phenotype 0: drug A given in 40 pairs, 20 of them (all resolved) from one patient when
    `clustered`, else from 20 patients; 20 more given pairs of 20 patients, 8 resolved. Not
    given: 60 pairs of 60 patients, 24 resolved."""
    rows, subjects = [], []
    for i in range(20):
        rows.append((["A"], hot(0), hot()))
        subjects.append(0 if clustered else 1000 + i)
    for i in range(20):
        rows.append((["A"], hot(0), hot() if i < 8 else hot(0)))
        subjects.append(100 + i)
    for i in range(60):
        rows.append((["B"], hot(0), hot() if i < 24 else hot(0)))
        subjects.append(200 + i)
    order = np.argsort(subjects, kind="stable")  # the Ray path wants pairs ordered by patient
    tab = samples_table([rows[i] for i in order])
    return tab.set_column(tab.schema.get_field_index("subject_id"), "subject_id",
                          [np.asarray(subjects, dtype=np.int64)[order]])


def test_cluster_variance_widens_the_interval_when_one_patient_has_many_pairs():
    cfg = EADFConfig(min_support=10)
    one = rows_of(efficacy_table_reference(_one_patient_cohort(True), cfg))["A"]
    many = rows_of(efficacy_table_reference(_one_patient_cohort(False), cfg))["A"]
    naive = rows_of(efficacy_table_reference(_one_patient_cohort(True), cfg.model_copy(update={"clustering": "none"})))["A"]
    assert (one["n_given"], one["resolved_given"], one["effect"]) == (many["n_given"], many["resolved_given"], many["effect"])
    # Independent patients: design effect 1 (exactly, for one pair per patient), same as unclustered.
    assert many["design_effect_given"] == pytest.approx(1.0) and many["lower"] == pytest.approx(naive["lower"])
    # One patient with 20 identical outcomes: the given arm is worth far fewer than 40 pairs.
    assert one["design_effect_given"] > 5
    assert one["lower"] < many["lower"] - 0.1 and one["upper"] > many["upper"]
    assert one["p_value"] > many["p_value"] * 10
    # The design effect by hand: p = 28/40, clusters (20 of 20) and 20 singletons (8 resolved).
    p = 28 / 40
    ss = (20 - p * 20) ** 2 + 8 * (1 - p) ** 2 + 12 * p ** 2
    assert one["design_effect_given"] == pytest.approx(ss / (40 * p * (1 - p)))
    assert design_effect(40, 28, 20 ** 2 + 20, 20 * 20 + 8, 20 ** 2 + 8) == pytest.approx(ss / (40 * p * (1 - p)))


def _two_strata_cohort():
    """Phenotype 0, drug A. Stratum 1-2 phenotypes: given 10 (8 resolved), not given 20 (10).
    Stratum 3-4 phenotypes (0, 1, 2 present): given 30 (12), not given 10 (2)."""
    rows = []
    for n, y, drugs, pres in ((10, 8, ["A"], hot(0)), (20, 10, ["B"], hot(0)),
                              (30, 12, ["A"], hot(0, 1, 2)), (10, 2, ["B"], hot(0, 1, 2))):
        rows += [(drugs, pres, hot() if i < y else hot(0)) for i in range(n)]
    return samples_table(rows)


def test_mantel_haenszel_equals_a_hand_computed_example():
    # By hand (Sato 1989):
    # stratum 1: N = 30, w = 10*20/30 = 20/3, (y1 n0 - y0 n1)/N = (160 - 100)/30 = 2
    # stratum 2: N = 40, w = 30*10/40 = 7.5,  (120 - 60)/40 = 1.5
    rd = 3.5 / (20 / 3 + 7.5)
    p_sum = (100 * 10 - 400 * 8 + 10 * 20 * 10 / 2) / 900 + (900 * 2 - 100 * 12 + 30 * 10 * (-20) / 2) / 1600
    q_sum = (8 * 10 + 10 * 2) / 60 + (12 * 8 + 2 * 18) / 80
    var = (rd * p_sum + q_sum) / (20 / 3 + 7.5) ** 2
    assert rd == pytest.approx(0.2470588, abs=1e-6) and var == pytest.approx(0.0130381, abs=1e-6)
    est, v = mantel_haenszel_rd([[8, 12]], [[10, 30]], [[10, 2]], [[20, 10]])
    assert est[0] == pytest.approx(rd) and v[0] == pytest.approx(var)
    # CMH score test by hand: sum (y1 - n1 m / N) = 2 + 1.5; null variances
    # 10*20*18*12/(30^2*29) and 30*10*14*26/(40^2*39).
    z = 3.5 / np.sqrt(10 * 20 * 18 * 12 / (900 * 29) + 30 * 10 * 14 * 26 / (1600 * 39))
    p = 1 - NormalDist().cdf(z)
    assert cmh_score_p([[8, 12]], [[10, 30]], [[10, 2]], [[20, 10]])[0] == pytest.approx(p)
    # The same through the table (severity strata 1-2 / 3-4; one patient per pair).
    cfg = EADFConfig(adjust="severity", clustering="none", severity_bins=[3, 5])
    a = rows_of(efficacy_table_reference(_two_strata_cohort(), cfg))["A"]
    assert a["effect"] == pytest.approx(rd) and a["p_value"] == pytest.approx(p)
    assert a["lower"] == pytest.approx(rd - 1.959964 * np.sqrt(var), abs=1e-5)
    assert a["upper"] == pytest.approx(rd + 1.959964 * np.sqrt(var), abs=1e-5)
    # Crude: 20/40 vs 12/30 pooled.
    crude = rows_of(efficacy_table_reference(_two_strata_cohort(), cfg.model_copy(update={"adjust": "none"})))["A"]
    assert crude["effect"] == pytest.approx(20 / 40 - 12 / 30)


def _confounded_cohort():
    """Phenotype 0 in 400 pairs, half mild (phenotype 0 alone), half severe (phenotypes 0-4).
    Mild pairs resolve far more often (144/200) than severe ones (70/200).
    Planted drug P (+0.2 in both strata) goes mostly to severe pairs: mild 20 given (18
    resolved) vs 180 (126); severe 150 given (60) vs 50 (10). Crude: 78/170 vs 136/230, a
    negative difference. Decoy D (no effect within a stratum) goes mostly to mild pairs:
    mild 150 (105) vs 50 (39); severe 10 (2) vs 190 (68). Crude: 107/160 vs 107/240."""
    rows = []
    for pres, n_res, n_unres, p_idx, d_idx in (
            (hot(0), 144, 56, (range(0, 18), range(0, 2)), (range(18, 123), range(2, 47))),
            (hot(0, 1, 2, 3, 4), 70, 130, (range(0, 60), range(0, 90)), (range(60, 62), range(90, 98)))):
        for resolved, count, which in ((True, n_res, 0), (False, n_unres, 1)):
            for i in range(count):
                drugs = (["P"] if i in p_idx[which] else []) + (["D"] if i in d_idx[which] else [])
                rows.append((drugs, pres, hot() if resolved else hot(0)))
    return samples_table(rows)


def test_adjustment_recovers_a_planted_drug_that_the_crude_estimate_misses():
    tab = _confounded_cohort()
    crude_table = efficacy_table_reference(tab, EADFConfig(adjust="none"))
    adjusted_table = efficacy_table_reference(tab, EADFConfig(adjust="severity"))
    crude, adjusted = rows_of(crude_table), rows_of(adjusted_table)
    assert (crude["P"]["n_given"], crude["P"]["resolved_given"]) == (170, 78)
    assert (crude["D"]["n_given"], crude["D"]["resolved_given"]) == (160, 107)
    assert crude["P"]["effect"] < 0 < crude["D"]["effect"]
    assert adjusted["P"]["effect"] == pytest.approx(0.2) and adjusted["D"]["effect"] < 0
    # The crude lists hold the decoy and miss the planted drug; the adjusted lists the reverse.
    assert top_drugs(crude_table, 5) == {0: ["D"]}
    assert top_drugs(adjusted_table, 5) == {0: ["P"]}


def test_batches_that_split_a_patient_sum_to_the_reference_and_disorder_is_refused():
    """The 20-pair patient spans several batches (carried, then squared once); a file whose
    pairs are not grouped by patient is refused rather than miscounted."""
    import pyarrow as pa

    from ckd_ehr.contracts import ContractError
    from ckd_ehr.eadf.stats import efficacy_from_counts, partial_counts, split_counts, sum_partials

    tab = _one_patient_cohort(True)
    cfg = EADFConfig(min_support=10)
    parts = pa.concat_tables([partial_counts(tab.slice(i, 7)) for i in range(0, tab.num_rows, 7)]).to_pandas()
    assert efficacy_from_counts(split_counts(sum_partials(parts)), cfg).equals(efficacy_table_reference(tab, cfg))
    shuffled = tab.take(pa.array(np.random.default_rng(0).permutation(tab.num_rows)))
    parts = pa.concat_tables([partial_counts(shuffled.slice(i, 30), where="x.parquet")
                              for i in range(0, tab.num_rows, 30)]).to_pandas()
    with pytest.raises(ContractError, match="not grouped by patient"):
        sum_partials(parts, where="x.parquet")


def test_phenotype_code_counts_counts_distinct_codes_per_phenotype():
    import pyarrow as pa

    from ckd_ehr.eadf.stats import phenotype_code_counts

    codes = pa.array([["4019", "4011", "4019", "25000"], [], ["I10", "401.9", None], ["4011"]],
                     type=pa.list_(pa.string()))
    counts = phenotype_code_counts(codes)
    assert counts.shape == (4, 25)
    assert counts[0, 5] == 2 and counts[0, 1] == 1 and counts[0].sum() == 3  # '4019' twice counts once
    assert counts[1].sum() == 0 and counts[2].sum() == 0  # ICD-10 and dotted codes match nothing
    assert counts[3, 5] == 1


def _flare_cohort():
    """Hypertension (phenotype 5) alone in 200 pairs, so the count of phenotypes present is
    the same everywhere. 100 pairs record two hypertension codes (a 'flare': 80 resolve),
    100 one code (40 resolve). Decoy D, no effect within either: two codes 70 given (56
    resolved) vs 30 (24); one code 10 given (4) vs 90 (36). Crude: 60/80 vs 60/120."""
    rows, codes = [], []
    for two, given, res_given, not_given, res_not in ((True, 70, 56, 30, 24), (False, 10, 4, 90, 36)):
        for drugs, n, y in ((["D"], given, res_given), (["E"], not_given, res_not)):
            rows += [(drugs, hot(5), hot() if i < y else hot(5)) for i in range(n)]
            codes += [["4019", "4011"] if two else ["4019"]] * n
    tab = samples_table(rows)
    return tab.set_column(tab.schema.get_field_index("diagnosis_codes"), "diagnosis_codes",
                          [codes])


def test_code_strata_remove_confounding_that_the_phenotype_count_cannot_see():
    tab = _flare_cohort()
    crude = rows_of(efficacy_table_reference(tab, EADFConfig(adjust="none")), 5)["D"]
    by_count = rows_of(efficacy_table_reference(tab, EADFConfig(adjust="severity", code_strata=False)), 5)["D"]
    by_codes = rows_of(efficacy_table_reference(tab, EADFConfig(adjust="severity")), 5)["D"]
    assert crude["effect"] == pytest.approx(0.25) and crude["rank"] == 1
    assert by_count["effect"] == pytest.approx(0.25) and by_count["rank"] == 1  # one stratum: no help
    assert by_codes["effect"] == pytest.approx(0.0, abs=1e-12) and by_codes["rank"] is None
