"""A corpus of broken MIMIC exports, built from the synthetic writer (60 patients), each with
its expected outcome: the error (file, column, count, example) or the repaired visits compared
with those of the clean export, and the repair counted (ckd_ehr/data/rules.py, issue 41).

Every case is one function that breaks a copy of the clean export; CASES_III / CASES_IV
list them with what must happen. MIMIC-IV's tables get the same treatment as MIMIC-III's."""
from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ckd_ehr import cli, stages
from ckd_ehr.config import DataConfig, PipelineConfig, SynthConfig, build
from ckd_ehr.contracts import SAMPLES, SPLITS, RunLayout
from ckd_ehr.data.prepare import PrepareError, load_release, run_prepare
from ckd_ehr.data.rules import MimicError
from ckd_ehr.data.synth.cohort import write_cohort
from ckd_ehr.stages import StageInputError

PATIENTS, SEED = 60, 4
ISO = "%Y-%m-%d %H:%M:%S"
US = "%m/%d/%Y %H:%M:%S"


# --- the clean exports, and tools to break copies of them -------------------------------------

@pytest.fixture(scope="module")
def clean3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean3")
    write_cohort(str(out), SynthConfig(patients=PATIENTS, seed=SEED, form="demo"))
    return out


@pytest.fixture(scope="module")
def clean3_gz(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean3_gz")
    write_cohort(str(out), SynthConfig(patients=PATIENTS, seed=SEED, form="full"))
    return out


@pytest.fixture(scope="module")
def clean4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean4")
    write_cohort(str(out), SynthConfig(patients=PATIENTS, seed=SEED, form="mimic4"))
    return out / "hosp"


@pytest.fixture(scope="module")
def visits3(clean3):
    visits, report = load(clean3)
    assert report["repairs"] == [] and visits.num_rows > PATIENTS  # the clean export needs no repair
    return visits


@pytest.fixture(scope="module")
def visits4(clean4):
    visits, report = load(clean4)
    assert report["repairs"] == [] and visits.num_rows > PATIENTS
    return visits


def load(directory: Path, **data):
    return load_release(str(directory), DataConfig(**data))


def copy_tables(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if ".csv" in f.name:
            shutil.copy(f, dst / f.name)
    return dst


def table_path(d: Path, name: str) -> Path:
    hits = [f for f in d.iterdir() if f.name.lower().startswith(name.lower() + ".csv")]
    assert len(hits) == 1, hits
    return hits[0]


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    return rows[0], rows[1:]


def write_rows(path: Path, header, rows, terminator: str = "\n", delimiter: str = ",", encoding: str = "utf-8") -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator=terminator, delimiter=delimiter).writerows([header, *rows])
    data = buf.getvalue().encode(encoding)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)


def edit(d: Path, name: str, fn) -> None:
    """Rewrite table `name` of `d` with fn(header, rows) -> (header, rows)."""
    path = table_path(d, name)
    write_rows(path, *fn(*read_rows(path)))


def col(header, name: str) -> int:
    return [h.lower() for h in header].index(name)


def code_column(header) -> str:
    return "icd9_code" if "icd9_code" in [h.lower() for h in header] else "icd_code"


def us_date(value: str) -> str:
    return datetime.strptime(value, ISO).strftime(US) if value else value


def hadm_of(visits, hadm_ids) -> pa.Table:
    return visits.filter(pc.invert(pc.is_in(visits["hadm_id"], pa.array(list(hadm_ids), pa.int64()))))


# --- the cases ----------------------------------------------------------------------------------
# Each case breaks the copy `d` of a clean export (MIMIC-III names; `T` maps to MIMIC-IV's).

def drop_column(table, column):
    def case(d, T):
        edit(d, T(table), lambda h, r: ([x for x in h if x.lower() != column],
                                        [[v for x, v in zip(h, row) if x.lower() != column] for row in r]))
    return case


def rename_column(table, column, new):
    def case(d, T):
        edit(d, T(table), lambda h, r: ([new if x.lower() == column else x for x in h], r))
    return case


