"""The MIMIC-III loader on the real demo, in both file forms, and on broken copies of it.

Expected figures (pairs, prevalence, orders, ages) are computed here independently with the
csv module and pandas from the same files, never copied from the loader's output."""
from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from ckd_ehr import cli
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import SAMPLES, SPLITS, VISITS, RunLayout, check_schema
from ckd_ehr.data.mimic import TABLES, MimicError, Rules, TableReport, load_drugs, load_visits, unparseable_rows
from ckd_ehr.data.prepare import PrepareError, run_prepare
from ckd_ehr.data.samples import visit_pairs


# --- helpers: read the demo independently, and write altered copies of it -----------------

def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_demo_form(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])


def write_full_form(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """The credentialed release's form: gzip, UPPERCASE quoted header, quoted strings,
    bare numbers, empty fields left empty."""
    def field(v: str) -> str:
        if v == "" or v.lstrip("-").replace(".", "", 1).isdigit() and not v.startswith("0"):
            return v
        return '"' + v.replace('"', '""') + '"'
    lines = [",".join(f'"{h.upper()}"' for h in header)] + [",".join(field(v) for v in r) for r in rows]
    with gzip.open(path, "wt", newline="") as f:
        f.write("\n".join(lines) + "\n")


def copy_demo(src: Path, dst: Path, edit=None) -> Path:
    """Copy the seven tables (demo form); `edit(name, header, rows)` may change them."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        header, rows = read_rows(src / f"{name}.csv")
        if edit:
            header, rows = edit(name, header, rows)
        if header is not None:
            write_demo_form(dst / f"{name}.csv", header, rows)
    return dst


def phenotype_groups() -> dict[str, set[str]]:
    text = resources.files("ckd_ehr").joinpath("resources/hcup_ccs_2015_definitions.yaml").read_text()
    return {n: set(g["codes"]) for n, g in yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)).items() if g["use_in_benchmark"]}


@pytest.fixture(scope="module")
def demo_visits(mimic_demo_dir):
    return load_visits(str(mimic_demo_dir))


@pytest.fixture(scope="module")
def full_form_dir(mimic_demo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mimic_full_form")
    for name in TABLES:
        header, rows = read_rows(mimic_demo_dir / f"{name}.csv")
        write_full_form(out / f"{name}.csv.gz", header, rows)
    return out


def cfg_for(mimic_dir, run_dir, **data) -> PipelineConfig:
    return build(PipelineConfig, {"run_dir": str(run_dir),
                                  "data": {"source": "mimic", "mimic_dir": str(mimic_dir), **data}})


# --- the demo ------------------------------------------------------------------------------

def test_demo_has_every_admission_and_patient(demo_visits):
    visits, report = demo_visits
    assert visits.schema == VISITS
    assert visits.num_rows == 129 and report["patients"] == 100
    assert len(set(visits["hadm_id"].to_pylist())) == 129
    assert unparseable_rows(report) == 0
    assert report["tables"]["PRESCRIPTIONS"]["rows_read"] == 10398


def test_demo_pairs_match_an_independent_count(demo_visits, mimic_demo_dir):
    adm = pd.read_csv(mimic_demo_dir / "ADMISSIONS.csv")
    expected = int((adm.groupby("subject_id").size() - 1).sum())
    pairs = visit_pairs(demo_visits[0])
    assert pairs.num_rows == expected == 29
    # each pair is two admissions of one patient, the second admitted later
    admit = dict(zip(adm["hadm_id"], pd.to_datetime(adm["admittime"])))
    subject = dict(zip(adm["hadm_id"], adm["subject_id"]))
    for h, n in zip(pairs["hadm_id"].to_pylist(), pairs["next_hadm_id"].to_pylist()):
        assert subject[h] == subject[n] and admit[h] < admit[n]


def test_demo_phenotype_prevalence_matches_an_independent_count(demo_visits, mimic_demo_dir):
    groups = phenotype_groups()
    _, rows = read_rows(mimic_demo_dir / "DIAGNOSES_ICD.csv")
    codes = defaultdict(set)
    for _, _, hadm, _, code in rows:
        codes[int(hadm)].add(code)
    visits = demo_visits[0]
    hadms = visits["hadm_id"].to_pylist()
    expected = np.array([[bool(codes[h] & g) for g in groups.values()] for h in hadms]).mean(axis=0)
    got = np.array(visits["phenotypes"].to_pylist()).mean(axis=0)
    np.testing.assert_allclose(got, expected)
    assert expected.max() > 0.3  # hypertension, dysrhythmias... are common in the demo

    # the label of a pair is the next admission's phenotypes
    pairs = visit_pairs(visits)
    by_hadm = dict(zip(hadms, visits["phenotypes"].to_pylist()))
    assert pairs["labels"].to_pylist() == [by_hadm[n] for n in pairs["next_hadm_id"].to_pylist()]


def test_demo_lists_keep_seq_num_and_first_given_order(demo_visits, mimic_demo_dir):
    visits = demo_visits[0].to_pandas().set_index("hadm_id")
    dx = pd.read_csv(mimic_demo_dir / "DIAGNOSES_ICD.csv", dtype={"icd9_code": str})
    for hadm, g in dx.sort_values(["hadm_id", "seq_num"]).groupby("hadm_id"):
        assert list(visits.at[hadm, "diagnosis_codes"]) == list(g["icd9_code"])
    titles = pd.read_csv(mimic_demo_dir / "D_ICD_DIAGNOSES.csv", dtype=str).set_index("icd9_code")
    untitled = 0
    for hadm in visits.index:
        codes = list(visits.at[hadm, "diagnosis_codes"])
        untitled += sum(c not in titles.index for c in codes)
        # a code the dictionary lacks is its own title, so no renderer drops it
        assert list(visits.at[hadm, "diagnosis_titles"]) == [
            titles.at[c, "long_title"] if c in titles.index else c for c in codes]
        assert list(visits.at[hadm, "diagnosis_short_titles"]) == [
            titles.at[c, "short_title"] if c in titles.index else c for c in codes]
    assert untitled == 45

    rx = pd.read_csv(mimic_demo_dir / "PRESCRIPTIONS.csv", dtype=str)
    rx["row"] = np.arange(len(rx))
    rx["hadm_id"] = rx["hadm_id"].astype(int)
    rx["drug"] = rx["drug"].str.strip()  # 'sodium bic ' and 'sodium bic' are one drug
    rx = rx.sort_values(["hadm_id", "startdate", "row"]).drop_duplicates(["hadm_id", "drug"])
    for hadm in visits.index:
        expected = list(rx.loc[rx["hadm_id"] == hadm, "drug"])
        assert list(visits.at[hadm, "drugs"]) == expected, hadm
    assert visits["drugs"].map(len).sum() < 10398  # deduplicated


def test_demo_ages_are_capped_at_90(demo_visits, mimic_demo_dir):
    visits = demo_visits[0].to_pandas()
    _, prow = read_rows(mimic_demo_dir / "PATIENTS.csv")
    dob = {int(r[1]): datetime.fromisoformat(r[3]) for r in prow}
    raw = [(t - dob[s]).total_seconds() / (365.2425 * 86400)
           for s, t in zip(visits["subject_id"], visits["admittime"].dt.to_pydatetime())]
    over = sum(a > 89.5 for a in raw)
    assert over > 0, "the demo has shifted >89-year-olds"
    assert visits["age"].max() == 90.0 and (visits["age"] == 90.0).sum() >= sum(a > 90 for a in raw)
    np.testing.assert_allclose(visits["age"], np.minimum(raw, 90.0), rtol=1e-5)


def test_full_release_form_gives_identical_visits(demo_visits, full_form_dir):
    with gzip.open(full_form_dir / "ADMISSIONS.csv.gz", "rt") as f:
        assert f.readline().startswith('"ROW_ID","SUBJECT_ID","HADM_ID"')
    visits, report = load_visits(str(full_form_dir))
    assert set(report["forms"].values()) == {"csv.gz"}
    assert visits.equals(demo_visits[0])


def test_streaming_in_small_blocks_gives_identical_visits(demo_visits, mimic_demo_dir):
    # 16 KiB blocks split PRESCRIPTIONS in ~100 pieces: first-given order must survive.
    visits, _ = load_visits(str(mimic_demo_dir), block_size=1 << 14)
    assert visits.equals(demo_visits[0])


def test_prepare_writes_contract_files(mimic_demo_dir, tmp_path):
    summary = run_prepare(cfg_for(mimic_demo_dir, tmp_path))
    layout = RunLayout(str(tmp_path))
    assert summary["admissions"] == 129 and summary["samples"] == 29
    check_schema(pq.read_table(layout.visits), VISITS, "visits")
    total = 0
    for split in SPLITS:
        t = check_schema(pq.read_table(layout.samples(split)), SAMPLES, split)
        assert set(t["split"].to_pylist()) <= {split}
        total += t.num_rows
    assert total == 29 == summary["samples"]


# --- bad input ------------------------------------------------------------------------------

def drop_column(table: str, column: str):
    def edit(name, header, rows):
        if name != table:
            return header, rows
        i = header.index(column)
        return header[:i] + header[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    return edit


def set_value(table: str, column: str, row: int, value: str):
    def edit(name, header, rows):
        if name == table:
            rows[row][header.index(column)] = value
        return header, rows
    return edit


def test_missing_column_names_file_and_column(mimic_demo_dir, tmp_path):
    d = copy_demo(mimic_demo_dir, tmp_path, drop_column("ADMISSIONS", "admittime"))
    with pytest.raises(MimicError, match=r"ADMISSIONS\.csv: missing column\(s\) admittime"):
        load_visits(str(d))


def test_missing_table_is_named(mimic_demo_dir, tmp_path):
    d = copy_demo(mimic_demo_dir, tmp_path, lambda n, h, r: (None, r) if n == "PRESCRIPTIONS" else (h, r))
    with pytest.raises(MimicError, match="table PRESCRIPTIONS not found"):
        load_visits(str(d))


def test_empty_table_is_an_error(mimic_demo_dir, tmp_path):
    d = copy_demo(mimic_demo_dir, tmp_path, lambda n, h, r: (h, []) if n == "PROCEDURES_ICD" else (h, r))
    with pytest.raises(MimicError, match=r"PROCEDURES_ICD\.csv: empty table"):
        load_visits(str(d))


def test_duplicated_hadm_id_is_an_error_unless_the_rows_are_identical(mimic_demo_dir, demo_visits, tmp_path):
    def differing(n, h, r):
        if n != "ADMISSIONS":
            return h, r
        copy = list(r[0])
        copy[h.index("dischtime")] = "2164-11-02 10:00:00"
        return h, r + [copy]
    d = copy_demo(mimic_demo_dir, tmp_path / "differ", differing)
    with pytest.raises(MimicError, match=r"ADMISSIONS\.csv: column 'hadm_id': duplicated hadm_id 142345 .*differ"):
        load_visits(str(d))
    # an exact copy of a row (row_id aside: it is not read) is dropped and counted
    d = copy_demo(mimic_demo_dir, tmp_path / "same", lambda n, h, r: (h, r + [["999", *r[0][1:]]]) if n == "ADMISSIONS" else (h, r))
    visits, report = load_visits(str(d))
    assert visits.equals(demo_visits[0])
    assert report["tables"]["ADMISSIONS"]["dropped"] == {
        "exact duplicate rows (same subject_id, hadm_id, admittime, dischtime)": 1}


def test_unparseable_values_are_counted_and_strict_fails(mimic_demo_dir, tmp_path):
    def edit(name, header, rows):
        header, rows = set_value("ADMISSIONS", "admittime", 0, "2164-13-45 25:00:00")(name, header, rows)
        return set_value("DIAGNOSES_ICD", "hadm_id", 0, "14x345")(name, header, rows)
    d = copy_demo(mimic_demo_dir, tmp_path / "tables", edit)

    summary = run_prepare(cfg_for(d, tmp_path / "lenient"))
    assert summary["admissions"] == 128 and summary["unparseable_values"] == 2
    rep = json.loads((tmp_path / "lenient" / "data" / "prepare_report.json").read_text())
    adm = rep["load"]["tables"]["ADMISSIONS"]
    assert adm["unparseable"] == {"admittime": 1} and adm["examples"]["admittime"] == ["2164-13-45 25:00:00"]
    assert rep["load"]["tables"]["DIAGNOSES_ICD"]["dropped"]["missing or unparseable hadm_id"] == 1
    # the admission dropped takes its events with it: counted in each table
    assert [(r["table"], r["column"], r["count"], r["example"]) for r in rep["repairs"]] == [
        ("ADMISSIONS", "admittime", 1, "2164-13-45 25:00:00"), ("DIAGNOSES_ICD", "hadm_id", 1, "14x345"),
        ("DIAGNOSES_ICD", "hadm_id", 20, "142345"), ("PROCEDURES_ICD", "hadm_id", 7, "142345"),
        ("PRESCRIPTIONS", "hadm_id", 34, "142345")]

    with pytest.raises(PrepareError, match=r"ADMISSIONS\.csv: column 'admittime': 1 row\(s\) dropped .*2164-13-45.*"
                                           r"5 repair\(s\) in all"):
        run_prepare(cfg_for(d, tmp_path / "strict", strict=True))
    rep = json.loads((tmp_path / "strict" / "data" / "prepare_report.json").read_text())
    assert rep["status"].startswith("failed") and rep["unparseable_values"] == 2 and len(rep["repairs"]) == 5
    assert not (tmp_path / "strict" / "data" / "visits.parquet").exists()


def test_cli_prepares_the_demo_and_reports_bad_input_in_one_line(mimic_demo_dir, tmp_path, capsys):
    assert cli.main(["prepare", "--mimic-dir", str(mimic_demo_dir), "--run-dir", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "data" / "samples" / "train.parquet").exists()

    bad = copy_demo(mimic_demo_dir, tmp_path / "bad", drop_column("PRESCRIPTIONS", "drug"))
    capsys.readouterr()
    assert cli.main(["prepare", "--mimic-dir", str(bad), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PRESCRIPTIONS.csv: missing column(s) drug" in err[0]


def test_drugs_keep_first_given_order_across_blocks(tmp_path):
    """Earliest startdate first, file order on ties, no startdate last; one entry per drug
    even when its rows fall in different streamed blocks."""
    path = tmp_path / "PRESCRIPTIONS.csv"
    path.write_text("hadm_id,startdate,drug\n"
                    "1,2100-01-03 00:00:00,A\n"
                    "1,2100-01-01 00:00:00,B\n"
                    "1,2100-01-01 00:00:00,A\n"
                    "1,,C\n"
                    "1,2100-01-02 00:00:00,D\n"
                    "1,2100-01-05 00:00:00, B \n"
                    "2,2100-01-01 00:00:00,A\n"
                    "99,2100-01-01 00:00:00,A\n"
                    "x1,2100-01-01 00:00:00,A\n"
                    "2,2100-01-01 00:00:00,\n")
    report = TableReport(file=str(path), rules=Rules(max_bad_fraction=1.0))
    drugs, names = load_drugs(str(path), report, np.array([1, 2]), block_size=64)
    named = names.to_pylist()
    assert [named[d] for d in drugs.loc[drugs["hadm_id"] == 1, "drug"]] == ["B", "A", "D", "C"]
    assert [named[d] for d in drugs.loc[drugs["hadm_id"] == 2, "drug"]] == ["A"]
    assert report.rows_read == 10
    assert report.dropped == {"missing or unparseable hadm_id": 1, "missing drug (empty)": 1,
                              "hadm_id not among the admissions (absent or dropped there)": 1}
    assert report.examples == {"hadm_id": ["x1"]}
