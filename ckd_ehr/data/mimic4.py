"""MIMIC-IV loader (v2.2 / v3.x): seven `hosp/` tables -> one row per admission (contracts.VISITS).

Reads hosp/admissions, patients, diagnoses_icd, procedures_icd, prescriptions,
d_icd_diagnoses and d_icd_procedures (`.csv.gz` as released, or `.csv`), streamed block by
block with the MIMIC-III loader's machinery (`ckd_ehr.data.mimic`: same parsing, same load
report, same `MimicError` naming file, column and value). What differs from MIMIC-III:

- codes carry `icd_version` (9 before October 2015, 10 after). In VISITS, ICD-9-CM codes are
  stored as in MIMIC-III (no dots) and ICD-10-CM diagnosis codes in their written form with a
  dot after the third character ('I50.23'), so the two versions never share a string (ICD-9
  'E8889' is a fall, ICD-10 'E88.89' a metabolic disorder). ICD-9 and ICD-10-PCS procedure
  codes (3-4 digits vs 7 characters) are stored as given;
- ICD-10-CM diagnoses reach the 25 phenotypes through an offline crosswalk (`ckd_ehr.data.icd10`,
  `data.icd10_crosswalk`); ICD-9-CM ones through the benchmark's CCS definitions as before;
- titles come from d_icd_* by (code, version); MIMIC-IV has only long titles, so the short
  title columns carry the long title;
- there is no date of birth: age at admission = anchor_age + (year of admittime -
  anchor_year), capped at 90 like MIMIC-III (MIMIC-IV's anchor_age stops at 91);
- `data.icd_versions` keeps only admissions coded in the given versions (an admission's
  version is that of its diagnoses, else of its procedures; one with neither is kept);
  pairs then join the remaining consecutive admissions of a patient.

Rows with an unparseable or unknown icd_version are dropped and counted like any other bad
value. The load report adds `release`, the crosswalk used and an `icd` section
(`mimic4_report.icd_report`): admissions per version, the ICD-10 codes' mapping routes and the
unmapped ones, and per phenotype the prevalence under ICD-9 vs ICD-10 admissions within each
anchor_year_group.
"""
from __future__ import annotations

import logging
import posixpath

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.fs as pafs

import ckd_ehr.data.mimic as mimic
from ckd_ehr.contracts import VISITS, check_schema
from ckd_ehr.data.icd10 import dotted_icd10, load_crosswalk
from ckd_ehr.data.csv_tables import DEFAULT_BLOCK_SIZE, TableNotFound, find_table, read_header
from ckd_ehr.data.mimic import (MimicError, TableReport, checked_ages, gender_values, load_admissions,
                                load_coded_events, load_drugs, parse_ints, read_small_table, require)
from ckd_ehr.data.rules import Rules, as_array, check_leading_zeros, drop_exact_duplicates, first_null_like, repairs
from ckd_ehr.data.mimic4_report import MIXED, NONE, VERSION_LABELS, VERSIONS, icd10_mapping, icd_report
from ckd_ehr.phenotypes import code_to_phenotype_table
from ckd_ehr.storage import resolve

log = logging.getLogger(__name__)

TABLE_COLUMNS = {
    "admissions": ("subject_id", "hadm_id", "admittime", "dischtime"),
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group"),
    "diagnoses_icd": ("hadm_id", "seq_num", "icd_code", "icd_version"),
    "procedures_icd": ("hadm_id", "seq_num", "icd_code", "icd_version"),
    "prescriptions": ("hadm_id", "starttime", "drug"),
    "d_icd_diagnoses": ("icd_code", "icd_version", "long_title"),
    "d_icd_procedures": ("icd_code", "icd_version", "long_title"),
}
TABLES = tuple(TABLE_COLUMNS)


# --- where the tables are -------------------------------------------------------------------

def hosp_dir(mimic_dir: str) -> str | None:
    """`mimic_dir/hosp` when it is a directory (the MIMIC-IV release layout), else None."""
    fs, inner = resolve(mimic_dir)
    if fs.get_file_info(posixpath.join(inner, "hosp")).type == pafs.FileType.Directory:
        return mimic_dir.rstrip("/") + "/hosp"
    return None