def rename_table(d, T):
    p = table_path(d, T("PRESCRIPTIONS"))
    p.rename(p.with_name(p.name.replace(p.name.split(".")[0], p.name.split(".")[0][:-1])))


def semicolons(d, T):
    p = table_path(d, T("ADMISSIONS"))
    write_rows(p, *read_rows(p), delimiter=";")


def empty_table(d, T):
    edit(d, T("PROCEDURES_ICD"), lambda h, r: (h, []))


def truncated_plain(d, T):
    p = table_path(d, T("PRESCRIPTIONS"))
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2 + 7])


def duplicate_hadm_differing(d, T):
    def fn(h, r):
        copy = list(r[3])
        copy[col(h, "dischtime")] = "2199-01-01 00:00:00"
        return h, r + [copy]
    edit(d, T("ADMISSIONS"), fn)


def latin1_title(d, T):
    p = table_path(d, T("D_ICD_DIAGNOSES"))
    h, r = read_rows(p)
    r[5][col(h, "long_title")] = "Ménière's disease"
    write_rows(p, h, r, encoding="latin-1")


def gzip_in_csv_name(d, T):
    p = table_path(d, T("ADMISSIONS"))
    p.write_bytes(gzip.compress(p.read_bytes()))


def truncated_gz(d, T):
    p = table_path(d, T("PRESCRIPTIONS"))
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def corrupt_gz(d, T):
    p = table_path(d, T("PRESCRIPTIONS"))
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(range(64))
    p.write_bytes(bytes(data))


def stale_plain_beside_gz(d, T):
    p = table_path(d, T("DIAGNOSES_ICD"))
    p.with_name(p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))


def two_casings(d, T):
    p = table_path(d, T("ADMISSIONS"))
    shutil.copy(p, p.with_name(p.name.swapcase().replace(".CSV", ".csv").replace(".GZ", ".gz")))


def half_us_admittime(d, T):
    def fn(h, r):
        i = col(h, "admittime")
        for row in r[::2]:
            row[i] = us_date(row[i])
        return h, r
    edit(d, T("ADMISSIONS"), fn)


def us_dob(d, T):
    def fn(h, r):
        i = col(h, "dob")
        for row in r:
            row[i] = us_date(row[i])
        return h, r
    edit(d, T("PATIENTS"), fn)


def all_us_times(d, T):
    def fn(h, r):
        for c in ("admittime", "dischtime"):
            i = col(h, c)
            for row in r:
                row[i] = us_date(row[i])
        return h, r
    edit(d, T("ADMISSIONS"), fn)


def timezone_suffix(d, T):
    def fn(h, r):
        for c in ("admittime", "dischtime"):
            i = col(h, c)
            for row in r:
                row[i] = row[i] + "+00:00" if row[i] else row[i]
        return h, r
    edit(d, T("ADMISSIONS"), fn)


def one_admission_each(d, T):
    def fn(h, r):
        seen, out = set(), []
        for row in r:
            s = row[col(h, "subject_id")]
            if s not in seen:
                seen.add(s)
                out.append(row)
        return h, out
    edit(d, T("ADMISSIONS"), fn)


def every_diagnosis_twice(d, T):
    # a fan-out join: each row again, under a new row_id where the table has one
    def fn(h, r):
        again = [list(row) for row in r]
        if "row_id" in h:
            for k, row in enumerate(again):
                row[col(h, "row_id")] = str(10**6 + k)
        return h, r + again
    edit(d, T("DIAGNOSES_ICD"), fn)


NULL_CODES = ["NaN", "NULL", "NA", ""]


def null_like_codes(d, T):
    def fn(h, r):
        code = col(h, code_column(h))
        for row, token in zip(r[10:50:10], NULL_CODES):
            row[code] = token
        return h, r
    edit(d, T("DIAGNOSES_ICD"), fn)


def null_codes_removed(d, T):
    """What `null_like_codes` should read as: the same rows deleted."""
    edit(d, T("DIAGNOSES_ICD"), lambda h, r: (h, [row for k, row in enumerate(r) if k not in (10, 20, 30, 40)]))


