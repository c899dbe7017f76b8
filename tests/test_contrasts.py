"""Study statistics (ckd_ehr.evaluation.contrasts): Holm, max-T, and a null control that can fail."""
import numpy as np
import pytest

from ckd_ehr.evaluation.contrasts import holm, seed_averaged_contrasts


def test_holm_matches_hand_computation():
    # sorted p 0.01, 0.02, 0.04 with m=3: 0.03, 0.04, 0.04 (monotone); NaN kept
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def _cohort(rng, patients=120, k=5):
    per = rng.integers(1, 4, patients)
    subjects = np.repeat(np.arange(patients), per)
    latent = rng.normal(size=(len(subjects), k)) + rng.normal(size=(patients, 1))[subjects]
    y = (rng.random(latent.shape) < 1 / (1 + np.exp(-2 * latent))).astype(np.int8)
    return y, subjects, latent


def _row(rng, latent, noise, seeds=2):
    return [latent + noise * rng.normal(size=latent.shape) for _ in range(seeds)]


def test_null_rows_are_rejected_at_the_nominal_rate_and_a_real_difference_is_found():
    """Null control: two rows drawn alike (same signal, same noise level, independent noise per
    seed) differ only by chance; p < 0.05 must then occur about 5% of the time, not more.
    The same machinery must find a real difference (a row with less noise) most of the time."""
    rng = np.random.default_rng(0)
    reps, rejected, found, covered = 40, 0, 0, 0
    for _ in range(reps):
        y, subjects, latent = _cohort(rng)
        probs = {"a": _row(rng, latent, 1.5), "b": _row(rng, latent, 1.5), "better": _row(rng, latent, 0.6)}
        out = seed_averaged_contrasts(y, subjects, probs, [("a", "b"), ("better", "b")], resamples=80,
                                      seed=int(rng.integers(1 << 30)))
        null, real = out["contrasts"]
        rejected += null["p_holm"] < 0.05
        found += real["p_holm"] < 0.05
        covered += null["interval"][0] <= 0.0 <= null["interval"][1]
    # binomial(40, 0.05): P(X > 7) < 0.005; a procedure that ignored seed noise or pairing would exceed it
    assert rejected <= 7, rejected
    assert found >= 0.8 * reps, found
    assert covered >= reps - 7


def test_contrasts_report_per_seed_spread_and_reject_bad_shapes():
    rng = np.random.default_rng(1)
    y, subjects, latent = _cohort(rng)
    probs = {"a": _row(rng, latent, 0.5, seeds=3), "b": _row(rng, latent, 2.0, seeds=1),
             "in_no_contrast": _row(rng, latent, 1.0, seeds=2)}
    out = seed_averaged_contrasts(y, subjects, probs, [("a", "b")], resamples=50)
    c = out["contrasts"][0]
    assert out["seeds_per_row"] == {"a": 3, "b": 1, "in_no_contrast": 2} and len(c["per_seed"]) == 1
    # every row, in a contrast or not, gets its seed-averaged value, an interval around it, its seeds
    for r, (lo, hi) in out["row_intervals"].items():
        assert lo < out["rows"][r] < hi and len(out["per_seed_rows"][r]) == out["seeds_per_row"][r]
    assert out["rows"]["a"] == pytest.approx(np.mean(out["per_seed_rows"]["a"]))
    assert out["row_intervals"]["a"][0] > out["row_intervals"]["b"][1]   # less noise: clearly better
    assert c["delta"] > 0 and c["interval"][0] < c["delta"] < c["interval"][1]
    assert c["detectable"] > 2 * c["se"]   # (1.96 + 0.84) * se for one contrast
    with pytest.raises(ValueError, match="no predictions: c"):
        seed_averaged_contrasts(y, subjects, probs, [("c", "a")], resamples=5)
    with pytest.raises(ValueError, match="shape"):
        seed_averaged_contrasts(y, subjects, {"a": [latent[:5]], "b": probs["b"]}, [("a", "b")], resamples=5)


def test_forest_plot_and_table_render():
    from ckd_ehr.evaluation.report import contrast_blocks, plot_contrasts, render_markdown

    rng = np.random.default_rng(2)
    y, subjects, latent = _cohort(rng, patients=60)
    probs = {"a": _row(rng, latent, 0.5), "b": _row(rng, latent, 1.0), "c": _row(rng, latent, 1.0)}
    study = seed_averaged_contrasts(y, subjects, probs, [("a", "b"), ("c", "b")], resamples=30)
    png = plot_contrasts(study)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = render_markdown(contrast_blocks(study))
    assert "a - b" in md and "c - b" in md and "Holm" in md
    from ckd_ehr.evaluation.report import fmt_p

    assert fmt_p(0.0) == "< 1e-15" and fmt_p(0.0131) == "0.0131"   # an underflowed p is not printed as 0


