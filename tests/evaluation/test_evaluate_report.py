"""Evaluate and report on a hand-built run directory: real parquet files, real plots."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from ckd_ehr import metrics as M
from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, load_config
from ckd_ehr.contracts import PREDICTIONS, ContractError, RunLayout
from ckd_ehr.evaluation.evaluate import run_evaluate
from ckd_ehr.evaluation.report import run_report

N = 240


def write_predictions(layout: RunLayout, name: str, y, probs, subjects, rows=None):
    rows = np.arange(len(y)) if rows is None else rows
    table = pa.Table.from_pydict({
        "sample_id": [f"s{i:04d}" for i in rows],
        "subject_id": subjects[rows].tolist(),
        "labels": y[rows].tolist(),
        "probs": probs[rows].astype(np.float32).tolist(),
    }, schema=PREDICTIONS)
    storage.write_parquet(table, layout.predictions(name))


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """Baseline (a), CKD-EHR (d) with tuned thresholds, and a teacher scored on 200 of the 240
    samples; hard_eadf and distill_plain have no predictions."""
    root = tmp_path_factory.mktemp("run")
    layout = RunLayout(str(root))
    rng = np.random.default_rng(0)
    subjects = rng.integers(0, 90, N)
    y = (rng.random((N, 25)) < 0.25).astype(np.int8)
    y[:, 7] = 0                                                   # a phenotype absent from test
    probs = {name: np.clip(y * shift + rng.random((N, 25)) * 0.7, 0, 1)
             for name, shift in (("hard_plain", 0.15), ("ckd_ehr", 0.3), ("teacher", 0.4))}
    write_predictions(layout, "hard_plain", y, probs["hard_plain"], subjects)
    # Written in another row order: evaluate must align by sample_id.
    write_predictions(layout, "ckd_ehr", y, probs["ckd_ehr"], subjects, rows=np.arange(N)[::-1])
    write_predictions(layout, "teacher", y, probs["teacher"], subjects, rows=np.arange(200))
    tuned = np.linspace(0.35, 0.6, 25).round(3).tolist()
    storage.write_json(storage.join(layout.student_artifact("ckd_ehr"), "student.json"),
                       {"thresholds": {"fixed": [0.5] * 25, "tuned": tuned, "served": "tuned"}})
    storage.write_json(storage.join(layout.teacher_artifact, "teacher.json"), {"thresholds": [0.45] * 25})
    # The soft-labels stage's quality outputs, which the report links.
    storage.write_bytes(storage.join(layout.soft_label_quality, "reliability.png"), b"\x89PNG\r\n\x1a\nfake")
    storage.write_json(storage.join(layout.soft_label_quality, "quality.json"),
                       {"ece": 0.0123, "mean_entropy": 0.4, "entropy": "mean binary entropy, bits",
                        "splits": {"test": {"ece": 0.0456, "macro_auroc": 0.7891, "n": 12}}})
    cfg = load_config(PipelineConfig, None, [f"run_dir={root}", "evaluate.bootstrap=40", "evaluate.seed=3"])
    return {"cfg": cfg, "layout": layout, "y": y, "probs": probs, "subjects": subjects, "tuned": tuned,
            "metrics": run_evaluate(cfg)}


def test_metrics_json_equals_direct_computation(fake_run):
    layout, y, probs, subjects = fake_run["layout"], fake_run["y"], fake_run["probs"], fake_run["subjects"]
    written = json.loads(open(layout.metrics).read())
    assert set(written["models"]) == {"hard_plain", "ckd_ehr", "teacher"}
    assert set(written["skipped"]) == {"hard_eadf", "distill_plain"}
    models = written["models"]

    assert models["ckd_ehr"]["modes"]["tuned"]["thresholds"] == pytest.approx(fake_run["tuned"])
    assert "student.json" in models["ckd_ehr"]["threshold_source"]["tuned"]
    assert models["hard_plain"]["modes"]["tuned"]["thresholds"] == [0.5] * 25   # no artifact: 0.5
    assert models["teacher"]["modes"]["tuned"]["thresholds"] == [0.45] * 25

    label_set = M.macro_label_set(y, 5)     # from all 240 test samples, phenotype 7 left out
    assert written["macro_label_set"]["left_out"] == {written["phenotypes"][7]: 0}
    for name, t_tuned, rows in (("hard_plain", 0.5, slice(None)), ("ckd_ehr", fake_run["tuned"], slice(None)),
                                ("teacher", 0.45, slice(0, 200))):
        for mode, t in (("fixed", 0.5), ("tuned", t_tuned)):
            direct = M.all_scores(y[rows], probs[name][rows], t, label_set)
            got = models[name]["modes"][mode]
            for m in M.ALL_METRICS:
                assert got["metrics"][m] == pytest.approx(direct[m]), (name, mode, m)
                lo, hi = got["intervals"][m]
                assert lo <= got["metrics"][m] + 1e-12 and got["metrics"][m] <= hi + 1e-12
        assert models[name]["n_patients"] == len(np.unique(subjects[rows]))
    assert models["hard_plain"]["auroc_skipped"] == [written["phenotypes"][7]]


def test_deltas_are_paired_against_the_baseline(fake_run):
    y, probs, subjects = fake_run["y"], fake_run["probs"], fake_run["subjects"]
    deltas = fake_run["metrics"]["deltas"]
    assert set(deltas) == {"ckd_ehr", "teacher"}
    # Same samples: the delta reuses both models' distributions from the same resamples,
    # which must equal a direct paired bootstrap with the same seed.
    label_set = M.macro_label_set(y, 5)
    direct = M.paired_bootstrap_delta(y, probs["hard_plain"], 0.5, probs["ckd_ehr"], fake_run["tuned"],
                                      subjects, 40, seed=3, label_set=label_set)
    got = deltas["ckd_ehr"]["tuned"]
    assert deltas["ckd_ehr"]["paired_on"] == "all samples"
    for m in ("accuracy", "macro_f1", "macro_auroc"):
        assert got[m]["delta"] == pytest.approx(direct[m]["delta"])
        assert got[m]["interval"] == pytest.approx(direct[m]["interval"])
    assert deltas["teacher"]["paired_on"] == "shared samples only" and deltas["teacher"]["n_samples"] == 200
    direct = M.all_scores(y[:200], probs["teacher"][:200], 0.5, label_set)["macro_f1"] - \
        M.all_scores(y[:200], probs["hard_plain"][:200], 0.5, label_set)["macro_f1"]
    assert deltas["teacher"]["fixed"]["macro_f1"]["delta"] == pytest.approx(direct)


def test_report_writes_markdown_html_and_plots(fake_run):
    out = run_report(fake_run["cfg"])
    report_dir = fake_run["layout"].report_dir
    md = open(out["report_md"]).read()
    page = open(out["report_html"]).read()
    for image in out["images"]:
        data = open(storage.join(report_dir, image), "rb").read()
        assert data.startswith(b"\x89PNG")
        assert f"({image})" in md and f'src="{image}"' in page       # relative links
    assert {"variants_fixed.png", "variants_tuned.png", "per_phenotype_f1.png", "reliability.png",
            "teacher_soft_label_reliability.png"} <= set(out["images"])
    delta = fake_run["metrics"]["deltas"]["ckd_ehr"]["fixed"]["macro_f1"]
    shown = f"{100 * delta['delta']:+.1f} [{100 * delta['interval'][0]:+.1f}, {100 * delta['interval'][1]:+.1f}]"
    assert shown in md and shown in page
    assert "+27% F1" in md and "0.0123" in md                       # the paper's claim, quality.json
    assert "0.0456" in md and "0.7891" in md and "mean binary entropy" in md  # per-split figures, not only descriptions
    assert "hard_eadf skipped" in md


def test_evaluate_without_predictions_names_the_directory(tmp_path):
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "evaluate.bootstrap=0"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "evaluate" / "predictions")):
        run_evaluate(cfg)


def test_evaluate_rejects_conflicting_labels(tmp_path):
    layout = RunLayout(str(tmp_path))
    rng = np.random.default_rng(1)
    y = (rng.random((20, 25)) < 0.3).astype(np.int8)
    subjects = np.arange(20)
    write_predictions(layout, "hard_plain", y, rng.random((20, 25)), subjects)
    write_predictions(layout, "ckd_ehr", 1 - y, rng.random((20, 25)), subjects)
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "evaluate.bootstrap=0"])
    with pytest.raises(ContractError, match="different labels"):
        run_evaluate(cfg)


def test_teacher_predictions_come_from_test_soft_labels(tmp_path):
    """With no predictions/teacher.parquet, the teacher is scored on soft_labels/test.parquet
    joined with the test samples (labels and patients) by sample_id."""
    from ckd_ehr.contracts import SOFT_LABELS

    layout = RunLayout(str(tmp_path))
    rng = np.random.default_rng(2)
    n = 60
    y = (rng.random((n, 25)) < 0.3).astype(np.int8)
    subjects = np.arange(n) // 3
    write_predictions(layout, "hard_plain", y, rng.random((n, 25)), subjects)
    ids = [f"s{i:04d}" for i in range(n)]
    storage.write_parquet(pa.Table.from_pydict(
        {"sample_id": ids, "subject_id": subjects.tolist(), "labels": y.tolist()}), layout.augmented("test"))
    teacher = rng.random((n, 25))
    keep = np.arange(5, n)[::-1]                     # soft labels for 55 samples, another order
    storage.write_parquet(pa.Table.from_pydict({
        "sample_id": [ids[i] for i in keep], "logits": teacher[keep].tolist(), "probs": teacher[keep].tolist(),
        "teacher_id": ["t"] * len(keep)}, schema=SOFT_LABELS), layout.soft_labels("test"))
    # Validation soft labels: the teacher's tuned thresholds are fitted on these, never on test.
    y_val, p_val = (rng.random((40, 25)) < 0.3).astype(np.int8), rng.random((40, 25)).astype(np.float32)
    val_ids = [f"v{i:03d}" for i in range(40)]
    storage.write_parquet(pa.Table.from_pydict(
        {"sample_id": val_ids, "subject_id": list(range(40)), "labels": y_val.tolist()}), layout.augmented("val"))
    storage.write_parquet(pa.Table.from_pydict({
        "sample_id": val_ids, "logits": p_val.tolist(), "probs": p_val.tolist(), "teacher_id": ["t"] * 40},
        schema=SOFT_LABELS), layout.soft_labels("val"))
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "evaluate.bootstrap=0"])
    result = run_evaluate(cfg)
    entry = result["models"]["teacher"]
    assert entry["modes"]["tuned"]["thresholds"] == pytest.approx(M.tune_thresholds(y_val, p_val, "f1"))
    assert "soft_labels/val.parquet" in entry["threshold_source"]["tuned"]
    assert entry["predictions"] == layout.soft_labels("test") and entry["n_samples"] == 55
    direct = M.all_scores(y[5:], teacher[5:].astype(np.float32), 0.5, M.macro_label_set(y, 5))  # the set: all 60 test samples
    for m in M.ALL_METRICS:
        assert entry["modes"]["fixed"]["metrics"][m] == pytest.approx(direct[m])
    assert result["deltas"]["teacher"]["n_samples"] == 55


def test_identical_models_and_step0_probes_are_named_not_called_equal(tmp_path):
    """Two students that both kept their step-0 probe on the same text give the same test
    predictions (the demo of 2026-12-01: distill_plain = hard_plain). A delta of 0 [0, 0] between
    them is no evidence about distillation: metrics.json and the report must say so. A third
    model with other predictions, trained past step 0, is neither marked nor grouped."""
    layout = RunLayout(str(tmp_path))
    rng = np.random.default_rng(4)
    n = 80
    y = (rng.random((n, 25)) < 0.3).astype(np.int8)
    subjects = np.arange(n) // 2
    same = rng.random((n, 25))
    write_predictions(layout, "hard_plain", y, same, subjects)
    write_predictions(layout, "distill_plain", y, same, subjects)
    write_predictions(layout, "ckd_ehr", y, rng.random((n, 25)), subjects)
    write_predictions(layout, "teacher", y, rng.random((n, 25)), subjects)
    for variant, step in (("hard_plain", 0), ("distill_plain", 0), ("ckd_ehr", 20)):
        storage.write_json(layout.student_meta(variant), {"metrics": {"kept_checkpoint": {"step": step}}})
    # the teacher's artifact keeps its kept step flat, and kept_checkpoint_path names the checkpoint
    storage.write_json(layout.teacher_meta, {"metrics": {"step": 0, "kept_checkpoint_path": "/ckpt/checkpoint_0"}})
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}", "evaluate.bootstrap=20",
                                             "evaluate.allow_small=true", "evaluate.baselines=false",
                                             "evaluate.probes=false"])
    metrics = run_evaluate(cfg)
    assert {n: e["kept_step"] for n, e in metrics["models"].items()} == {
        "hard_plain": 0, "distill_plain": 0, "ckd_ehr": 20, "teacher": 0}
    assert metrics["identical_predictions"] == [["hard_plain", "distill_plain"]]
    assert metrics["deltas"]["distill_plain"]["identical"] is True
    assert metrics["deltas"]["ckd_ehr"]["identical"] is False
    assert any("hard_plain = distill_plain" in n for n in metrics["notes"])
    md = open(run_report(cfg)["report_md"]).read()
    assert "identical predictions: nothing compared" in md
    assert "kept step 0 for hard_plain, distill_plain, teacher" in md
    assert md.count("[kept step 0: its probe, no training update]") == 6   # three models x two threshold tables


def test_the_summary_says_in_words_whether_the_best_model_beats_the_best_floor():
    """evaluate's summary (the report's first lines, the run's last): best model, best floor,
    their paired difference with its interval and what it means, the models that kept their probe."""
    import pandas as pd

    from ckd_ehr.evaluation.evaluate import score_model, summarise_findings
    from ckd_ehr.metrics import macro_label_set

    rng = np.random.default_rng(7)
    subjects = rng.integers(0, 150, N)
    y = (rng.random((N, 25)) < 0.3).astype(np.int8)

    def frame(shift):
        p = np.clip(y * shift + rng.random((N, 25)) * 0.7, 0, 1)
        return pd.DataFrame({"sample_id": [f"s{i:04d}" for i in range(N)], "subject_id": subjects,
                             "labels": list(y), "probs": list(p)})

    label_set = macro_label_set(y)
    thr = {"fixed": [0.5] * 25, "tuned": [0.5] * 25}
    frames = {"ckd_ehr": frame(0.5), "hard_eadf": frame(0.05)}
    references = {"logistic_regression": (frame(0.2), thr, {}), "copy_forward": (frame(0.1), thr, {})}
    models, dists, baselines, bdists = {}, {}, {}, {}
    for name, df in frames.items():
        entry, dists[name] = score_model(df, thr, 60, 3, label_set)
        models[name] = {**entry, "kept_step": 0 if name == "hard_eadf" else 40}
    for name, (df, t, _) in references.items():
        baselines[name], bdists[name] = score_model(df, t, 60, 3, label_set)
    out = summarise_findings(models, baselines, frames, references, dists, bdists, {n: thr for n in frames}, 60, 3,
                             label_set)
    assert out["best_model"] == "ckd_ehr" and out["best_floor"] == "logistic_regression"
    assert out["delta"] > 0 and out["interval"][0] > 0
    text = out["text"]
    assert "Best model: ckd_ehr" in text and "Best floor: logistic_regression" in text
    assert "above it: the paired interval excludes 0" in text and "Kept their probe" in text and "hard_eadf" in text
    # a model below the floor is said to be below it
    frames = {"ckd_ehr": frame(0.02)}
    entry, dists["ckd_ehr"] = score_model(frames["ckd_ehr"], thr, 60, 3, label_set)
    out = summarise_findings({"ckd_ehr": {**entry, "kept_step": 40}}, baselines, frames, references, dists, bdists,
                             {"ckd_ehr": thr}, 60, 3, label_set)
    assert "below it" in out["text"] and "No model is above the best floor" in out["text"]