def crlf(d, T):
    for name in ("ADMISSIONS", "PATIENTS", "DIAGNOSES_ICD", "PRESCRIPTIONS", "D_ICD_DIAGNOSES"):
        p = table_path(d, T(name))
        write_rows(p, *read_rows(p), terminator="\r\n")


def lost_leading_zeros(d, T):
    def fn(h, r):
        code = col(h, code_column(h))
        for row in r:
            if row[code].startswith("0") and ("icd_version" not in h or row[col(h, "icd_version")] == "9"):
                row[code] = row[code].lstrip("0")
        return h, r
    edit(d, T("DIAGNOSES_ICD"), fn)


def orphan_diagnoses(d, T):
    edit(d, T("DIAGNOSES_ICD"), lambda h, r: (h, r + [[("999999" if x.lower() == "hadm_id" else v)
                                                        for x, v in zip(h, row)] for row in r[:5]]))


def discharge_before_admit(n):
    def case(d, T):
        def fn(h, r):
            a, b = col(h, "admittime"), col(h, "dischtime")
            for row in r[1:1 + n]:
                row[b] = (datetime.strptime(row[a], ISO).replace(year=2000)).strftime(ISO)
            return h, r
        edit(d, T("ADMISSIONS"), fn)
    return case


def overlapping(d, T):
    """The first patient with two admissions: the first one now ends after the second starts."""
    def fn(h, r):
        s, a, b = col(h, "subject_id"), col(h, "admittime"), col(h, "dischtime")
        by = sorted(range(len(r)), key=lambda k: (r[k][s], r[k][a]))
        k = next(k for k, nxt in zip(by, by[1:]) if r[k][s] == r[nxt][s])
        nxt = by[by.index(k) + 1]
        r[k][b] = (datetime.strptime(r[nxt][a], ISO).replace(hour=23, minute=59)).strftime(ISO)
        return h, r
    edit(d, T("ADMISSIONS"), fn)


def empty_dischtimes(d, T):
    def fn(h, r):
        for row in r[:6]:
            row[col(h, "dischtime")] = ""
        return h, r
    edit(d, T("ADMISSIONS"), fn)


def decimal_and_nan_ids(d, T):
    def fn(h, r):
        i = col(h, "hadm_id")
        r[0][i] = r[0][i] + ".0"
        r[1][i] = "nan"
        return h, r
    edit(d, T("DIAGNOSES_ICD"), fn)


def quoted_commas_and_newlines(d, T):
    p = table_path(d, T("D_ICD_DIAGNOSES"))
    h, r = read_rows(p)
    for row in r:
        row[col(h, "long_title")] = f'{row[col(h, "long_title")]}, "quoted"\nnext line'
    write_rows(p, h, r, terminator="\r\n")
    p = table_path(d, T("PRESCRIPTIONS"))
    h, r = read_rows(p)
    for row in r:
        row[col(h, "drug")] = row[col(h, "drug")] + ", flush\r\n(bag)"
    write_rows(p, h, r)


def negative_age(d, T):
    edit(d, T("PATIENTS"), lambda h, r: (h, [[("2300-01-01 00:00:00" if x.lower() == "dob" and k == 0 else v)
                                              for x, v in zip(h, row)] for k, row in enumerate(r)]))


# --- outcomes -------------------------------------------------------------------------------

def error(pattern: str):
    return ("error", pattern)


def same(**repairs):
    """Visits identical to the clean export's; `repairs`: {table: {reason substring: count}}."""
    return ("same", repairs)


def repaired(check):
    """`check(visits, report, clean_visits, d)` asserts the repair."""
    return ("check", check)


def _repair(report, table: str, reason: str) -> dict:
    hits = [r for r in report["repairs"] if r["table"].upper() == table.upper() and reason in r["repair"]]
    assert len(hits) == 1, (table, reason, report["repairs"])
    return hits[0]


