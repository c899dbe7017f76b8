"""MIMIC-III table loader: seven tables -> one row per admission (contracts.VISITS).

Reads ADMISSIONS, PATIENTS, DIAGNOSES_ICD, PROCEDURES_ICD, PRESCRIPTIONS, D_ICD_DIAGNOSES
and D_ICD_PROCEDURES in either form MIMIC-III ships in:

- demo form: `NAME.csv`, lowercase headers (the open demo, vendored in tests/data/mimic3_demo);
- full-release form: `NAME.csv.gz`, UPPERCASE quoted headers, quoted string fields.

Column names are matched case-insensitively after reading the header, and only the columns
needed are parsed (pyarrow.csv include_columns). Every table is streamed block by block, so
PRESCRIPTIONS (about 4.2M rows in the full release) never sits in memory whole: per block it
is reduced to the first administration of each (admission, drug).

Every field is read as a string and parsed here under the one rule of `ckd_ehr.data.rules`:
refuse naming file, column, count and an example (`MimicError`), or repair and count in the
load report. Refused: a missing table, two files for one table (plain and gzip, or two
casings), a file that cannot be read or decompressed (its name in the message), a missing
column, an empty table, a duplicated hadm_id / subject_id whose rows differ, more than
`data.max_bad_fraction` unparseable values in a column (timestamps parse with one format per
column, `data.date_formats`) or admissions discharged before admission, codes that lost their
leading zeros. Repaired and counted: exact duplicate rows (in the columns read;
PRESCRIPTIONS is reduced to one row per admission and drug anyway), null-like codes and ids,
unparseable values under the threshold, events of unknown admissions, admissions discharged
before admission (under the threshold), ids written as decimals, negative ages.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr.contracts import VISITS, check_schema
from ckd_ehr.data.csv_tables import DEFAULT_BLOCK_SIZE, find_table, stream_table
from ckd_ehr.phenotypes import NUM_PHENOTYPES, code_to_phenotype_table
from ckd_ehr.data.rules import (EXAMPLES_KEPT, MimicError, Rules, TableReport, as_array, check_leading_zeros,
                                drop_exact_duplicates, duplicate_mask, first_null_like, nullify, repairs)

__all__ = ["EXAMPLES_KEPT", "MimicError", "Rules", "TableReport", "load_visits", "unparseable_rows"]

log = logging.getLogger(__name__)

# Columns each table must have (lowercase); nothing else is parsed.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "ADMISSIONS": ("subject_id", "hadm_id", "admittime", "dischtime"),
    "PATIENTS": ("subject_id", "gender", "dob"),
    "DIAGNOSES_ICD": ("hadm_id", "seq_num", "icd9_code"),
    "PROCEDURES_ICD": ("hadm_id", "seq_num", "icd9_code"),
    "PRESCRIPTIONS": ("hadm_id", "startdate", "drug"),
    "D_ICD_DIAGNOSES": ("icd9_code", "short_title", "long_title"),
    "D_ICD_PROCEDURES": ("icd9_code", "short_title"),
}
TABLES = tuple(TABLE_COLUMNS)
DICTIONARY_OF = {"DIAGNOSES_ICD": "D_ICD_DIAGNOSES", "PROCEDURES_ICD": "D_ICD_PROCEDURES"}

# MIMIC-III shifts the date of birth of patients older than 89 about 300 years back; the
# true age is unknown beyond "over 89", so ages are capped here.
AGE_CAP = 90.0
SECONDS_PER_YEAR = 365.2425 * 86400


def unparseable_rows(report: dict) -> int:
    """Total unparseable values over all tables of a `load_visits` report."""
    return sum(sum(t["unparseable"].values()) for t in report["tables"].values())


def read_small_table(path: str, name: str, report: TableReport,
                     columns: tuple[str, ...] | None = None) -> pa.Table:
    """A whole (small) table (`columns`, default TABLE_COLUMNS[name]); error if it has no data rows."""
    columns = columns or TABLE_COLUMNS[name]
    batches = list(stream_table(path, columns))
    schema = pa.schema([(c, pa.string()) for c in columns])
    table = pa.Table.from_batches(batches, schema=schema)
    report.rows_read = table.num_rows
    if table.num_rows == 0:
        raise MimicError(f"{path}: empty table (header only, no data rows)")
    return table


# --- parsing --------------------------------------------------------------------------------

def parse_ints(raw, column: str, report: TableReport, required: bool) -> tuple[pa.Array, np.ndarray]:
    """Parse integer strings; returns (int64 array with nulls, mask of rows to keep).

    Empty and null-like values are nulls; '123.0' (an id a spreadsheet or pandas wrote as a
    float) is read as 123 and counted; anything else that is not an integer is unparseable
    (counted; for a `required` column the caller drops the row, else the value is null)."""
    raw = as_array(raw)
    values_raw = nullify(raw)
    present = values_raw.is_valid().to_numpy(zero_copy_only=False)
    decimal = pc.fill_null(pc.match_substring_regex(values_raw, r"^\d+\.0*$"), False)
    n_decimal = int(pc.sum(decimal).as_py() or 0)
    if n_decimal:
        report.repair(f"{column} written as a decimal ('123.0'): read as an integer", n_decimal, column,
                      values_raw.filter(decimal)[0].as_py())
        values_raw = pc.if_else(decimal, pc.replace_substring_regex(values_raw, r"\.0*$", ""), values_raw)
    # ids are non-negative in MIMIC; ascii_is_decimal is much faster than a regex
    ok = pc.fill_null(pc.ascii_is_decimal(values_raw), False)
    values = pc.cast(pc.if_else(ok, values_raw, pa.scalar(None, pa.string())), pa.int64())
    ok_np = ok.to_numpy(zero_copy_only=False)
    bad = present & ~ok_np
    report.unparseable_values(column, raw, bad, required)
    return values, ok_np if required else np.ones(len(raw), dtype=bool)


def parse_times(raw, column: str, report: TableReport, required: bool) -> tuple[pa.Array, np.ndarray]:
    """Parse timestamps with the column's one format (`Rules.date_format`: the release's
    'YYYY-MM-DD HH:MM:SS' unless `data.date_formats` names another) into timestamp[s].

    Returns (values, keep). Empty and null-like values are nulls, not unparseable; a value
    the format does not parse is counted (`TableReport.check_bad_fraction` stops the run
    above `data.max_bad_fraction`)."""
    raw = as_array(raw)
    trimmed = nullify(raw)
    values = pc.strptime(trimmed, format=report.rules.date_format(column), unit="s", error_is_null=True)
    if values.type.tz is not None:   # a %z format: instants, kept as UTC wall time
        values = values.cast(pa.int64()).view(pa.timestamp("s"))
    ok = values.is_valid().to_numpy(zero_copy_only=False)
    present = trimmed.is_valid().to_numpy(zero_copy_only=False)
    bad = present & ~ok
    report.unparseable_values(column, raw, bad, required)
    return values, ok if required else np.ones(len(raw), dtype=bool)


def normalize_codes(raw) -> pa.Array:
    """Vectorised phenotypes.normalize_icd9: no dots or spaces, upper case; empty and
    null-like values ('NaN', 'NULL', 'NA', ...) are null."""
    return pc.utf8_upper(pc.replace_substring_regex(nullify(raw), r"[\s.]", ""))


def require(report: TableReport, raw: dict[str, pa.Array], ok: dict[str, np.ndarray]) -> np.ndarray:
    """Rows where every column in `ok` parsed; the others are dropped, counted under the first
    column that failed (in `ok`'s order) with one example value."""
    keep = np.ones(len(next(iter(ok.values()))), dtype=bool)
    for column, good in ok.items():
        bad = keep & ~good
        if bad.any():
            example = as_array(raw[column])[int(np.flatnonzero(bad)[0])].as_py()
            report.drop(f"missing or unparseable {column}", int(bad.sum()), column, example)
        keep &= good
    return keep


def _check_unique(ids: np.ndarray, path: str, column: str) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        shown = ", ".join(str(v) for v in dup[:5])
        raise MimicError(f"{path}: column '{column}': duplicated {column} {shown}"
                         f"{' ...' if len(dup) > 5 else ''} ({len(dup)} value(s) in {int(counts[counts > 1].sum())} "
                         f"row(s) that differ in other columns; each must appear once)")


# --- the tables -----------------------------------------------------------------------------

def load_admissions(path: str, report: TableReport) -> pd.DataFrame:
    """ADMISSIONS (MIMIC-III and MIMIC-IV alike) -> subject_id, hadm_id, admittime, dischtime
    (float seconds) sorted by patient and admission time.

    Exact duplicate rows are dropped and counted; a hadm_id twice with different values is an
    error. Admissions discharged before they were admitted are dropped and counted (an error
    above `data.max_bad_fraction`); overlapping admissions of one patient are counted."""
    t = drop_exact_duplicates(read_small_table(path, "ADMISSIONS", report, TABLE_COLUMNS["ADMISSIONS"]),
                              report, "hadm_id")
    subject, k1 = parse_ints(t["subject_id"], "subject_id", report, required=True)
    hadm, k2 = parse_ints(t["hadm_id"], "hadm_id", report, required=True)
    admit, k3 = parse_times(t["admittime"], "admittime", report, required=True)
    disch, _ = parse_times(t["dischtime"], "dischtime", report, required=False)
    report.check_bad_fraction()
    keep = require(report, {c: t[c] for c in ("hadm_id", "subject_id", "admittime")},
                   {"hadm_id": k2, "subject_id": k1, "admittime": k3})
    df = pd.DataFrame({
        "subject_id": subject.to_numpy(zero_copy_only=False),
        "hadm_id": hadm.to_numpy(zero_copy_only=False),
        "admittime": _seconds(admit), "dischtime": _seconds(disch),
    })[keep]
    if df.empty:
        raise MimicError(f"{path}: no admission left after dropping unparseable rows "
                         f"({report.dropped})")
    df = df.astype({"subject_id": "int64", "hadm_id": "int64"})
    _check_unique(df["hadm_id"].to_numpy(), path, "hadm_id")
    backwards = (df["dischtime"] < df["admittime"]).to_numpy()
    if backwards.any():
        first = df[backwards].iloc[0]
        example = f"hadm_id {int(first['hadm_id'])}: admittime {_iso(first['admittime'])}, dischtime {_iso(first['dischtime'])}"
        if backwards.sum() > report.rules.max_bad_fraction * report.rows_read:
            report.refuse("dischtime", int(backwards.sum()), example, "are discharged before they are admitted")
        report.drop("dischtime before admittime: admission dropped", int(backwards.sum()), "dischtime", example)
        df = df[~backwards]
    df = df.sort_values(["subject_id", "admittime", "hadm_id"], kind="stable").reset_index(drop=True)
    same = df["subject_id"].to_numpy()[1:] == df["subject_id"].to_numpy()[:-1]
    report.note("admissions overlapping the patient's previous one (kept)",
                int((same & (df["admittime"].to_numpy()[1:] < df["dischtime"].to_numpy()[:-1])).sum()))
    return df


def _iso(seconds: float) -> str:
    return "null" if np.isnan(seconds) else str(np.datetime64(int(seconds), "s")).replace("T", " ")


def gender_values(raw, report: TableReport) -> pd.array:
    """'M' / 'F' (trimmed, any case); anything else present is set to null and counted."""
    gender = pc.utf8_upper(nullify(raw)).to_pylist()
    odd = [g for g in gender if g is not None and g not in ("M", "F")]
    report.repair("gender not M or F: set to null", len(odd), "gender", odd[0] if odd else None)
    return pd.array([g if g in ("M", "F") else None for g in gender], dtype=object)


def load_patients(path: str, report: TableReport) -> pd.DataFrame:
    t = drop_exact_duplicates(read_small_table(path, "PATIENTS", report), report, "subject_id")
    subject, keep = parse_ints(t["subject_id"], "subject_id", report, required=True)
    keep = require(report, {"subject_id": t["subject_id"]}, {"subject_id": keep})
    dob, _ = parse_times(t["dob"], "dob", report, required=False)
    report.check_bad_fraction()
    df = pd.DataFrame({
        "subject_id": subject.to_numpy(zero_copy_only=False),
        "gender": gender_values(t["gender"], report),
        "dob": _seconds(dob),
    })[keep].astype({"subject_id": "int64"})
    _check_unique(df["subject_id"].to_numpy(), path, "subject_id")
    return df.reset_index(drop=True)


def load_coded_events(path: str, name: str, report: TableReport, hadm_ids: np.ndarray,
                      code_column: str = "icd9_code", version_column: str | None = None,
                      ) -> pd.DataFrame:
    """DIAGNOSES_ICD / PROCEDURES_ICD -> (hadm_id, code) in seq_num order, then file order.

    Null-like codes ('', NaN, NULL, NA...) are dropped and counted, never rendered; rows
    identical in every column read are dropped and counted. With `version_column`
    (MIMIC-IV's icd_version) a `version` column is added (float, NaN where unparseable: the
    caller decides what to do with those rows)."""
    parts = []
    offset = 0
    columns = ("hadm_id", "seq_num", code_column) + ((version_column,) if version_column else ())
    for batch in stream_table(path, columns):
        report.rows_read += batch.num_rows
        hadm, ok = parse_ints(batch.column("hadm_id"), "hadm_id", report, required=True)
        keep = require(report, {"hadm_id": batch.column("hadm_id")}, {"hadm_id": ok})
        seq, _ = parse_ints(batch.column("seq_num"), "seq_num", report, required=False)
        code = normalize_codes(batch.column(code_column))
        has_code = pc.fill_null(pc.not_equal(code, ""), False).to_numpy(zero_copy_only=False)
        report.drop(f"null-like {code_column} (empty, NaN, NULL, NA...)", int((keep & ~has_code).sum()),
                    code_column, first_null_like(batch.column(code_column), code, keep))
        keep &= has_code
        part = {
            "hadm_id": hadm.to_numpy(zero_copy_only=False),
            "seq_num": seq.to_numpy(zero_copy_only=False),
            "order": np.arange(offset, offset + batch.num_rows),
            "code": code.to_numpy(zero_copy_only=False),
        }
        if version_column:
            version, _ = parse_ints(batch.column(version_column), version_column, report, required=False)
            part["version"] = version.to_numpy(zero_copy_only=False).astype("float64")
        parts.append(pd.DataFrame(part)[keep])
        offset += batch.num_rows
    if report.rows_read == 0:
        raise MimicError(f"{path}: empty table (header only, no data rows)")
    report.check_bad_fraction()
    df = pd.concat(parts, ignore_index=True).astype({"hadm_id": "int64", "seq_num": "float64"})
    key = ["hadm_id", "seq_num", "code"] + (["version"] if version_column else [])
    dup = duplicate_mask({k: df[k].to_numpy() for k in key})
    if dup.any():
        report.drop(f"exact duplicate rows (same {', '.join(columns)})", int(dup.sum()), "hadm_id",
                    df["hadm_id"].to_numpy()[np.flatnonzero(dup)[0]])
        df = df[~dup]
    df = _known_admissions(df, hadm_ids, report)
    # seq_num is the coded priority; rows without one go last, in file order.
    return df.sort_values(["hadm_id", "seq_num", "order"], na_position="last", kind="stable")


def load_dictionary(path: str, name: str, report: TableReport) -> pd.DataFrame:
    """D_ICD_* -> titles indexed by normalised code (first row wins on duplicates)."""
    t = read_small_table(path, name, report)
    df = pd.DataFrame({c: as_array(t[c]).to_numpy(zero_copy_only=False) for c in t.column_names})
    code = normalize_codes(t["icd9_code"])
    df["icd9_code"] = code.to_numpy(zero_copy_only=False)
    missing = (df["icd9_code"].isna() | (df["icd9_code"] == "")).to_numpy()
    report.drop("null-like icd9_code (empty, NaN, NULL, NA...)", int(missing.sum()), "icd9_code",
                first_null_like(t["icd9_code"], code))
    df = df[~missing]
    dup = df["icd9_code"].duplicated()
    report.drop("duplicated icd9_code (first kept)", int(dup.sum()), "icd9_code",
                df["icd9_code"][dup].iloc[0] if dup.any() else None)
    return df[~dup].set_index("icd9_code").fillna("")


def load_drugs(path: str, report: TableReport, hadm_ids: np.ndarray,
               block_size: int = DEFAULT_BLOCK_SIZE, start_column: str = "startdate",
               ) -> tuple[pd.DataFrame, pa.Array]:
    """PRESCRIPTIONS, streamed: the first administration of each (admission, drug), as
    (columns hadm_id, drug, start, order sorted by admission, then start, then file order;
    the drug names, indexed by the `drug` column).

    "First" is the earliest startdate, then file order; rows without a startdate go last.
    Each block is reduced to its own firsts before the next is read, so memory holds the
    distinct (admission, drug) pairs, not the 4.2M rows. Drug names become integer ids
    (one global vocabulary) so that sorting and deduplication never compare strings.
    `start_column`: MIMIC-III's startdate, MIMIC-IV's starttime."""
    vocabulary: dict[str, int] = {}
    firsts = []
    offset = 0
    for i, batch in enumerate(stream_table(path, ("hadm_id", start_column, "drug"), block_size)):
        report.rows_read += batch.num_rows
        hadm, ok = parse_ints(batch.column("hadm_id"), "hadm_id", report, required=True)
        keep = require(report, {"hadm_id": batch.column("hadm_id")}, {"hadm_id": ok})
        start, _ = parse_times(batch.column(start_column), start_column, report, required=False)
        drug = pc.utf8_trim_whitespace(batch.column("drug"))
        has_drug = pc.fill_null(pc.not_equal(drug, ""), False).to_numpy(zero_copy_only=False)
        report.drop("missing drug (empty)", int((keep & ~has_drug).sum()), "drug", "" if (keep & ~has_drug).any() else None)
        keep &= has_drug
        encoded = pc.dictionary_encode(drug)
        local_to_global = np.array([vocabulary.setdefault(d, len(vocabulary))
                                    for d in encoded.dictionary.to_pylist()] or [0], dtype=np.int64)
        local = pc.fill_null(encoded.indices, 0).to_numpy(zero_copy_only=False)
        block = {
            "hadm_id": pc.fill_null(hadm, 0).to_numpy(zero_copy_only=False)[keep],
            "drug": local_to_global[local][keep],
            "start": _seconds(start)[keep],
            "order": np.arange(offset, offset + batch.num_rows)[keep],
        }
        firsts.append(_first_per_drug(block))
        offset += batch.num_rows
        if i and i % 10 == 0:
            log.info("PRESCRIPTIONS: %d rows read", offset)
    if report.rows_read == 0:
        raise MimicError(f"{path}: empty table (header only, no data rows)")
    report.check_bad_fraction()
    merged = _first_per_drug({k: np.concatenate([f[k] for f in firsts]) for k in firsts[0]})
    df = _known_admissions(pd.DataFrame(merged), hadm_ids, report)
    start = df["start"].to_numpy()
    df = df.iloc[np.lexsort((df["order"].to_numpy(), np.where(np.isnan(start), np.inf, start),
                             df["hadm_id"].to_numpy()))]
    # Names stay integer ids until the list column is built (no millions of Python strings).
    return df.reset_index(drop=True), pa.array(list(vocabulary), pa.string())


def _first_per_drug(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep each (hadm_id, drug)'s row with the smallest (start, file order), NaN start last.

    `cols` must be in file order (as read, or as returned here: the kept rows stay in file
    order, so block results can be concatenated and reduced again)."""
    start = np.where(np.isnan(cols["start"]), np.inf, cols["start"])
    hadm, drug = cols["hadm_id"], cols["drug"]
    if len(hadm) and (hadm.max() >= 2**39 or drug.max() >= 2**24):
        key = np.unique(np.stack([hadm, drug], axis=1), axis=0, return_inverse=True)[1].ravel()
    else:
        key = (hadm << 24) | drug  # one integer per (admission, drug): far faster to sort
    # Two stable one-key sorts instead of a lexsort: by start (ties keep file order), then by key.
    by_start = np.argsort(start, kind="stable")
    by = by_start[np.argsort(key[by_start], kind="stable")]
    sorted_key = key[by]
    first = np.ones(len(by), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    keep = np.sort(by[first])
    return {name: values[keep] for name, values in cols.items()}


def _known_admissions(df: pd.DataFrame, hadm_ids: np.ndarray, report: TableReport) -> pd.DataFrame:
    known = np.isin(df["hadm_id"].to_numpy(), hadm_ids)
    report.drop("hadm_id not among the admissions (absent or dropped there)", int((~known).sum()), "hadm_id",
                df["hadm_id"].to_numpy()[~known][0] if (~known).any() else None)
    return df[known]


def _seconds(ts: pa.Array) -> np.ndarray:
    """timestamp[s] -> float seconds with NaN for null (pandas datetimes overflow at year 2262,
    and MIMIC dates run to 2210 with shifted birth dates near 1800; plain numbers are safe)."""
    return pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False).astype("float64")


def _timestamps(seconds: np.ndarray) -> pa.Array:
    """Inverse of `_seconds`: float seconds (NaN = null) -> timestamp[s]."""
    ints = pa.array(seconds, pa.float64(), from_pandas=True).cast(pa.int64())
    return ints.view(pa.timestamp("s"))


# --- assembling visits ----------------------------------------------------------------------

def _lists_per_admission(hadm_ids: np.ndarray, events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, gather index) that group `events` (sorted by hadm_id) per admission in
    `hadm_ids` order: admission k's items are events.iloc[index[offsets[k]:offsets[k+1]]]."""
    keys = events["hadm_id"].to_numpy()
    starts = np.searchsorted(keys, hadm_ids, side="left")
    ends = np.searchsorted(keys, hadm_ids, side="right")
    lengths = ends - starts
    offsets = np.zeros(len(hadm_ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, index


def _list_array(offsets: np.ndarray, values) -> pa.ListArray:
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _multi_hot(offsets: np.ndarray, codes: np.ndarray,
               table: dict[str, tuple[int, ...]] | None = None) -> pa.FixedSizeListArray:
    """Per admission, the 25 phenotypes of its codes under `table` (default: ICD-9 CCS)."""
    table = code_to_phenotype_table() if table is None else table
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    # Look each distinct code up once (thousands), not each of the ~1M code rows.
    code_index, distinct = pd.factorize(pd.Series(codes, dtype=object))
    hot_of_code = np.zeros((len(distinct) + 1, NUM_PHENOTYPES), dtype=bool)  # last row: no code
    for k, code in enumerate(distinct):
        hot_of_code[k, list(table.get(code, ()))] = True
    hot = hot_of_code[code_index]  # factorize gives -1 for null: the all-false last row
    mat = np.zeros((len(offsets) - 1, NUM_PHENOTYPES), dtype=np.int8)
    for j in range(NUM_PHENOTYPES):
        mat[rows[hot[:, j]], j] = 1
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel(), pa.int8()), NUM_PHENOTYPES)


def _titles(codes: np.ndarray, dictionary: pd.DataFrame, columns: tuple[str, ...]) -> np.ndarray:
    """Title of each code: the first non-empty of `columns`, else the code itself.

    MIMIC's dictionaries miss a few codes (45 of the demo's 1,761 diagnoses). An empty title
    would make every renderer drop the diagnosis from the text; the code keeps it, and is
    what Serve renders for a code it has no title for, so all texts agree."""
    pos = dictionary.index.get_indexer(codes)
    known = pos >= 0
    out = np.array(codes, dtype=object)
    for column in reversed(columns):  # the first column wins: it is applied last
        titles = dictionary[column].to_numpy(dtype=object)[np.maximum(pos, 0)] if len(dictionary) else out
        usable = known & (titles != "")
        out = np.where(usable, titles, out)
    return out.astype(object)


def checked_ages(age: np.ndarray, adm: pd.DataFrame, report: TableReport, column: str) -> np.ndarray:
    """Ages at admission in [0, AGE_CAP]: a negative age (admitted before birth) is set to
    null and counted as a repair; older than AGE_CAP is capped and counted as a note (both
    releases shift or cap the ages of patients over 89 on purpose)."""
    negative = age < 0
    if negative.any():
        report.repair(f"age below 0 at admission ({column} after admittime): set to null", int(negative.sum()),
                      column, f"hadm_id {adm['hadm_id'].to_numpy()[np.flatnonzero(negative)[0]]}")
    report.note(f"ages over {AGE_CAP - 1:g} at admission capped at {AGE_CAP:g}", int((age > AGE_CAP - 1).sum()))
    return np.where(negative, np.nan, np.minimum(age, AGE_CAP)).astype("float32")


def _demographics(adm: pd.DataFrame, patients: pd.DataFrame, report: TableReport,
                  ) -> tuple[np.ndarray, list, int]:
    """(age at admission, gender, admissions without a PATIENTS row) per admission."""
    pos = pd.Index(patients["subject_id"]).get_indexer(adm["subject_id"])
    known = pos >= 0
    dob = np.where(known, patients["dob"].to_numpy()[np.maximum(pos, 0)], np.nan)
    genders = patients["gender"].to_numpy(dtype=object)
    gender = [genders[p] if p >= 0 else None for p in pos]
    age = checked_ages((adm["admittime"].to_numpy() - dob) / SECONDS_PER_YEAR, adm, report, "dob")
    return age, gender, int((~known).sum())


def assemble_visits(adm: pd.DataFrame, age: np.ndarray, gender: list, dx: pd.DataFrame, px: pd.DataFrame,
                    dx_dict: pd.DataFrame, px_dict: pd.DataFrame, drugs: pd.DataFrame,
                    drug_names: pa.Array, phenotype_keys: np.ndarray | None = None,
                    phenotype_table: dict | None = None) -> pa.Table:
    """The VISITS rows (not yet schema-checked) of `adm` (sorted by subject, admittime) from
    its loaded event tables; `age`/`gender` per admission.

    `dx`/`px` hold (hadm_id, code) sorted by admission and coded order; `dx_dict`/`px_dict`
    are titles indexed by code with long_title and short_title columns. Phenotypes are
    looked up per diagnosis row by `phenotype_keys` in `phenotype_table` (default: the codes
    themselves in the ICD-9 CCS map)."""
    hadm_ids = adm["hadm_id"].to_numpy()
    dx_off, dx_idx = _lists_per_admission(hadm_ids, dx)
    dx_codes = dx["code"].to_numpy(dtype=object)[dx_idx]
    px_off, px_idx = _lists_per_admission(hadm_ids, px)
    px_codes = px["code"].to_numpy(dtype=object)[px_idx]
    rx_off, rx_idx = _lists_per_admission(hadm_ids, drugs)
    keys = dx_codes if phenotype_keys is None else np.asarray(phenotype_keys, dtype=object)[dx_idx]
    return pa.table({
        "subject_id": pa.array(adm["subject_id"].to_numpy(), pa.int64()),
        "hadm_id": pa.array(hadm_ids, pa.int64()),
        "admittime": _timestamps(adm["admittime"].to_numpy()),
        "dischtime": _timestamps(adm["dischtime"].to_numpy()),
        "gender": pa.array(gender, pa.string()),
        "age": pa.array(age, pa.float32(), from_pandas=True),
        "diagnosis_codes": _list_array(dx_off, dx_codes),
        "diagnosis_titles": _list_array(dx_off, _titles(dx_codes, dx_dict, ("long_title", "short_title"))),
        "diagnosis_short_titles": _list_array(dx_off, _titles(dx_codes, dx_dict, ("short_title", "long_title"))),
        "procedure_codes": _list_array(px_off, px_codes),
        "procedure_titles": _list_array(px_off, _titles(px_codes, px_dict, ("short_title",))),
        "drugs": _list_array(rx_off, drug_names.take(drugs["drug"].to_numpy()[rx_idx])),
        "phenotypes": _multi_hot(dx_off, keys, phenotype_table),
    })


def load_visits(mimic_dir: str, block_size: int = DEFAULT_BLOCK_SIZE, rules: Rules | None = None,
                ) -> tuple[pa.Table, dict]:
    """Read the seven tables in `mimic_dir`; return (VISITS table, load report dict)."""
    rules = rules or Rules()
    paths, forms = {}, {}
    for name in TABLES:
        paths[name], forms[name] = find_table(mimic_dir, name)
    reports = {name: TableReport(file=paths[name], rules=rules) for name in TABLES}

    adm = load_admissions(paths["ADMISSIONS"], reports["ADMISSIONS"])
    log.info("ADMISSIONS: %d admissions of %d patients", len(adm), adm["subject_id"].nunique())
    patients = load_patients(paths["PATIENTS"], reports["PATIENTS"])
    hadm_ids = adm["hadm_id"].to_numpy()
    sorted_ids = np.sort(hadm_ids)
    dx = load_coded_events(paths["DIAGNOSES_ICD"], "DIAGNOSES_ICD", reports["DIAGNOSES_ICD"], sorted_ids)
    px = load_coded_events(paths["PROCEDURES_ICD"], "PROCEDURES_ICD", reports["PROCEDURES_ICD"], sorted_ids)
    dx_dict = load_dictionary(paths["D_ICD_DIAGNOSES"], "D_ICD_DIAGNOSES", reports["D_ICD_DIAGNOSES"])
    px_dict = load_dictionary(paths["D_ICD_PROCEDURES"], "D_ICD_PROCEDURES", reports["D_ICD_PROCEDURES"])
    for events, dictionary, name in ((dx, dx_dict, "DIAGNOSES_ICD"), (px, px_dict, "PROCEDURES_ICD")):
        check_leading_zeros(events["code"].to_numpy(), dictionary.index, paths[name],
                            paths[DICTIONARY_OF[name]], "icd9_code")
    drugs, drug_names = load_drugs(paths["PRESCRIPTIONS"], reports["PRESCRIPTIONS"], sorted_ids, block_size)
    log.info("events: %d diagnoses, %d procedures, %d distinct (admission, drug)", len(dx), len(px), len(drugs))

    age, gender, without_patient = _demographics(adm, patients, reports["PATIENTS"])
    table = assemble_visits(adm, age, gender, dx=dx, px=px, dx_dict=dx_dict, px_dict=px_dict,
                            drugs=drugs, drug_names=drug_names)
    report = {
        "mimic_dir": mimic_dir,
        "forms": forms,
        "tables": {name: r.as_dict() for name, r in reports.items()},
        "repairs": repairs(reports),
        "admissions": table.num_rows,
        "patients": int(adm["subject_id"].nunique()),
        "admissions_without_patient_row": without_patient,
        **coding_counts(adm, dx, px, dx_dict, px_dict),
    }
    return check_schema(table, VISITS, f"{mimic_dir} -> visits"), report


def coding_counts(adm: pd.DataFrame, dx: pd.DataFrame, px: pd.DataFrame,
                  dx_dict: pd.DataFrame, px_dict: pd.DataFrame) -> dict:
    """Report counts: admissions without any diagnosis, code rows without a title."""
    return {
        "admissions_without_diagnoses": int((~np.isin(adm["hadm_id"].to_numpy(), dx["hadm_id"].to_numpy())).sum()),
        "diagnosis_codes_without_title": int((dx_dict.index.get_indexer(dx["code"]) < 0).sum()),
        "procedure_codes_without_title": int((px_dict.index.get_indexer(px["code"]) < 0).sum()),
    }
