"""The `icd` section of a MIMIC-IV load report: how ICD-10 codes reached the 25 phenotypes.

- admissions per ICD version (9, 10, mixed, none);
- the data's distinct ICD-10-CM diagnosis codes by mapping route (`icd10.ROUTES`): every code
  is counted once, and the `unlisted` ones (unmapped) are listed;
- per phenotype: ICD-10-CM codes the crosswalk maps to it, distinct codes of the data that
  reach it per version, and its prevalence among ICD-9-coded vs ICD-10-coded admissions;
- the same prevalences within each `anchor_year_group` that has admissions of both versions.
  Calendar time confounds the overall comparison (the case mix of 2008-2015 is not that of
  2015-2022); within one anchor_year_group (a 3-year window of real time, e.g. 2014 - 2016
  around the October 2015 switch) a large shift points at the mapping. Admissions are
  grouped by their patient's anchor_year_group, which places the anchor year, not every
  admission, in that window.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa

from ckd_ehr.data.icd10 import ROUTES, Crosswalk
from ckd_ehr.contracts import to_matrix
from ckd_ehr.phenotypes import NUM_PHENOTYPES, code_to_phenotype_table, phenotype_names

VERSIONS = (9, 10)
MIXED, NONE = 19, 0  # admission_versions() codes besides 9 and 10 (ckd_ehr.data.mimic4)
VERSION_LABELS = {9: "9", 10: "10", MIXED: "mixed", NONE: "none"}
UNMAPPED_LISTED = 2000  # codes listed by name in the report; the count is always complete


def icd10_mapping(dx: pd.DataFrame, crosswalk: Crosswalk) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each distinct ICD-10-CM code of `dx` (normalised) -> (phenotype indices, route)."""
    codes = pd.unique(dx.loc[dx["version"].to_numpy() == 10, "raw"])
    return {c: crosswalk.lookup(c) for c in codes}


def _rate(mat: np.ndarray, mask: np.ndarray) -> list[float | None]:
    n = int(mask.sum())
    return [round(float(x), 4) for x in mat[mask].mean(axis=0)] if n else [None] * NUM_PHENOTYPES


def icd_report(visits: pa.Table, versions: np.ndarray, group: np.ndarray, dx: pd.DataFrame,
               mapping: dict, crosswalk: Crosswalk) -> dict:
    names = phenotype_names()
    mat = to_matrix(visits["phenotypes"], np.int8)
    by_version = {label: int((versions == v).sum()) for v, label in VERSION_LABELS.items()}

    ten = dx["version"].to_numpy() == 10
    rows10 = dx.loc[ten, "raw"]
    route_of = {c: r for c, (_, r) in mapping.items()}
    unmapped = sorted(c for c, r in route_of.items() if r == "unlisted")
    codes10 = {
        "distinct": len(mapping),
        "rows": int(ten.sum()),
        "routes": {r: sum(1 for v in route_of.values() if v == r) for r in ROUTES},
        "rows_by_route": {r: int(n) for r, n in Counter(rows10.map(route_of)).items()},
        "to_one_of_the_25": sum(1 for hit, _ in mapping.values() if hit),
        "unmapped": len(unmapped),
        "unmapped_codes": unmapped[:UNMAPPED_LISTED],
    }

    table9 = code_to_phenotype_table()
    in_data = {9: Counter(), 10: Counter()}
    for code in pd.unique(dx.loc[~ten, "raw"]):
        in_data[9].update(table9.get(code, ()))
    for hit, _ in mapping.values():
        in_data[10].update(hit)
    in_crosswalk = crosswalk.codes_per_phenotype()
    p9, p10 = _rate(mat, versions == 9), _rate(mat, versions == 10)
    per_phenotype = [{
        "phenotype": name,
        "icd10_codes_in_crosswalk": in_crosswalk[i],
        "icd9_codes_in_data": in_data[9][i],
        "icd10_codes_in_data": in_data[10][i],
        "prevalence_icd9": p9[i],
        "prevalence_icd10": p10[i],
    } for i, name in enumerate(names)]

    groups = {}
    for g in sorted({x for x in group if x is not None}):
        in_g = group == g
        n9, n10 = int((in_g & (versions == 9)).sum()), int((in_g & (versions == 10)).sum())
        if n9 and n10:
            g9, g10 = _rate(mat, in_g & (versions == 9)), _rate(mat, in_g & (versions == 10))
            groups[g] = {"admissions": {"9": n9, "10": n10},
                         "prevalence": {name: {"icd9": g9[i], "icd10": g10[i]} for i, name in enumerate(names)}}
    return {"admissions_by_version": by_version, "icd10_diagnosis_codes": codes10,
            "phenotypes": per_phenotype, "by_anchor_year_group": groups}