def only_repairs(report, expected: dict, src: Path) -> None:
    """The report's repairs are exactly `expected` ({table: {reason: count, or 'rows': every
    data row of the clean table}})."""
    got = {(r["table"].upper(), r["repair"]): r["count"] for r in report["repairs"]}
    want = {}
    for table, reasons in expected.items():
        for reason, n in reasons.items():
            key = next(k for k in got if k[0] == table.upper() and reason in k[1])
            want[key] = len(read_rows(table_path(src, table))[1]) if n == "rows" else n
    assert got == want, report["repairs"]


def check_null_codes(visits, report, clean, d, T):
    expected_dir = copy_tables(d.parent / "clean_source", d.parent / "expected")
    null_codes_removed(expected_dir, T)
    expected, _ = load(expected_dir)
    assert visits.equals(expected)
    code = "icd9_code" if T is T3 else "icd_code"
    r = _repair(report, "DIAGNOSES_ICD", f"null-like {code}")
    assert r["count"] == 4 and r["example"] == "NaN" and r["column"] == code
    assert not any(c.upper() in ("NAN", "NULL", "NA") for cs in visits["diagnosis_codes"].to_pylist() for c in cs)


def check_orphans(visits, report, clean, d, T):
    assert visits.equals(clean)
    r = _repair(report, "DIAGNOSES_ICD", "hadm_id not among the admissions")
    assert (r["count"], r["example"]) == (5, "999999")


def check_one_backwards(visits, report, clean, d, T):
    r = _repair(report, "ADMISSIONS", "dischtime before admittime")
    assert r["count"] == 1 and r["column"] == "dischtime"
    gone = int(r["example"].split()[1].rstrip(":"))
    assert visits.equals(hadm_of(clean, [gone])) and visits.num_rows == clean.num_rows - 1


def check_overlap(visits, report, clean, d, T):
    assert report["repairs"] == []
    notes = report["tables"][T("ADMISSIONS")]["notes"]
    assert notes == {"admissions overlapping the patient's previous one (kept)": 1}
    assert visits.drop_columns(["dischtime"]).equals(clean.drop_columns(["dischtime"]))


def check_empty_dischtimes(visits, report, clean, d, T):
    assert report["repairs"] == [] and report["tables"][T("ADMISSIONS")]["unparseable"] == {}
    assert visits["dischtime"].null_count == 6
    assert visits.drop_columns(["dischtime"]).equals(clean.drop_columns(["dischtime"]))


def check_ids(visits, report, clean, d, T):
    decimal = _repair(report, "DIAGNOSES_ICD", "hadm_id written as a decimal")
    assert decimal["count"] == 1 and decimal["example"].endswith(".0")
    missing = _repair(report, "DIAGNOSES_ICD", "missing or unparseable hadm_id")
    assert (missing["count"], missing["example"]) == (1, "nan")
    assert report["tables"][T("DIAGNOSES_ICD")]["unparseable"] == {}   # 'nan' is a null, not a bad value
    expected_dir = copy_tables(d.parent / "clean_source", d.parent / "expected")
    edit(expected_dir, T("DIAGNOSES_ICD"), lambda h, r: (h, [row for k, row in enumerate(r) if k != 1]))
    assert visits.equals(load(expected_dir)[0])


def check_quoted(visits, report, clean, d, T):
    assert report["repairs"] == []
    assert visits.drop_columns(["diagnosis_titles", "drugs"]).equals(clean.drop_columns(["diagnosis_titles", "drugs"]))
    titles = [t for ts in visits["diagnosis_titles"].to_pylist() for t in ts]
    clean_titles = [t for ts in clean["diagnosis_titles"].to_pylist() for t in ts]
    assert titles == [f'{t}, "quoted"\nnext line' for t in clean_titles]
    assert [[x + ", flush\r\n(bag)" for x in xs] for xs in clean["drugs"].to_pylist()] == visits["drugs"].to_pylist()


def check_negative_age(visits, report, clean, d, T):
    r = _repair(report, "PATIENTS", "age below 0")
    assert r["count"] >= 1 and visits["age"].null_count == r["count"]
    assert visits.drop_columns(["age"]).equals(clean.drop_columns(["age"]))


