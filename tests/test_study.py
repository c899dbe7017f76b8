"""`ckd-ehr study`'s summary side: collect finished runs of two cohorts into RUN/study, summarise
them, rebuild the same tables from a copy of that directory alone, refuse runs trained at
different code unless told; and the code state every pipeline stage records."""
import shutil

import numpy as np
import pyarrow as pa
import pytest

from ckd_ehr import storage
from ckd_ehr.contracts import PREDICTIONS, SOFT_LABELS, RunLayout, StudyFiles

CODE = {"commit": "a" * 40, "dirty": False, "ckd_ehr_sha256": "1" * 64}


def _seed_run(rng, layout: RunLayout, latent, y, subjects, rows, seed, code=CODE):
    ids = [f"s{i:04d}" for i in range(len(y))]
    for row, noise in rows.items():
        p = 1 / (1 + np.exp(-(latent + noise * rng.normal(size=latent.shape))))
        storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64),
                                        "labels": y.tolist(), "probs": p.astype(np.float32).tolist()},
                                       schema=PREDICTIONS), layout.predictions(row))
    logits = latent + rng.normal(size=latent.shape)
    storage.write_parquet(pa.table({"sample_id": ids, "logits": logits.astype(np.float32).tolist(),
                                    "probs": (1 / (1 + np.exp(-logits))).astype(np.float32).tolist(),
                                    "teacher_id": ["t"] * len(ids)}, schema=SOFT_LABELS), layout.soft_labels("test"))
    storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64), "labels": y.tolist()}),
                          layout.augmented("test"))
    storage.write_json(layout.manifest, {"stages": {   # prepare/eadf: the base run's, not the seed's
        "prepare": {"seconds": 5.0, "code": code}, "eadf": {"seconds": 20.0, "code": code},
        "teacher": {"seconds": 100.0 + seed, "code": code}, "student": {"seconds": 200.0, "code": code}}})
    models = {r: {"kept_step": 12 * seed, "modes": {"fixed": {"metrics": {"accuracy": 0.8 + 0.02 * seed, "macro_f1": 0.1}},
                                                   "tuned": {"metrics": {"macro_f1": 0.4}}}} for r in rows}
    storage.write_json(layout.metrics, {"baselines": {"copy_forward": {
        "role": "floor", "modes": {"fixed": {"metrics": {"macro_auroc": 0.6}, "intervals": {"macro_auroc": [0.55, 0.65]}}}}},
        "models": models})


def _cohort(rng, patients=80, k=25):
    per = rng.integers(1, 4, patients)
    subjects = np.repeat(np.arange(patients), per)
    latent = rng.normal(size=(len(subjects), k)) * 1.5 + rng.normal(size=(patients, 1))[subjects]
    y = (latent + rng.normal(size=latent.shape) > 1.5).astype(np.int8)
    return latent, y, subjects


@pytest.fixture
def two_cohort_study(tmp_path):
    """Finished runs: cohort synth_0 (seeds 0 and 1, a control row at seed 0 only) and cohort
    synth_5 (seed 0), with a study config naming them."""
    rng = np.random.default_rng(3)
    root = RunLayout(str(tmp_path / "study"))
    rows = {"hard_plain": 2.0, "ckd_ehr": 0.5}
    latent, y, subjects = _cohort(rng)
    for seed in (0, 1):
        _seed_run(rng, RunLayout(root.study_seed(seed)), latent, y, subjects,
                  {**rows, **({"hard_names": 1.0} if seed == 0 else {})}, seed)
    latent, y, subjects = _cohort(rng, patients=90)
    second = RunLayout(root.study_cohort(5))
    _seed_run(rng, RunLayout(second.study_seed(0)), latent, y, subjects, rows, 0)
    for base in (RunLayout(root.study_base), RunLayout(second.study_base)):
        storage.write_json(base.manifest, {"stages": {"prepare": {"seconds": 5.0, "code": CODE},
                                                      "eadf": {"seconds": 20.0, "code": CODE}}})
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(f"run_dir: {root.root}\nstudy:\n  seeds: [0, 1]\n  more_cohorts: [5]\n"
                        "  rows: [hard_plain, ckd_ehr]\n  first_seed_rows: [hard_names]\n"
                        "  contrasts: [[ckd_ehr, hard_plain], [teacher, hard_plain], [hard_names, hard_plain]]\n"
                        "  bootstrap: 200\n")
    return root, cfg_file