def detect_release(mimic_dir: str) -> str:
    """'mimic4' if `mimic_dir` has a hosp/ directory or its diagnoses table has icd_version
    (a hosp/ directory given directly), else 'mimic3'."""
    if hosp_dir(mimic_dir):
        try:
            find_table(mimic_dir, "admissions")
        except TableNotFound:
            return "mimic4"
        raise MimicError(f"{mimic_dir}: has both MIMIC-III tables and a MIMIC-IV hosp/ directory; "
                         f"set data.release to mimic3 or mimic4")
    try:
        path, _ = find_table(mimic_dir, "diagnoses_icd")
    except TableNotFound:
        return "mimic3"  # the MIMIC-III loader names what is missing
    return "mimic4" if "icd_version" in {h.strip().lower() for h in read_header(path)} else "mimic3"


def tables_dir(mimic_dir: str) -> str:
    return hosp_dir(mimic_dir) or mimic_dir


# --- tables ---------------------------------------------------------------------------------

def load_patients(path: str, report: TableReport) -> pd.DataFrame:
    t = drop_exact_duplicates(read_small_table(path, "patients", report, TABLE_COLUMNS["patients"]),
                              report, "subject_id")
    subject, keep = parse_ints(t["subject_id"], "subject_id", report, required=True)
    keep = require(report, {"subject_id": t["subject_id"]}, {"subject_id": keep})
    anchor_age, _ = parse_ints(t["anchor_age"], "anchor_age", report, required=False)
    anchor_year, _ = parse_ints(t["anchor_year"], "anchor_year", report, required=False)
    report.check_bad_fraction()
    group = pc.utf8_trim_whitespace(as_array(t["anchor_year_group"])).to_pylist()
    df = pd.DataFrame({
        "subject_id": subject.to_numpy(zero_copy_only=False),
        "gender": gender_values(t["gender"], report),
        "anchor_age": anchor_age.to_numpy(zero_copy_only=False).astype("float64"),
        "anchor_year": anchor_year.to_numpy(zero_copy_only=False).astype("float64"),
        "anchor_year_group": pd.array(group, dtype=object),
    })[keep].astype({"subject_id": "int64"})
    mimic._check_unique(df["subject_id"].to_numpy(), path, "subject_id")
    return df.reset_index(drop=True)


def _known_versions(df: pd.DataFrame, report: TableReport) -> pd.DataFrame:
    """Drop rows whose icd_version is missing, unparseable or not 9/10 (counted)."""
    version = df["version"].to_numpy()
    unknown = ~np.isin(version, VERSIONS)
    bad = unknown & ~np.isnan(version)
    if bad.any():
        report.unparseable["icd_version"] = report.unparseable.get("icd_version", 0) + int(bad.sum())
        report.examples.setdefault("icd_version", []).extend(
            str(int(v)) for v in np.unique(version[bad])[:mimic.EXAMPLES_KEPT])
    report.drop("icd_version missing or not 9/10", int(unknown.sum()), "icd_version",
                (report.examples.get("icd_version") or [""])[0] if unknown.any() else None)
    report.check_bad_fraction()
    return df[~unknown].astype({"version": "int8"})


def written_codes(codes: np.ndarray, versions: np.ndarray, diagnoses: bool) -> np.ndarray:
    """The code strings VISITS stores: ICD-10-CM diagnoses dotted, everything else as given."""
    out = np.asarray(codes, dtype=object).copy()
    if diagnoses:
        ten = np.asarray(versions) == 10
        out[ten] = [dotted_icd10(c) for c in out[ten]]
    return out


def load_events(path: str, name: str, report: TableReport, hadm_ids: np.ndarray) -> pd.DataFrame:
    """diagnoses_icd / procedures_icd -> (hadm_id, code as written in VISITS, version, raw code)."""
    df = load_coded_events(path, name, report, hadm_ids, code_column="icd_code", version_column="icd_version")
    df = _known_versions(df, report)
    df["raw"] = df["code"]
    df["code"] = written_codes(df["raw"].to_numpy(), df["version"].to_numpy(), name == "diagnoses_icd")
    return df


