"""Turn a simulated `Cohort` into the seven MIMIC-III tables and write them as CSV.

Columns are exactly those of the MIMIC-III v1.4 tables (checked in tests against the demo
in shared/mimic3_demo). Two forms:
- demo: `TABLE.csv`, lowercase header, values quoted only where needed (like the demo);
- full: `TABLE.csv.gz`, UPPERCASE header, every header name and every string value quoted,
  numbers and timestamps bare, like the credentialed release (`1297,109,172335,1,"40301"`).
Timestamps are `YYYY-MM-DD HH:MM:SS`. Writes are streamed in chunks (PRESCRIPTIONS has
millions of rows) to a temporary name and then renamed. gzip is written with mtime 0 so
the same seed gives the same bytes.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ckd_ehr.data.synth import catalog as cat
from ckd_ehr.phenotypes import phenotypes
from ckd_ehr.storage import atomic_output_stream, join
from ckd_ehr.data.synth.model import DAY, PATIENT_CATEGORIES, Cohort

log = logging.getLogger("ckd_ehr.data.synth.cohort")

COLUMNS = {
    "ADMISSIONS": ("row_id", "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                   "admission_location", "discharge_location", "insurance", "language", "religion",
                   "marital_status", "ethnicity", "edregtime", "edouttime", "diagnosis", "hospital_expire_flag",
                   "has_chartevents_data"),
    "PATIENTS": ("row_id", "subject_id", "gender", "dob", "dod", "dod_hosp", "dod_ssn", "expire_flag"),
    "DIAGNOSES_ICD": ("row_id", "subject_id", "hadm_id", "seq_num", "icd9_code"),
    "PROCEDURES_ICD": ("row_id", "subject_id", "hadm_id", "seq_num", "icd9_code"),
    "PRESCRIPTIONS": ("row_id", "subject_id", "hadm_id", "icustay_id", "startdate", "enddate", "drug_type", "drug",
                      "drug_name_poe", "drug_name_generic", "formulary_drug_cd", "gsn", "ndc", "prod_strength",
                      "dose_val_rx", "dose_unit_rx", "form_val_disp", "form_unit_disp", "route"),
    "D_ICD_DIAGNOSES": ("row_id", "icd9_code", "short_title", "long_title"),
    "D_ICD_PROCEDURES": ("row_id", "icd9_code", "short_title", "long_title"),
}
TABLES = tuple(COLUMNS)
CHUNK_ROWS = 500_000
GZIP_LEVEL = 6  # zlib's default: the best speed/size trade-off for multi-million-row tables
_NEEDS_QUOTES = r'[,"\r\n]'


def file_name(table: str, form: str) -> str:
    return f"{table}.csv" if form == "demo" else f"{table}.csv.gz"


# --- small helpers ---------------------------------------------------------------------------

def _ts(seconds: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    return pa.array(seconds.astype(np.int64), type=pa.timestamp("s"), mask=null)


def _int(values: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    return pa.array(values.astype(np.int64), type=pa.int64(), mask=null)


def _take(vocabulary: list, index: np.ndarray) -> pa.Array:
    """Strings `vocabulary[index]`; None entries of the vocabulary become nulls."""
    return pa.array(vocabulary, type=pa.string()).take(pa.array(index, type=pa.int64()))


def _pick(rng: np.random.Generator, values: tuple, weights: tuple, size: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return rng.choice(len(values), size, p=w / w.sum())


def _detail_rng(seed: int, part: int) -> np.random.Generator:
    """Streams for table details, apart from the model's (which use spawn keys 0-5)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(100 + part,)))


# --- table builders: each yields one or more pa.Tables with the table's columns -------------

def patients_table(co: Cohort) -> Iterator[pa.Table]:
    n = len(co.subject_id)
    dod_null = co.dod_mask
    yield pa.table({
        "row_id": _int(np.arange(1, n + 1)),
        "subject_id": _int(co.subject_id),
        "gender": _take(["F", "M"], co.gender_male.astype(np.int64)),
        "dob": _ts(co.dob),
        "dod": _ts(co.dod, dod_null),
        "dod_hosp": _ts(co.dod, ~co.died_in_hospital),
        "dod_ssn": _ts(co.dod, dod_null | ~co.dod_ssn_known),
        "expire_flag": _int(~dod_null),
    })


ADMISSION_TYPES = (("EMERGENCY", "ELECTIVE", "URGENT"), (0.80, 0.15, 0.05))
EMERGENCY_LOCATIONS = (("EMERGENCY ROOM ADMIT", "TRANSFER FROM HOSP/EXTRAM", "CLINIC REFERRAL/PREMATURE",
                        "TRANSFER FROM SKILLED NUR"), (0.70, 0.18, 0.10, 0.02))
DISCHARGE_LOCATIONS = (("HOME", "HOME HEALTH CARE", "SNF", "REHAB/DISTINCT PART HOSP", "LONG TERM CARE HOSPITAL",
                        "ICF"), (0.32, 0.28, 0.22, 0.12, 0.04, 0.02))
