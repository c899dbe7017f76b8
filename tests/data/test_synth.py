"""The synthetic cohort: MIMIC-III format (both forms), determinism, realistic structure and
a ground truth that the generated data really carries (checked here from the CSVs)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ckd_ehr.config import ConfigError, SynthConfig, build
from ckd_ehr.phenotypes import code_to_phenotype_table, phenotypes
from ckd_ehr.contracts import GROUND_TRUTH
from ckd_ehr.data.synth.cohort import write_cohort
from ckd_ehr.data.synth.model import simulate
from ckd_ehr.data.synth.tables import COLUMNS, TABLES, file_name

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
TIME_COLUMNS = {"admittime", "dischtime", "deathtime", "edregtime", "edouttime", "dob", "dod", "dod_hosp",
                "dod_ssn", "startdate", "enddate"}
SMALL, LARGE = 300, 1500


def _write(root: Path, name: str, **fields) -> Path:
    out = root / name
    write_cohort(str(out), SynthConfig(**fields))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {
        "small": _write(root, "small", patients=SMALL, seed=5),
        "small_again": _write(root, "small_again", patients=SMALL, seed=5),
        "small_seed6": _write(root, "small_seed6", patients=SMALL, seed=6),
        "small_full": _write(root, "small_full", patients=SMALL, seed=5, form="full"),
        "large": _write(root, "large", patients=LARGE, seed=11),
    }


def read(d: Path, table: str, form: str = "demo") -> pd.DataFrame:
    return pd.read_csv(d / file_name(table, form), dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def large(dirs):
    """The large cohort as the pipeline will see it: phenotypes per admission from the codes,
    consecutive admission pairs, and the set of (admission, drug) given."""
    d = dirs["large"]
    adm = read(d, "ADMISSIONS").sort_values(["subject_id", "admittime"])
    dx = read(d, "DIAGNOSES_ICD")
    rx = read(d, "PRESCRIPTIONS")
    code_map = code_to_phenotype_table()
    dx["p"] = dx.icd9_code.map(lambda c: code_map.get(c, (-1,))[0])
    dx = dx[dx.p >= 0]
    hot = pd.crosstab(dx.hadm_id, dx.p).clip(0, 1).reindex(index=adm.hadm_id, columns=range(25), fill_value=0)
    adm["next"] = adm.groupby("subject_id").hadm_id.shift(-1)
    pairs = adm.dropna(subset=["next"])
    return {
        "adm": adm, "rx": rx, "hot": hot,
        "x": hot.loc[pairs.hadm_id].to_numpy(), "y": hot.loc[pairs.next].to_numpy(),
        "pair_hadm": pairs.hadm_id.to_numpy(),
        "given": set(zip(rx.hadm_id, rx.drug)),
        "truth": json.loads((d / GROUND_TRUTH).read_text()),
    }


def next_visit_differences(data, drugs_of) -> list[float]:
    """Per phenotype p and drug: P(p at visit i+1 | p at i, drug given at i) minus the same
    without the drug, where both arms have at least 15 pairs."""
    diffs = []
    for p in phenotypes():
        sel = data["x"][:, p.index] == 1
        hadm, y = data["pair_hadm"][sel], data["y"][sel, p.index]
        for drug in drugs_of(p.name):
            got = np.array([(h, drug) in data["given"] for h in hadm], dtype=bool)
            if got.sum() >= 15 and (~got).sum() >= 15:
                diffs.append(y[got].mean() - y[~got].mean())
    return diffs


# --- format --------------------------------------------------------------------------------

@pytest.mark.parametrize("table", TABLES)
def test_columns_match_mimic_demo_in_both_forms(dirs, mimic_demo_dir, table):
    expected = (mimic_demo_dir / f"{table}.csv").read_text().split("\n", 1)[0]
    assert (dirs["small"] / f"{table}.csv").read_text().split("\n", 1)[0] == expected
    assert expected == ",".join(COLUMNS[table])
    full = pd.read_csv(dirs["small_full"] / f"{table}.csv.gz", nrows=0)
    assert list(full.columns) == [c.upper() for c in expected.split(",")]


def test_full_form_quotes_like_the_release(dirs):
    import gzip

    lines = gzip.decompress((dirs["small_full"] / "DIAGNOSES_ICD.csv.gz").read_bytes()).decode().splitlines()
    assert lines[0] == '"ROW_ID","SUBJECT_ID","HADM_ID","SEQ_NUM","ICD9_CODE"'
    assert re.fullmatch(r'\d+,\d+,\d+,\d+,"[0-9EV]+"', lines[1]), lines[1]
    demo_line = (dirs["small"] / "DIAGNOSES_ICD.csv").read_text().splitlines()[1]
    assert re.fullmatch(r"\d+,\d+,\d+,\d+,[0-9EV]+", demo_line), demo_line


@pytest.mark.parametrize("table", TABLES)
def test_demo_and_full_hold_the_same_content(dirs, table):
    demo = read(dirs["small"], table)
    full = read(dirs["small_full"], table, "full")
    full.columns = [c.lower() for c in full.columns]
    pd.testing.assert_frame_equal(demo, full)


def test_timestamps_and_admission_order(dirs, large):
    for table in ("ADMISSIONS", "PATIENTS", "PRESCRIPTIONS"):
        df = read(dirs["small"], table)
        for col in TIME_COLUMNS & set(df.columns):
            filled = df[col][df[col] != ""]
            assert len(filled) and filled.str.match(TIMESTAMP).all(), (table, col)
    adm = large["adm"]
    t = {c: pd.to_datetime(adm[c]) for c in ("admittime", "dischtime")}
    assert (t["dischtime"] > t["admittime"]).all()
    assert (t["admittime"].dt.year >= 2100).all()
    previous_discharge = t["dischtime"].groupby(adm.subject_id).shift(1)
    gaps = (t["admittime"] - previous_discharge).dropna()
    assert len(gaps) > 0 and (gaps > pd.Timedelta(0)).all()


def test_patients_ages_and_over_89(dirs):
    pats = read(dirs["large"], "PATIENTS").set_index("subject_id")
    adm = read(dirs["large"], "ADMISSIONS")
    first = adm.groupby("subject_id").admittime.min()
    # DOBs ~300 years back do not fit pandas' nanosecond range: compare years.
    age = first.str[:4].astype(int) - pats.loc[first.index, "dob"].str[:4].astype(int)
    assert (age >= 17).all()
    assert 0.02 < (age >= 300).mean() < 0.12  # shifted like MIMIC-III's patients over 89
    assert set(pats.gender) == {"F", "M"}
    dead_in_hospital = adm[adm.hospital_expire_flag == "1"].subject_id
    assert len(dead_in_hospital) > 0 and (pats.loc[dead_in_hospital, "expire_flag"] == "1").all()


def test_every_code_has_titles(dirs):
    d = dirs["large"]
    for events, dictionary in (("DIAGNOSES_ICD", "D_ICD_DIAGNOSES"), ("PROCEDURES_ICD", "D_ICD_PROCEDURES")):
        titles = read(d, dictionary)
        assert titles.icd9_code.is_unique
        assert (titles.short_title.str.len() > 0).all() and (titles.long_title.str.len() > 0).all()
        assert set(read(d, events).icd9_code) <= set(titles.icd9_code)
    codes = set(read(d, "DIAGNOSES_ICD").icd9_code)
    in_phenotypes = {c for c in codes if c in code_to_phenotype_table()}
    assert in_phenotypes and codes - in_phenotypes  # phenotype codes and other codes


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_same_bytes(dirs):
    names = sorted(p.name for p in dirs["small"].iterdir())
    assert names == sorted(p.name for p in dirs["small_again"].iterdir())
    assert len(names) == len(TABLES) + 2   # + ground_truth.json and latent_oracle.parquet
    for name in names:
        assert (dirs["small"] / name).read_bytes() == (dirs["small_again"] / name).read_bytes(), name


def test_other_seed_other_cohort(dirs):
    for table in ("ADMISSIONS", "DIAGNOSES_ICD", "PRESCRIPTIONS"):
        assert (dirs["small"] / f"{table}.csv").read_bytes() != (dirs["small_seed6"] / f"{table}.csv").read_bytes()


def test_writing_one_form_removes_the_other(tmp_path):
    write_cohort(str(tmp_path), SynthConfig(patients=20))
    write_cohort(str(tmp_path), SynthConfig(patients=20, form="full"))
    assert not list(tmp_path.glob("*.csv")) and len(list(tmp_path.glob("*.csv.gz"))) == len(TABLES)


def test_full_form_is_deterministic_too(tmp_path):
    for name in ("a", "b"):
        write_cohort(str(tmp_path / name), SynthConfig(patients=30, seed=9, form="full"))
    for table in TABLES:
        gz = file_name(table, "full")
        assert (tmp_path / "a" / gz).read_bytes() == (tmp_path / "b" / gz).read_bytes(), table


# --- size ----------------------------------------------------------------------------------------

def test_row_counts_scale_with_patients(dirs):
    small = json.loads((dirs["small"] / GROUND_TRUTH).read_text())["counts"]
    large = json.loads((dirs["large"] / GROUND_TRUTH).read_text())["counts"]
    ratio = LARGE / SMALL
    for table in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS"):
        assert 0.75 * ratio < large[table] / small[table] < 1.25 * ratio, table
    assert large["D_ICD_DIAGNOSES"] == small["D_ICD_DIAGNOSES"]
    per_admission = {t: large[t] / large["ADMISSIONS"] for t in ("DIAGNOSES_ICD", "PRESCRIPTIONS")}
    assert 8 < per_admission["DIAGNOSES_ICD"] < 16 and 45 < per_admission["PRESCRIPTIONS"] < 100
    assert 1.8 < large["ADMISSIONS"] / large["PATIENTS"] < 2.2  # mean_admissions = 2.0


def test_mean_admissions_is_respected():
    co = simulate(SynthConfig(patients=3000, mean_admissions=1.27, seed=2))
    assert 1.2 < len(co.hadm_id) / 3000 < 1.35
    counts = np.bincount(co.adm_patient)
    assert counts.max() >= 4  # geometric tail: a few patients with many admissions


# --- ground truth and the structure it claims ---------------------------------------------------

def test_ground_truth_is_consistent_with_the_tables(dirs, large):
    truth = large["truth"]
    names = [p.name for p in phenotypes()]
    assert list(truth["planted"]) == names and list(truth["indicated"]) == names
    planted = [d for drugs in truth["planted"].values() for d in drugs]
    assert all(len(v) == 3 for v in truth["planted"].values()) and len(set(planted)) == len(planted)
    indicated = {d for drugs in truth["indicated"].values() for d in drugs}
    assert not set(planted) & (set(truth["ward_drugs"]) | indicated)
    given = large["rx"].drug
    assert set(planted) <= set(given)
    share = large["rx"].drop_duplicates(["hadm_id", "drug"]).drug.value_counts() / len(large["adm"])
    assert (share[truth["ward_drugs"]] > 0.3).all()  # ward drugs: most admissions get them
    assert set(SynthConfig.model_fields) <= set(truth["params"])
    counts = truth["counts"]
    assert (counts["ADMISSIONS"], counts["PRESCRIPTIONS"]) == (len(large["adm"]), len(large["rx"]))
    for table in set(TABLES) - {"ADMISSIONS", "PRESCRIPTIONS"}:
        assert counts[table] == len(read(dirs["large"], table))


def test_chronic_phenotypes_persist_more_than_acute(large):
    """Among untreated episodes (no planted drug of the phenotype given at visit i: the drugs
    resolve about half of all episodes, chronic or acute)."""
    x, y, truth = large["x"], large["y"], large["truth"]
    treated = np.zeros_like(x, dtype=bool)
    for p in phenotypes():
        drugs = truth["planted"][p.name]
        treated[:, p.index] = [any((h, d) in large["given"] for d in drugs) for h in large["pair_hadm"]]
    x = x.astype(bool) & ~treated
    persistence = (x & y.astype(bool)).sum(axis=0) / np.maximum(x.sum(axis=0), 1)
    chronic = np.array([p.kind == "chronic" for p in phenotypes()])
    assert persistence[chronic].mean() > persistence[~chronic].mean() + 0.1


def test_phenotypes_co_occur(large):
    hot = large["hot"].to_numpy().astype(float)
    corr = np.corrcoef(hot.T)
    index = {p.name.split(" ")[0].split(";")[0]: p.index for p in phenotypes()}
    diabetes, hypertension, ckd = 1, 5, 22
    sepsis, shock, renal_failure, chf, dysrhythmia = 0, 24, 21, 11, 10
    assert index["Septicemia"] == sepsis and index["Shock"] == shock
    for a, b in ((diabetes, hypertension), (diabetes, ckd), (sepsis, shock), (sepsis, renal_failure),
                 (chf, dysrhythmia)):
        assert corr[a, b] > 0.08, (a, b, corr[a, b])


def test_planted_drugs_lower_next_visit_presence(large):
    truth = large["truth"]
    planted = next_visit_differences(large, lambda name: truth["planted"][name])
    ward = next_visit_differences(large, lambda name: truth["ward_drugs"])
    assert len(planted) >= 30
    assert np.median(planted) < -0.05 and np.mean(np.array(planted) < 0) > 0.7
    assert abs(np.median(ward)) < 0.03  # ward drugs: given regardless, no effect
    assert np.median(planted) < np.median(ward) - 0.05


def test_null_control_planted_effect_one_has_no_effect():
    """With planted_effect = 1 the same drugs are given the same way but do nothing.

    Label noise is off here: planted drugs are given on the true state, so with noise a
    drug also marks a real (not spuriously coded) phenotype, which persists more often."""
    def median_effect(effect: float) -> float:
        co = simulate(SynthConfig(patients=1500, seed=4, planted_effect=effect, label_noise=0.0))
        nxt = np.r_[co.adm_patient[1:] == co.adm_patient[:-1], False]
        i = np.flatnonzero(nxt)
        x, y = co.recorded_state[i], co.recorded_state[i + 1]
        given = np.zeros((len(co.hadm_id), len(co.drugs)), dtype=bool)
        given[co.rx_pair_adm, co.rx_pair_drug] = True
        diffs = []
        for p in range(25):
            for drug in co.planted_ids[p]:
                sel = x[:, p]
                got = given[i, drug][sel]
                if got.sum() >= 15 and (~got).sum() >= 15:
                    diffs.append(y[sel, p][got].mean() - y[sel, p][~got].mean())
        return float(np.median(diffs))

    assert median_effect(0.5) < -0.05
    assert abs(median_effect(1.0)) < 0.03


def test_config_validation():
    with pytest.raises(ConfigError, match="acute_persistence"):
        build(SynthConfig, {"acute_persistence": 0.9, "chronic_persistence": 0.5})
    with pytest.raises(ConfigError, match="form"):
        build(SynthConfig, {"form": "parquet"})