def load_dictionary(path: str, name: str, report: TableReport) -> pd.DataFrame:
    """d_icd_* -> long_title (and short_title = long_title) indexed by the code as VISITS writes it."""
    t = read_small_table(path, name, report, TABLE_COLUMNS[name])
    version, _ = parse_ints(t["icd_version"], "icd_version", report, required=False)
    code = mimic.normalize_codes(t["icd_code"])
    df = pd.DataFrame({
        "code": code.to_numpy(zero_copy_only=False),
        "version": version.to_numpy(zero_copy_only=False).astype("float64"),
        "long_title": as_array(t["long_title"]).to_numpy(zero_copy_only=False),
    })
    missing = (df["code"].isna() | (df["code"] == "")).to_numpy()
    report.drop("null-like icd_code (empty, NaN, NULL, NA...)", int(missing.sum()), "icd_code",
                first_null_like(t["icd_code"], code))
    df = _known_versions(df[~missing], report)
    df["code"] = written_codes(df["code"].to_numpy(), df["version"].to_numpy(), name == "d_icd_diagnoses")
    same = df.duplicated(["code", "version"]).to_numpy()
    report.drop("duplicated (icd_code, icd_version) (first kept)", int(same.sum()), "icd_code",
                df["code"][same].iloc[0] if same.any() else None)
    df = df[~same]
    # A 3-character code of both versions is written alike in VISITS (ICD-9 'V51' and ICD-10
    # 'V51'); the release lists both, so this is no defect of the file: counted, first kept.
    dup = df["code"].duplicated()
    report.note("codes of both ICD versions written alike (the first listed title kept)", int(dup.sum()))
    df = df[~dup].set_index("code")[["long_title"]].fillna("")
    df["short_title"] = df["long_title"]
    return df


def admission_versions(hadm_ids: np.ndarray, dx: pd.DataFrame, px: pd.DataFrame) -> np.ndarray:
    """Per admission: 9 or 10 (all its diagnoses in that version; if it has none, all its
    procedures), MIXED (both), NONE (no code at all)."""
    out = np.full(len(hadm_ids), NONE, dtype=np.int16)
    for events in (px, dx):  # diagnoses last: they win
        if events.empty:
            continue
        per = events.groupby("hadm_id")["version"].agg(["min", "max"])
        pos = pd.Index(per.index).get_indexer(hadm_ids)
        has = pos >= 0
        lo = per["min"].to_numpy()[np.maximum(pos, 0)]
        hi = per["max"].to_numpy()[np.maximum(pos, 0)]
        out[has] = np.where(lo[has] == hi[has], lo[has], MIXED)
    return out


def _demographics(adm: pd.DataFrame, patients: pd.DataFrame, report: TableReport,
                  ) -> tuple[np.ndarray, list, int, np.ndarray]:
    """(age at admission, gender, admissions without a patients row, anchor_year_group)."""
    pos = pd.Index(patients["subject_id"]).get_indexer(adm["subject_id"])
    known = pos >= 0
    p = np.maximum(pos, 0)
    admit_year = adm["admittime"].to_numpy().astype("int64").astype("datetime64[s]").astype("datetime64[Y]")
    admit_year = admit_year.astype("int64") + 1970
    age = patients["anchor_age"].to_numpy()[p] + (admit_year - patients["anchor_year"].to_numpy()[p])
    age = checked_ages(np.where(known, age, np.nan), adm, report, "anchor_age")
    genders = patients["gender"].to_numpy(dtype=object)
    groups = patients["anchor_year_group"].to_numpy(dtype=object)
    gender = [genders[i] if i >= 0 else None for i in pos]
    group = np.array([groups[i] if i >= 0 else None for i in pos], dtype=object)
    return age.astype("float32"), gender, int((~known).sum()), group


def phenotype_keys(dx: pd.DataFrame) -> np.ndarray:
    """Lookup key per diagnosis row: the ICD-9 code itself, '10:' + code for ICD-10-CM."""
    ten = dx["version"].to_numpy() == 10
    return np.array([f"10:{c}" if t else c for c, t in zip(dx["raw"].to_numpy(dtype=object), ten)],
                    dtype=object)