def test_study_summary_per_cohort_pooled_and_from_its_directory_alone(two_cohort_study, tmp_path):
    from ckd_ehr.cli import main

    root, cfg_file = two_cohort_study
    assert main(["study", "--config", str(cfg_file), "--summarise-only"]) == 0
    files = StudyFiles(root.study_dir)
    out = storage.read_json(files.results)
    assert out["cohorts_trained"] == {"synth_0": [0, 1], "synth_5": [0]}
    assert out["pooled_over"] == ["synth_0", "synth_5"]
    pooled, teacher, names = out["contrasts"]
    assert pooled["name"] == "ckd_ehr - hard_plain" and pooled["delta"] > 0 and pooled["p_holm"] < 0.05
    assert len(pooled["per_seed"]) == 3 and pooled["seed_noise_estimated"]
    assert teacher["name"] == "teacher - hard_plain"
    # the first-seed control: one seed of one cohort, test patients only, and said so
    assert names["name"] == "hard_names - hard_plain" and not names["seed_noise_estimated"]
    assert [c["name"] for c in out["cohorts"]["synth_5"]["contrasts"]] == ["ckd_ehr - hard_plain",
                                                                          "teacher - hard_plain"]
    assert set(out["rows"]) == {"hard_plain", "ckd_ehr", "hard_names", "teacher"}
    assert out["seed_wall_s"] == {"synth_0/seed_0": 300.0, "synth_0/seed_1": 301.0, "synth_5/seed_0": 300.0}
    assert out["references"]["synth_0"]["copy_forward"]["macro_auroc"] == 0.6
    assert out["secondary"]["hard_plain"]["kept_step"] == [0, 12, 0]
    assert out["secondary"]["hard_names"]["kept_step"] == [0]
    assert out["code"]["mixed"] is False and out["code"]["per_seed"]["synth_5/seed_0"]["teacher"] == CODE
    md = storage.read_text(files.markdown)
    assert "Pooled over cohorts synth_0, synth_5 (fixed effect" in md and "cannot be estimated" in md
    assert "(one seed: seed noise not estimated)" in md and "aaaaaaa" in md and "copy_forward" in md

    # everything the tables need is in the study directory: a copy, the runs gone, gives the same
    copy = tmp_path / "docs_copy"
    shutil.copytree(root.study_dir, copy)
    for name in ("seed_0", "seed_1", "cohort_5", "base"):
        shutil.rmtree(root.path(name))
    for f in ("results.json", "study.md", "forest.png"):
        (copy / f).unlink()
    assert main(["study", "--summarise-only", "--study-dir", str(copy)]) == 0
    again = storage.read_json(str(copy / "results.json"))
    assert again["rows"] == out["rows"] and again["contrasts"] == out["contrasts"]
    assert (copy / "study.md").read_text() == md and (copy / "forest.png").exists()


def test_runs_at_different_code_refuse_to_summarise_unless_allowed(two_cohort_study, capsys):
    from ckd_ehr.cli import main

    root, cfg_file = two_cohort_study
    layout = RunLayout(root.study_seed(1))
    manifest = storage.read_json(layout.manifest)
    manifest["stages"]["student"]["code"] = {"commit": "b" * 40, "dirty": True, "ckd_ehr_sha256": "2" * 64}
    storage.write_json(layout.manifest, manifest)
    assert main(["study", "--config", str(cfg_file), "--summarise-only"]) == 1
    err = capsys.readouterr().err
    assert "different code" in err and "111111111111: " in err and "222222222222: synth_0/seed_1/student" in err
    assert main(["study", "--config", str(cfg_file), "--summarise-only", "--allow-mixed-commits"]) == 0
    out = storage.read_json(root.study_results)
    assert out["code"]["mixed"] is True and set(out["code"]["states"]) == {"1" * 64, "2" * 64}
    md = storage.read_text(StudyFiles(root.study_dir).markdown)
    assert "MIXED CODE" in md and "bbbbbbb (dirty), ckd_ehr 222222222222" in md


def test_code_state_is_read_at_run_time_and_hashes_a_copy_without_git(tmp_path):
    from ckd_ehr import provenance

    state = provenance.code_state()
    assert len(state["ckd_ehr_sha256"]) == 64
    copy = tmp_path / "ckd_ehr"
    shutil.copytree(provenance.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert provenance.package_hash(copy) == state["ckd_ehr_sha256"]   # same source, no .git beside it
    (copy / "text.py").write_text((copy / "text.py").read_text() + "\n# changed\n")
    assert provenance.package_hash(copy) != state["ckd_ehr_sha256"]