INSURANCE = ("Medicare", "Private", "Medicaid", "Government", "Self Pay")
INSURANCE_OVER_65 = (0.85, 0.10, 0.05, 0.0, 0.0)
INSURANCE_UNDER_65 = (0.12, 0.60, 0.20, 0.05, 0.03)


def admissions_table(co: Cohort, seed: int) -> Iterator[pa.Table]:
    rng = _detail_rng(seed, 0)
    a = len(co.hadm_id)
    pat = co.adm_patient
    adm_type = _pick(rng, *ADMISSION_TYPES, a)
    emergency = adm_type == 0
    loc_values = EMERGENCY_LOCATIONS[0] + ("PHYS REFERRAL/NORMAL DELI",)
    location = np.where(emergency, _pick(rng, *EMERGENCY_LOCATIONS, a),
                        np.where(adm_type == 1, len(loc_values) - 1, 1))
    disch_values = DISCHARGE_LOCATIONS[0] + ("DEAD/EXPIRED",)
    discharge = np.where(co.expire, len(disch_values) - 1, _pick(rng, *DISCHARGE_LOCATIONS, a))
    over_65 = co.age_at_admission >= 65
    insurance = np.where(over_65, _pick(rng, INSURANCE, INSURANCE_OVER_65, a),
                         _pick(rng, INSURANCE, INSURANCE_UNDER_65, a))
    has_ed = emergency & (rng.random(a) < 0.9)
    edreg = co.admittime - (rng.uniform(1.0, 8.0, a) * 3600).astype(np.int64) // 60 * 60
    edout = co.admittime + (rng.uniform(0.0, 2.0, a) * 3600).astype(np.int64) // 60 * 60
    # Admission diagnosis: the reason of one recorded acute phenotype, else a symptom.
    kinds = np.array([p.kind == "acute" for p in phenotypes()])
    score = co.recorded_state * (kinds + rng.random(co.recorded_state.shape))
    lead = score.argmax(axis=1)
    reasons = list(cat.ADMIT_REASON) + list(cat.ADMIT_REASON_OTHER)
    reason = np.where(co.recorded_state.any(axis=1), lead,
                      len(cat.ADMIT_REASON) + rng.integers(0, len(cat.ADMIT_REASON_OTHER), a))
    cols = {
        "row_id": _int(np.arange(1, a + 1)),
        "subject_id": _int(co.subject_id[pat]),
        "hadm_id": _int(co.hadm_id),
        "admittime": _ts(co.admittime),
        "dischtime": _ts(co.dischtime),
        "deathtime": _ts(co.dischtime, ~co.expire),
        "admission_type": _take(list(ADMISSION_TYPES[0]), adm_type),
        "admission_location": _take(list(loc_values), location),
        "discharge_location": _take(list(disch_values), discharge),
        "insurance": _take(list(INSURANCE), insurance),
    }
    for name in ("language", "religion", "marital_status", "ethnicity"):
        cols[name] = _take(list(PATIENT_CATEGORIES[name][0]), co.patient_attrs[name][pat])
    cols.update({
        "edregtime": _ts(edreg, ~has_ed),
        "edouttime": _ts(edout, ~has_ed),
        "diagnosis": _take(reasons, reason),
        "hospital_expire_flag": _int(co.expire),
        "has_chartevents_data": _int(rng.random(a) < 0.97),
    })
    yield pa.table(cols)


def _icd_events(co: Cohort, adm: np.ndarray, code: np.ndarray, seq: np.ndarray, codes: list[str]) -> Iterator[pa.Table]:
    yield pa.table({
        "row_id": _int(np.arange(1, len(adm) + 1)),
        "subject_id": _int(co.subject_id[co.adm_patient[adm]]),
        "hadm_id": _int(co.hadm_id[adm]),
        "seq_num": _int(seq),
        "icd9_code": _take(codes, code),
    })


def diagnoses_table(co: Cohort) -> Iterator[pa.Table]:
    return _icd_events(co, co.dx_adm, co.dx_code, co.dx_seq, co.vocab.codes)


def procedures_table(co: Cohort) -> Iterator[pa.Table]:
    return _icd_events(co, co.px_adm, co.px_code, co.px_seq, [p[0] for p in cat.PROCEDURES])


def d_icd_diagnoses_table(co: Cohort) -> Iterator[pa.Table]:
    v = co.vocab
    order = np.argsort(np.array(v.codes), kind="stable")
    yield pa.table({
        "row_id": _int(np.arange(1, len(order) + 1)),
        "icd9_code": _take(v.codes, order),
        "short_title": _take(v.short_titles, order),
        "long_title": _take(v.long_titles, order),
    })


def d_icd_procedures_table(co: Cohort) -> Iterator[pa.Table]:
    rows = sorted(cat.PROCEDURES)
    yield pa.table({
        "row_id": _int(np.arange(1, len(rows) + 1)),
        "icd9_code": pa.array([r[0] for r in rows], pa.string()),
        "short_title": pa.array([r[1] for r in rows], pa.string()),
        "long_title": pa.array([r[2] for r in rows], pa.string()),
    })