CASES_III = {
    # the table, row by row
    "missing column": (drop_column("ADMISSIONS", "admittime"), error(r"ADMISSIONS\.csv: missing column\(s\) admittime")),
    "renamed column": (rename_column("DIAGNOSES_ICD", "icd9_code", "ICD9CODE"),
                       error(r"DIAGNOSES_ICD\.csv: missing column\(s\) icd9_code \(header has: .*ICD9CODE")),
    "renamed table": (rename_table, error(r"table PRESCRIPTIONS not found")),
    "semicolon separator": (semicolons, error(r"ADMISSIONS\.csv: missing column\(s\) subject_id.*separated by ';'")),
    "empty table": (empty_table, error(r"PROCEDURES_ICD\.csv: empty table")),
    "truncated plain csv": (truncated_plain, error(r"PRESCRIPTIONS\.csv: not a readable CSV table .*Expected 19 columns")),
    "duplicate hadm_id": (duplicate_hadm_differing,
                          error(r"ADMISSIONS\.csv: column 'hadm_id': duplicated hadm_id \d+ \(1 value\(s\) in 2 row\(s\)")),
    "latin-1 bytes": (latin1_title, error(r"D_ICD_DIAGNOSES\.csv: not UTF-8 text")),
    "nan and 123.0 ids": (decimal_and_nan_ids, repaired(check_ids)),
    "truncated csv.gz": (None, None),      # MIMIC-III full form: CASES_III_GZ
    "every diagnosis twice": (every_diagnosis_twice,
                              same(DIAGNOSES_ICD={"exact duplicate rows (same hadm_id, seq_num, icd9_code)": "rows"})),
    "NaN NULL NA codes": (null_like_codes, repaired(check_null_codes)),
    "two casings": (two_casings, error(r"2 files for table ADMISSIONS: ADMISSIONS\.csv and admissions\.csv")),
    "half admittimes US format": (half_us_admittime,
                                  error(r"ADMISSIONS\.csv: column 'admittime': (\d+) of \d+ row\(s\) \(50\.\d%\) do not parse "
                                        r"with the date format '%Y-%m-%d %H:%M:%S' .*e\.g\. '\d\d/\d\d/\d{4} ")),
    "dob US format": (us_dob, error(r"PATIENTS\.csv: column 'dob': 60 of 60 row\(s\) .*do not parse .*data\.date_formats\.dob")),
    # what a hospital export adds
    "CRLF line endings": (crlf, same()),
    "quoted commas and newlines": (quoted_commas_and_newlines, repaired(check_quoted)),
    "timezone suffix, default format": (timezone_suffix,
                                        error(r"column 'admittime': (\d+) of \1 row\(s\) \(100\.0%\) .*e\.g\. '.*\+00:00'")),
    "lost leading zeros": (lost_leading_zeros,
                           error(r"DIAGNOSES_ICD\.csv: column 'icd9_code': \d+ code\(s\) in \d+ row\(s\) are not in "
                                 r".*D_ICD_DIAGNOSES\.csv but are with leading zeros \(e\.g\. '\d+', listed as '0\d+'\)")),
    "diagnoses of unknown admissions": (orphan_diagnoses, repaired(check_orphans)),
    "one dischtime before admittime": (discharge_before_admit(1), repaired(check_one_backwards)),
    "many dischtimes before admittime": (discharge_before_admit(5),
                                         error(r"ADMISSIONS\.csv: column 'dischtime': 5 of \d+ row\(s\) \(\d\.\d%\) are "
                                               r"discharged before .*e\.g\. 'hadm_id \d+: admittime")),
    "overlapping admissions": (overlapping, repaired(check_overlap)),
    "empty dischtimes are nulls": (empty_dischtimes, repaired(check_empty_dischtimes)),
    "negative age": (negative_age, repaired(check_negative_age)),
}
del CASES_III["truncated csv.gz"]