def test_rows_with_identical_predictions_are_named_not_given_a_nan_p():
    """Two rows that kept the same step-0 probe give the same predictions in every seed (the
    multi-granularity study of 2026-12-06): the contrast says so instead of printing p = nan;
    a row equal in one seed only is still compared."""
    from ckd_ehr.evaluation.report import contrast_blocks, plot_contrasts, render_markdown

    rng = np.random.default_rng(3)
    y, subjects, latent = _cohort(rng, patients=60)
    a = _row(rng, latent, 0.5, seeds=2)
    probs = {"a": a, "copy": [p.copy() for p in a], "half": [a[0].copy(), _row(rng, latent, 0.5)[0]]}
    study = seed_averaged_contrasts(y, subjects, probs, [("copy", "a"), ("half", "a")], resamples=30)
    same, half = study["contrasts"]
    assert same["identical"] and same["delta"] == 0.0 and np.isnan(same["p_holm"])
    assert not half["identical"] and np.isfinite(half["p_holm"])
    md = render_markdown(contrast_blocks(study))
    assert "identical predictions in every seed: nothing compared" in md and "nan" not in md
    assert plot_contrasts(study)[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_summary_over_seed_runs(tmp_path):
    """`ckd-ehr study --summarise-only` over finished seed runs: every row's test predictions per
    seed (students from evaluate/predictions, the teacher from its test soft labels), the
    contrasts, results.json with the config, forest.png and study.md."""
    import pyarrow as pa

    from ckd_ehr import storage
    from ckd_ehr.cli import main
    from ckd_ehr.contracts import PREDICTIONS, SOFT_LABELS, RunLayout

    rng = np.random.default_rng(3)
    y, subjects, latent = _cohort(rng, patients=80, k=25)
    ids = [f"s{i:04d}" for i in range(len(y))]
    rows = ["hard_plain", "ckd_ehr"]
    root = RunLayout(str(tmp_path / "study"))
    for seed in (0, 1):
        layout = RunLayout(root.study_seed(seed))
        for row, noise in (("hard_plain", 2.0), ("ckd_ehr", 0.5)):
            p = 1 / (1 + np.exp(-(latent + noise * rng.normal(size=latent.shape))))
            storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64),
                                            "labels": y.tolist(), "probs": p.astype(np.float32).tolist()},
                                           schema=PREDICTIONS), layout.predictions(row))
        logits = latent + rng.normal(size=latent.shape)
        storage.write_parquet(pa.table({"sample_id": ids, "logits": logits.astype(np.float32).tolist(),
                                        "probs": (1 / (1 + np.exp(-logits))).astype(np.float32).tolist(),
                                        "teacher_id": ["t"] * len(ids)}, schema=SOFT_LABELS),
                              layout.soft_labels("test"))
        storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64),
                                        "labels": y.tolist()}), layout.augmented("test"))
        storage.write_json(layout.path("manifest.json"), {"stages": {   # prepare/eadf: the base run's, not the seed's
            "prepare": {"seconds": 5.0}, "eadf": {"seconds": 20.0}, "teacher": {"seconds": 100.0 + seed},
            "student": {"seconds": 200.0}}})
        models = {"hard_plain": {"kept_step": 12 * seed, "modes": {
            "fixed": {"metrics": {"accuracy": 0.8 + 0.02 * seed, "macro_f1": 0.1}},
            "tuned": {"metrics": {"macro_f1": 0.4}}}}}
        if seed == 0:   # only seed 0's evaluate has ckd_ehr
            models["ckd_ehr"] = {"kept_step": 0, "modes": {"fixed": {"metrics": {"accuracy": 0.9, "macro_f1": 0.2}},
                                                           "tuned": {"metrics": {"macro_f1": 0.5}}}}
        storage.write_json(layout.metrics, {"baselines": {"copy_forward": {
            "role": "floor", "modes": {"fixed": {"metrics": {"macro_auroc": 0.6}, "intervals": None}}}},
            "models": models})
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(f"run_dir: {root.root}\nstudy:\n  seeds: [0, 1]\n  rows: [hard_plain, ckd_ehr]\n"
                        "  contrasts: [[ckd_ehr, hard_plain], [teacher, hard_plain]]\n  bootstrap: 40\n")
    assert main(["study", "--config", str(cfg_file), "--summarise-only"]) == 0
    out = storage.read_json(root.study_results)
    assert out["seeds"] == [0, 1] and out["test_samples"] == len(ids) and out["config"]["study"]["rows"] == rows
    (c, t) = out["contrasts"]
    assert c["name"] == "ckd_ehr - hard_plain" and c["delta"] > 0 and c["p_holm"] < 0.05 and len(c["per_seed"]) == 2
    assert t["name"] == "teacher - hard_plain"
    assert out["references"]["copy_forward"]["macro_auroc"] == 0.6
    assert out["seed_wall_s"] == {"0": 300.0, "1": 301.0}
    assert set(out["row_intervals"]) == {"hard_plain", "ckd_ehr", "teacher"}
    assert out["secondary"]["hard_plain"] == {"accuracy_fixed": pytest.approx(0.81), "macro_f1_fixed": 0.1,
                                              "macro_f1_tuned": 0.4, "kept_step": [0, 12]}
    # a seed's evaluate lacks the row: no mean over the other seed alone, said, not invented
    assert out["secondary"]["ckd_ehr"] == {"accuracy_fixed": None, "macro_f1_fixed": None, "macro_f1_tuned": None,
                                           "kept_step": [0]}
    assert (tmp_path / "study" / "study" / "forest.png").exists()
    md = (tmp_path / "study" / "study" / "study.md").read_text()
    assert "copy_forward" in md and "ckd_ehr - hard_plain" in md and "seed 0 5 min" in md
    lo, hi = out["row_intervals"]["ckd_ehr"]
    assert f"[{lo:.3f}, {hi:.3f}]" in md and "| 0, 12 | 0.810 | 0.400 |" in md
    assert "| element-wise accuracy at 0.5 | +9% | - |" in md   # (d)'s accuracy is missing in seed 1