def prescriptions_table(co: Cohort, seed: int) -> Iterator[pa.Table]:
    """Rows of PRESCRIPTIONS in chunks: each distinct (admission, drug) repeated as many
    times as it was ordered, on days within the stay, ordered by admission and start date."""
    rng = _detail_rng(seed, 1)
    pair = np.repeat(np.arange(len(co.rx_pair_adm)), co.rx_pair_repeats)
    adm = co.rx_pair_adm[pair]
    admit_day = co.admittime - co.admittime % DAY
    stay_days = np.ceil(co.los_days).astype(np.int64)
    start = admit_day[adm] + (rng.random(len(pair)) * stay_days[adm]).astype(np.int64) * DAY
    end = start + (1 + rng.poisson(0.7, len(pair))) * DAY
    tie = rng.random(len(co.rx_pair_adm))[pair]  # keeps one drug's orders of a day together
    order = np.lexsort((tie, start, adm))
    pair, adm, start, end = pair[order], adm[order], start[order], end[order]
    del order, tie

    drugs = co.drugs
    base = np.array([d.drug_type == "BASE" for d in drugs])
    codes = [cat.drug_codes(d.name) for d in drugs]
    catalogue = {
        "drug_type": [d.drug_type for d in drugs],
        "drug": [d.name for d in drugs],
        "drug_name_poe": [None if b else d.name for d, b in zip(drugs, base)],
        "drug_name_generic": [None if b else d.name for d, b in zip(drugs, base)],
        "formulary_drug_cd": [c[0] for c in codes],
        "gsn": [None if b else c[1] for c, b in zip(codes, base)],
        "ndc": [c[2] for c in codes],
        "prod_strength": [d.prod_strength for d in drugs],
        "dose_val_rx": [d.dose_val_rx for d in drugs],
        "dose_unit_rx": [d.dose_unit_rx for d in drugs],
        "form_val_disp": [d.form_val_disp for d in drugs],
        "form_unit_disp": [d.form_unit_disp for d in drugs],
        "route": [d.route for d in drugs],
    }
    dictionaries = {k: pa.array(v, pa.string()) for k, v in catalogue.items()}
    for lo in range(0, max(len(pair), 1), CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, len(pair))
        a = adm[lo:hi]
        drug = pa.array(co.rx_pair_drug[pair[lo:hi]], pa.int64())
        cols = {
            "row_id": _int(np.arange(lo + 1, hi + 1)),
            "subject_id": _int(co.subject_id[co.adm_patient[a]]),
            "hadm_id": _int(co.hadm_id[a]),
            "icustay_id": pa.nulls(hi - lo, pa.int64()),  # no ICUSTAYS table is generated
            "startdate": _ts(start[lo:hi]),
            "enddate": _ts(end[lo:hi]),
        }
        cols.update({k: d.take(drug) for k, d in dictionaries.items()})
        yield pa.table(cols)


# --- CSV writing -------------------------------------------------------------------------------

def _needs_python_csv(table: pa.Table) -> bool:
    """True if any string value holds a comma, quote or newline (arrow's unquoted mode
    refuses those; the demo form quotes only such values)."""
    for col in table.columns:
        if pa.types.is_string(col.type) and pc.any(pc.match_substring_regex(col, _NEEDS_QUOTES)).as_py():
            return True
    return False


def _demo_chunk(table: pa.Table) -> bytes:
    if not _needs_python_csv(table):
        buf = pa.BufferOutputStream()
        pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        return buf.getvalue().to_pybytes()
    # Minimal quoting like the demo. Every value rendered by arrow's own cast, so numbers
    # and timestamps look exactly as in the arrow path.
    cols = [pc.fill_null(pc.cast(c, pa.string()), "").to_pylist() for c in table.columns]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(zip(*cols))
    return out.getvalue().encode()


def _full_chunk(table: pa.Table, header: bool) -> bytes:
    buf = pa.BufferOutputStream()
    # "needed" quotes every string value (and the header) and leaves numbers and timestamps bare.
    pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=header, quoting_style="needed"))
    return buf.getvalue().to_pybytes()


def write_table(chunks: Iterable[pa.Table], out_dir: str, table: str, form: str) -> int:
    """Write one table atomically (storage.atomic_output_stream); return its row count."""
    columns = COLUMNS[table]
    rows = 0
    with atomic_output_stream(join(out_dir, file_name(table, form))) as raw:
        if form == "demo":
            raw.write((",".join(columns) + "\n").encode())
            for chunk in chunks:
                raw.write(_demo_chunk(chunk.select(list(columns))))
                rows += chunk.num_rows
        else:
            upper = [c.upper() for c in columns]
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0, filename="") as gz:
                for i, chunk in enumerate(chunks):
                    gz.write(_full_chunk(chunk.select(list(columns)).rename_columns(upper), header=i == 0))
                    rows += chunk.num_rows
    log.info("wrote %s: %d rows", file_name(table, form), rows)
    return rows