CASES_III_GZ = {
    "gzip (full release form)": (lambda d, T: None, same()),
    "truncated csv.gz": (truncated_gz, error(r"PRESCRIPTIONS\.csv\.gz: gzip data corrupt or truncated")),
    "corrupt csv.gz": (corrupt_gz, error(r"PRESCRIPTIONS\.csv\.gz: (gzip data corrupt or truncated|not a readable CSV)")),
    "stale plain csv beside csv.gz": (stale_plain_beside_gz,
                                      error(r"2 files for table \w+: DIAGNOSES_ICD\.csv and DIAGNOSES_ICD\.csv\.gz")),
    "gzip bytes in a .csv name": (lambda d, T: (table_path(d, "ADMISSIONS").rename(d / "ADMISSIONS.csv")),
                                  error(r"ADMISSIONS\.csv: holds gzip-compressed bytes but is named ADMISSIONS\.csv")),
    "lowercase names, BOM, dotted codes": (None, same()),   # below: needs the demo form's text
}
del CASES_III_GZ["lowercase names, BOM, dotted codes"]


def lowercase_bom_dotted(d, T):
    for f in list(d.iterdir()):
        f.rename(f.with_name(f.name.lower()))
    p = d / "admissions.csv"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    edit(d, "DIAGNOSES_ICD", lambda h, r: (h, [[(v[:3] + "." + v[3:] if x == "icd9_code" and len(v) > 3 else v)
                                                 for x, v in zip(h, row)] for row in r]))


CASES_III["lowercase names, BOM, dotted codes"] = (lowercase_bom_dotted, same())
CASES_III["gzip bytes in a .csv name (demo form)"] = (gzip_in_csv_name,
                                                       error(r"ADMISSIONS\.csv: holds gzip-compressed bytes"))


def T4(name: str) -> str:
    return name.lower()


def T3(name: str) -> str:
    return name


CASES_IV = {
    "missing column": (drop_column("PATIENTS", "anchor_year"), error(r"patients\.csv\.gz: missing column\(s\) anchor_year")),
    "truncated csv.gz": (truncated_gz, error(r"prescriptions\.csv\.gz: gzip data corrupt or truncated")),
    "stale plain csv beside csv.gz": (stale_plain_beside_gz,
                                      error(r"2 files for table diagnoses_icd: diagnoses_icd\.csv and diagnoses_icd\.csv\.gz")),
    "every diagnosis twice": (every_diagnosis_twice,
                              same(diagnoses_icd={"exact duplicate rows (same hadm_id, seq_num, icd_code, icd_version)": "rows"})),
    "NaN NULL NA codes": (null_like_codes, repaired(check_null_codes)),
    "half admittimes US format": (half_us_admittime, error(r"admissions\.csv\.gz: column 'admittime': \d+ of \d+ row\(s\) \(50\.\d%\)")),
    "lost leading zeros (ICD-9 rows)": (lost_leading_zeros,
                                        error(r"diagnoses_icd\.csv\.gz: column 'icd_code': .*leading zeros")),
    "diagnoses of unknown admissions": (orphan_diagnoses, repaired(check_orphans)),
    "one dischtime before admittime": (discharge_before_admit(1), repaired(check_one_backwards)),
    "CRLF line endings": (crlf, same()),
    "overlapping admissions": (overlapping, repaired(check_overlap)),
    "nan and 123.0 ids": (decimal_and_nan_ids, repaired(check_ids)),
}


def _run_case(src: Path, tmp_path: Path, case, outcome, T, clean_visits, **data):
    shutil.copytree(src, tmp_path / "clean_source")
    d = copy_tables(src, tmp_path / "broken")
    case(d, T)
    kind, expected = outcome
    if kind == "error":
        with pytest.raises(MimicError, match=expected):
            load(d, **data)
        return
    visits, report = load(d, **data)
    if kind == "same":
        assert visits.equals(clean_visits)
        only_repairs(report, expected, tmp_path / "clean_source")
    else:
        expected(visits, report, clean_visits, d, T)