def load_visits(mimic_dir: str, block_size: int = DEFAULT_BLOCK_SIZE, icd_versions=VERSIONS,
                crosswalk: str = "hcup_ccs", rules: Rules | None = None) -> tuple:
    """Read the seven hosp/ tables under `mimic_dir`; return (VISITS table, load report dict)."""
    where = tables_dir(mimic_dir)
    paths, forms = {}, {}
    for name in TABLES:
        paths[name], forms[name] = find_table(where, name)
    rules = rules or Rules()
    reports = {name: TableReport(file=paths[name], rules=rules) for name in TABLES}
    xwalk = load_crosswalk(crosswalk)

    adm = load_admissions(paths["admissions"], reports["admissions"])
    log.info("admissions: %d admissions of %d patients", len(adm), adm["subject_id"].nunique())
    patients = load_patients(paths["patients"], reports["patients"])
    sorted_ids = np.sort(adm["hadm_id"].to_numpy())
    dx = load_events(paths["diagnoses_icd"], "diagnoses_icd", reports["diagnoses_icd"], sorted_ids)
    px = load_events(paths["procedures_icd"], "procedures_icd", reports["procedures_icd"], sorted_ids)
    dx_dict = load_dictionary(paths["d_icd_diagnoses"], "d_icd_diagnoses", reports["d_icd_diagnoses"])
    px_dict = load_dictionary(paths["d_icd_procedures"], "d_icd_procedures", reports["d_icd_procedures"])
    for events, dictionary, name, dict_name in ((dx, dx_dict, "diagnoses_icd", "d_icd_diagnoses"),
                                                (px, px_dict, "procedures_icd", "d_icd_procedures")):
        check_leading_zeros(events["code"].to_numpy(), dictionary.index, paths[name], paths[dict_name], "icd_code")
    drugs, drug_names = load_drugs(paths["prescriptions"], reports["prescriptions"], sorted_ids,
                                   block_size, start_column="starttime")
    log.info("events: %d diagnoses, %d procedures, %d distinct (admission, drug)", len(dx), len(px), len(drugs))

    versions = admission_versions(adm["hadm_id"].to_numpy(), dx, px)
    allowed = set(icd_versions)
    keep = np.isin(versions, list(allowed) + [NONE]) | ((versions == MIXED) & allowed.issuperset(VERSIONS))
    dropped_by_version = {VERSION_LABELS[v]: int(((versions == v) & ~keep).sum()) for v in np.unique(versions[~keep])}
    if not keep.all():
        adm, versions = adm[keep].reset_index(drop=True), versions[keep]
        kept_ids = adm["hadm_id"].to_numpy()
        dx = dx[np.isin(dx["hadm_id"].to_numpy(), kept_ids)]
        px = px[np.isin(px["hadm_id"].to_numpy(), kept_ids)]
        drugs = drugs[np.isin(drugs["hadm_id"].to_numpy(), kept_ids)].reset_index(drop=True)
    if adm.empty:
        raise MimicError(f"{paths['admissions']}: no admission left with data.icd_versions={sorted(allowed)} "
                         f"(admissions per version: {dropped_by_version})")

    mapping = icd10_mapping(dx, xwalk)
    table9 = code_to_phenotype_table()
    lookup = {**table9, **{f"10:{code}": hit for code, (hit, _route) in mapping.items()}}
    age, gender, without_patient, group = _demographics(adm, patients, reports["patients"])
    table = mimic.assemble_visits(adm, age, gender, dx=dx, px=px, dx_dict=dx_dict, px_dict=px_dict,
                                  drugs=drugs, drug_names=drug_names, phenotype_keys=phenotype_keys(dx),
                                  phenotype_table=lookup)
    report = {
        "mimic_dir": mimic_dir,
        "release": "mimic4",
        "forms": forms,
        "tables": {name: r.as_dict() for name, r in reports.items()},
        "repairs": repairs(reports),
        "admissions": table.num_rows,
        "patients": int(adm["subject_id"].nunique()),
        "admissions_without_patient_row": without_patient,
        **mimic.coding_counts(adm, dx, px, dx_dict, px_dict),
        "icd_versions": sorted(allowed),
        "admissions_dropped_by_icd_version": dropped_by_version,
        "icd10_crosswalk": xwalk.source,
        "icd": icd_report(table, versions, group, dx, mapping, xwalk),
    }
    return check_schema(table, VISITS, f"{mimic_dir} -> visits"), report
