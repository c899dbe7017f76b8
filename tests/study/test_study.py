"""`ckd-ehr study`'s summary side: collect finished runs of two cohorts into RUN/study, summarise
them, rebuild the same tables from a copy of that directory alone, refuse runs trained at
different code unless told; and the code state every pipeline stage records."""
import shutil

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout, StudyFiles

from helpers.study_runs import CODE


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