@pytest.mark.parametrize("name", list(CASES_III))
def test_mimic3_broken_export(name, clean3, visits3, tmp_path):
    case, outcome = CASES_III[name]
    _run_case(clean3, tmp_path, case, outcome, T3, visits3)


@pytest.mark.parametrize("name", list(CASES_III_GZ))
def test_mimic3_full_form_broken_export(name, clean3_gz, visits3, tmp_path):
    case, outcome = CASES_III_GZ[name]
    _run_case(clean3_gz, tmp_path, case, outcome, T3, visits3)


@pytest.mark.parametrize("name", list(CASES_IV))
def test_mimic4_broken_export(name, clean4, visits4, tmp_path):
    case, outcome = CASES_IV[name]
    _run_case(clean4, tmp_path, case, outcome, T4, visits4)


def test_stated_date_formats_read_what_the_default_refuses(clean3, visits3, clean4, visits4, tmp_path):
    """One format per column, stated in data.date_formats: US dates and timezone suffixes parse."""
    d = copy_tables(clean3, tmp_path / "us")
    all_us_times(d, T3)
    with pytest.raises(MimicError, match=r"column 'admittime': (\d+) of \1 row"):
        load(d)
    assert load(d, date_formats={"admittime": US, "dischtime": US})[0].equals(visits3)
    for src, clean, T, name in ((clean3, visits3, T3, "tz3"), (clean4, visits4, T4, "tz4")):
        d = copy_tables(src, tmp_path / name)
        timezone_suffix(d, T)
        iso_tz = ISO + "%z"
        assert load(d, date_formats={"admittime": iso_tz, "dischtime": iso_tz})[0].equals(clean)
    with pytest.raises(ValueError, match="unknown column"):
        DataConfig(date_formats={"chartdate": ISO})


# --- prepare: empty results, the run directory, strict, the report and the CLI -------------------

def cfg_for(mimic_dir: Path, run_dir: Path, **data) -> PipelineConfig:
    return build(PipelineConfig, {"run_dir": str(run_dir),
                                  "data": {"source": "mimic", "mimic_dir": str(mimic_dir), **data}})


