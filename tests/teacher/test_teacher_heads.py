"""The MLAPH claim in the study (issue 19): a generative teacher as a side teacher of each seed,
its row in evaluate, and the teachers side by side in the study's summary."""
import json

import numpy as np
import pyarrow as pa
import pytest

from ckd_ehr import storage
from ckd_ehr.config import ConfigError, PipelineConfig, build, load_config
from ckd_ehr.contracts import PREDICTIONS, SOFT_LABELS, TEACHER_META, RunLayout
from ckd_ehr import metrics as M


def _soft(layout: RunLayout, split: str, source: str, ids, probs):
    storage.write_parquet(pa.table({"sample_id": ids, "logits": probs.astype(np.float32).tolist(),
                                    "probs": probs.astype(np.float32).tolist(), "teacher_id": ["t"] * len(ids)},
                                   schema=SOFT_LABELS), layout.soft_labels(split, source))


def _noisy(rng, latent, noise):
    return 1 / (1 + np.exp(-(latent + noise * rng.normal(size=latent.shape))))


def test_generative_teacher_is_a_row_and_the_teachers_stand_side_by_side(tmp_path):
    """A seed run holding a generative teacher's soft labels (as `ckd-ehr study` copies them):
    evaluate scores it as the row teacher_generative (kept step from its teacher.json,
    thresholds tuned on its validation soft labels), and the study's summary compares both
    teachers on validation and test with intervals, ECE, soft-label throughput and training
    time, and contrasts them."""
    from ckd_ehr.cli import main
    from ckd_ehr.evaluation.evaluate import run_evaluate

    rng = np.random.default_rng(5)
    n, nv = 120, 60
    subjects, vsubjects = np.arange(n) // 2, 1000 + np.arange(nv) // 2
    latent, vlatent = rng.normal(size=(n, 25)) * 2, rng.normal(size=(nv, 25)) * 2
    y, yv = (latent + rng.normal(size=latent.shape) > 1).astype(np.int8), (vlatent + rng.normal(size=vlatent.shape) > 1).astype(np.int8)
    ids, vids = [f"s{i:04d}" for i in range(n)], [f"v{i:03d}" for i in range(nv)]
    root = RunLayout(str(tmp_path / "study"))
    layout = RunLayout(root.study_seed(0))
    for split, sid, subj, lab in (("test", ids, subjects, y), ("val", vids, vsubjects, yv)):
        storage.write_parquet(pa.table({"sample_id": sid, "subject_id": subj.astype(np.int64), "labels": lab.tolist()}),
                              layout.augmented(split))
    for row, noise in (("hard_eadf", 2.0), ("ckd_ehr", 1.0), ("ckd_ehr_generative", 1.5)):
        storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64), "labels": y.tolist(),
                                        "probs": _noisy(rng, latent, noise).astype(np.float32).tolist()},
                                       schema=PREDICTIONS), layout.predictions(row))
    probs = {"teacher": (_noisy(rng, latent, 0.5), _noisy(rng, vlatent, 0.5)),
             "teacher_generative": (_noisy(rng, latent, 3.0), _noisy(rng, vlatent, 3.0))}
    for source, (p_test, p_val) in probs.items():
        _soft(layout, "test", source, ids, p_test)
        _soft(layout, "val", source, vids, p_val)
    storage.write_json(layout.side_teacher_file("teacher_generative", TEACHER_META),
                       {"head": "generative", "metrics": {"step": 30}})
    storage.write_json(layout.manifest, {"stages": {
        "teacher": {"seconds": 300.0}, "student": {"seconds": 50.0},
        "soft_labels": {"seconds": 100.0, "summary": {"scoring": {"rows": 180, "seconds": 90.0, "rows_per_s": 2.0}}}}})
    storage.write_json(RunLayout(root.study_side_teacher(0, "teacher_generative")).manifest,
                       {"stages": {"teacher": {"seconds": 310.0}, "soft_labels": {"seconds": 400.0, "summary": {
                           "scoring": {"rows": 180, "seconds": 360.0, "rows_per_s": 0.5}}}}})

    rows = "[hard_eadf, ckd_ehr, ckd_ehr_generative]"
    cfg = load_config(PipelineConfig, None, [f"run_dir={layout.root}", "evaluate.bootstrap=20",
                                             "evaluate.baselines=false", "evaluate.probes=false",
                                             f"student.variants={rows}"])
    evaluated = run_evaluate(cfg)["models"]
    gen = evaluated["teacher_generative"]
    assert gen["kept_step"] == 30 and gen["predictions"] == layout.soft_labels("test", "teacher_generative")
    assert gen["modes"]["tuned"]["thresholds"] == pytest.approx(M.tune_thresholds(yv, probs["teacher_generative"][1].astype(np.float32), "f1"))
    assert "teacher_generative/val.parquet" in gen["threshold_source"]["tuned"]
    direct = M.all_scores(y, probs["teacher_generative"][0].astype(np.float32), 0.5, M.macro_label_set(y, 5))
    assert gen["modes"]["fixed"]["metrics"]["macro_auroc"] == pytest.approx(direct["macro_auroc"])

    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(f"run_dir: {root.root}\nstudy:\n  seeds: [0]\n  rows: {rows}\n"
                        "  contrasts: [[teacher, teacher_generative], [ckd_ehr, ckd_ehr_generative]]\n  bootstrap: 40\n")
    assert main(["study", "--config", str(cfg_file), "--summarise-only"]) == 0
    out = storage.read_json(root.study_results)
    (teachers, students) = out["contrasts"]
    assert teachers["name"] == "teacher - teacher_generative" and teachers["delta"] > 0   # less noise, better ranks
    assert students["name"] == "ckd_ehr - ckd_ehr_generative"
    assert set(out["rows"]) == {"hard_eadf", "ckd_ehr", "ckd_ehr_generative", "teacher", "teacher_generative"}
    # the seed's stages and its side teacher's
    assert out["seed_wall_s"] == {"synth_0/seed_0": 350.0 + 100.0 + 310.0 + 400.0}
    side = out["teachers"]["synth_0/seed_0"]["teacher_generative"]
    mlaph = out["teachers"]["synth_0/seed_0"]["teacher"]
    val_direct = M.all_scores(yv, probs["teacher_generative"][1].astype(np.float32), 0.5, M.macro_label_set(yv, 1))
    assert side["val"]["macro_auroc"] == pytest.approx(val_direct["macro_auroc"]) and side["val"]["n_samples"] == nv
    lo, hi = side["val"]["intervals"]["macro_auroc"]
    assert lo < side["val"]["macro_auroc"] < hi
    assert side["test"]["macro_auroc"] == pytest.approx(direct["macro_auroc"])
    assert side["test"]["ece"] == pytest.approx(gen["calibration"]["ece"])
    assert side["soft_labels"]["rows_per_s"] == 0.5 and mlaph["soft_labels"]["rows_per_s"] == 2.0
    assert side["teacher_train_s"] == 310.0 and mlaph["teacher_train_s"] == 300.0
    assert mlaph["test"]["macro_auroc"] > side["test"]["macro_auroc"]
    md = (tmp_path / "study" / "study" / "study.md").read_text()
    assert "Teachers side by side" in md and "teacher_generative" in md and "0.500 (180 rows)" in md
    assert "The paper's claim" not in md   # (a) hard_plain is not a row: nothing to set beside it
    assert (tmp_path / "study" / "study" / "teachers_reliability.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(out)   # plain JSON


def test_teacher_rows_and_contrasts_follow_the_study_rows():
    base = {"study": {"rows": ["hard_eadf", "ckd_ehr"], "contrasts": [["ckd_ehr", "hard_eadf"]]}}
    assert build(PipelineConfig, base).study.teacher_rows() == ["teacher"]
    bad = {"study": {**base["study"], "contrasts": [["teacher", "teacher_generative"]]}}
    with pytest.raises(ConfigError, match="teacher_generative.*not a row"):
        build(PipelineConfig, bad)
    good = {"study": {"rows": ["ckd_ehr", "ckd_ehr_generative"], "contrasts": [["teacher", "teacher_generative"]]}}
    assert build(PipelineConfig, good).study.teacher_rows() == ["teacher", "teacher_generative"]


def test_a_generative_side_teacher_needs_the_full_depth_backbone(tmp_path):
    """The side-by-side is only fair at the same depth, and the generative head needs the last
    layer: a study with teacher.num_layers set fails before any run, naming the field."""
    from ckd_ehr.study.run import run_study, side_teacher_config

    study = {"rows": ["ckd_ehr", "ckd_ehr_generative"], "contrasts": [["teacher", "teacher_generative"]], "seeds": [0]}
    cfg = build(PipelineConfig, {"run_dir": str(tmp_path / "s"), "teacher": {"num_layers": 4}, "study": study})
    with pytest.raises(ConfigError, match="num_layers"):
        run_study(cfg)
    assert not (tmp_path / "s").exists()
    full = build(PipelineConfig, {"run_dir": str(tmp_path / "s"), "teacher": {"head_init": "probe"}, "study": study})
    side = side_teacher_config(full, str(tmp_path / "g"), 3, "teacher_generative").teacher
    assert (side.head, side.head_init, side.best_metric, side.seed) == ("generative", "random", "val_loss", 3)
    # the frozen cache is the cohort's (shared by seeds), everything else the study's teacher section
    assert side.frozen_cache_dir == str(tmp_path / "base" / "teacher" / "frozen_cache")
    assert side.model_dump(exclude={"head", "head_init", "best_metric", "seed", "frozen_cache_dir"}) == \
        full.teacher.model_dump(exclude={"head", "head_init", "best_metric", "seed", "frozen_cache_dir"})