@pytest.mark.parametrize("src_name, T", [("clean3", T3), ("clean4", T4)])
def test_no_visit_pairs_stops_prepare_with_the_counts(src_name, T, request, tmp_path):
    d = copy_tables(request.getfixturevalue(src_name), tmp_path / "one")
    one_admission_each(d, T)
    with pytest.raises(PrepareError, match=r"no visit pairs: .*60 admissions of 60 patients \(patients with 1 "
                                           r"admission\(s\): 60\); pairs per split: train 0, val 0, test 0"):
        run_prepare(cfg_for(d, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data" / "prepare_report.json").read_text())
    assert report["status"].startswith("failed: ") and "no visit pairs" in report["status"]
    assert not (tmp_path / "run" / "data" / "visits.parquet").exists()


def test_empty_split_and_no_training_positive_stop_prepare(clean3, tmp_path):
    with pytest.raises(PrepareError, match=r"the val split is empty \(split\.val=0\.01 of \d+ patients with pairs; .*"
                                           r"pairs per split: train \d+, val 0, test \d+"):
        run_prepare(build(PipelineConfig, {"run_dir": str(tmp_path / "split"), "split": {"train": 0.98, "val": 0.01, "test": 0.01},
                                           "data": {"source": "mimic", "mimic_dir": str(clean3)}}))
    d = copy_tables(clean3, tmp_path / "nothing")
    edit(d, "DIAGNOSES_ICD", lambda h, r: (h, [[("V7612" if x == "icd9_code" else v) for x, v in zip(h, row)] for row in r]))
    with pytest.raises(PrepareError, match=r"no phenotype positive in the training split \(\d+ pairs"):
        run_prepare(cfg_for(d, tmp_path / "run"))


def test_unwritable_run_dir_is_refused_before_any_table_is_read(clean3, tmp_path):
    d = copy_tables(clean3, tmp_path / "tables")
    (d / "ADMISSIONS.csv").unlink()      # would be the error if a table were read first
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PrepareError, match=r"a_file: run directory not writable"):
        run_prepare(cfg_for(d, blocker))


def test_strict_turns_every_repair_into_an_error_and_the_report_lists_them(clean3, tmp_path, caplog):
    d = copy_tables(clean3, tmp_path / "tables")
    every_diagnosis_twice(d, T3)
    null_like_codes(d, T3)
    with pytest.raises(PrepareError, match=r"DIAGNOSES_ICD\.csv: column 'icd9_code': 4 row\(s\) dropped \(null-like "
                                           r"icd9_code .*e\.g\. 'NaN'\); 2 repair\(s\) in all.*data\.strict"):
        run_prepare(cfg_for(d, tmp_path / "strict", strict=True))
    assert not (tmp_path / "strict" / "data" / "visits.parquet").exists()

    caplog.set_level("INFO", logger="ckd_ehr")
    summary = run_prepare(cfg_for(d, tmp_path / "ok"))
    report = json.loads((tmp_path / "ok" / "data" / "prepare_report.json").read_text())
    assert report["status"] == "ok"
    rows = len(read_rows(table_path(clean3, "DIAGNOSES_ICD"))[1])
    # four first copies made null-like: their twins are no longer duplicates
    assert [(r["table"], r["column"], r["count"]) for r in report["repairs"]] == [
        ("DIAGNOSES_ICD", "icd9_code", 4), ("DIAGNOSES_ICD", "hadm_id", rows - 4)]
    assert summary["repairs"] and sum(summary["repairs"].values()) == sum(r["count"] for r in report["repairs"])
    text = caplog.text
    assert "2 repair(s), listed in" in text and "column icd9_code: 4 row(s) dropped: null-like icd9_code" in text
    assert "ages over 89 at admission capped at 90" in text   # a note, not a repair


def test_cli_names_the_file_in_one_line_and_exits_non_zero(clean3_gz, tmp_path, capsys):
    d = copy_tables(clean3_gz, tmp_path / "gz")
    corrupt_gz(d, T3)
    assert cli.main(["prepare", "--mimic-dir", str(d), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PRESCRIPTIONS.csv.gz" in err[0]


def test_later_stages_refuse_missing_or_empty_inputs_in_one_line(tmp_path, capsys):
    cfg = build(PipelineConfig, {"run_dir": str(tmp_path)})
    layout = RunLayout(str(tmp_path))
    with pytest.raises(StageInputError, match=r"stage eadf: input .*samples/train\.parquet is missing; it is made "
                                              r"by stage prepare \(`ckd-ehr prepare`\)"):
        stages.stage("eadf").run(cfg)
    for split in SPLITS:
        (tmp_path / "data" / "samples").mkdir(parents=True, exist_ok=True)
        pq.write_table(SAMPLES.empty_table(), layout.samples(split))
    assert cli.main(["eadf", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.parquet is empty (0 rows); it is made by stage prepare" in err[0]
    with pytest.raises(StageInputError, match=r"stage teacher: input .*eadf/samples/train\.parquet is missing; "
                                              r"it is made by stage eadf"):
        stages.stage("teacher").run(cfg)


# --- the open demos still prepare, with their repair counts pinned -------------------------------

def test_open_demos_prepare_with_pinned_repairs(mimic_demo_dir, mimic4_demo_dir):
    _, report = load(mimic_demo_dir)
    assert report["repairs"] == []
    assert {k: t["notes"] for k, t in report["tables"].items() if t["notes"]} == {
        "PATIENTS": {"ages over 89 at admission capped at 90": 9}}
    _, report = load(mimic4_demo_dir)
    assert report["repairs"] == []
    assert {k: t["notes"] for k, t in report["tables"].items() if t["notes"]} == {
        "patients": {"ages over 89 at admission capped at 90": 8},
        "d_icd_diagnoses": {"codes of both ICD versions written alike (the first listed title kept)": 1},
        "d_icd_procedures": {"codes of both ICD versions written alike (the first listed title kept)": 6}}
