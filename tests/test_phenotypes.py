"""The 25 benchmark phenotypes and the ICD-9-CM code map, checked against the CCS YAML read
here with plain yaml (not through ckd_ehr.phenotypes)."""
from importlib import resources

import numpy as np
import pytest
import yaml

from ckd_ehr.phenotypes import (NUM_PHENOTYPES, multi_hot, normalize_icd9, phenotype_names,
                                phenotypes_of_code)


@pytest.fixture(scope="module")
def groups() -> dict:
    text = resources.files("ckd_ehr").joinpath("resources/hcup_ccs_2015_definitions.yaml").read_text()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.fixture(scope="module")
def benchmark_groups(groups) -> dict:
    return {name: g for name, g in groups.items() if g["use_in_benchmark"]}


def names_of(code) -> list[str]:
    return [phenotype_names()[i] for i in phenotypes_of_code(code)]


@pytest.mark.parametrize("code, name", [
    ("4019", "Essential hypertension"),
    ("0389", "Septicemia (except in labor)"),
    ("5849", "Acute and unspecified renal failure"),
    ("25000", "Diabetes mellitus without complication"),
    ("42731", "Cardiac dysrhythmias"),
])
def test_known_codes_map_to_their_phenotype(code, name):
    assert names_of(code) == [name]


def test_the_25_phenotypes_are_the_benchmark_groups_in_file_order(benchmark_groups):
    assert NUM_PHENOTYPES == 25
    assert phenotype_names() == list(benchmark_groups)


def test_every_listed_code_maps_to_its_group(benchmark_groups):
    checked = 0
    for name, g in benchmark_groups.items():
        for code in g["codes"]:
            assert name in names_of(code), f"{code} of '{name}' maps to {names_of(code)}"
            checked += 1
    assert checked > 700  # the 25 groups list 767 codes


def test_codes_outside_the_25_groups_map_to_nothing(groups, benchmark_groups):
    inside = {c for g in benchmark_groups.values() for c in g["codes"]}
    outside = [c for g in groups.values() if not g["use_in_benchmark"] for c in g["codes"] if c not in inside]
    assert outside, "the YAML has non-benchmark groups"
    assert all(phenotypes_of_code(c) == () for c in outside)


@pytest.mark.parametrize("raw, normalised", [
    ("401.9", "4019"),
    (" 038.9 ", "0389"),        # leading zero kept
    ("0389", "0389"),
    ("v45.81", "V4581"),        # V prefix kept, upper-cased
    ("E878.8", "E8788"),        # E prefix kept
    ("584 9", "5849"),          # inner space removed
    (None, ""),
    ("nan", ""),
])
def test_normalisation(raw, normalised):
    assert normalize_icd9(raw) == normalised


def test_dotted_and_plain_spellings_map_alike():
    assert phenotypes_of_code("038.9") == phenotypes_of_code("0389") != ()
    assert phenotypes_of_code("389") == ()  # dropping the leading zero is a different code


def test_multi_hot_marks_each_phenotype_once():
    vec = multi_hot(["401.9", "4019", "5849", "V45.81", "E950.0", "not-a-code"])
    assert vec.dtype == np.int8 and vec.shape == (25,)
    names = phenotype_names()
    assert phenotypes_of_code("E9500") == ()  # suicide by poisoning: a group outside the 25
    assert {names[i] for i in np.flatnonzero(vec)} == {
        "Essential hypertension", "Acute and unspecified renal failure",
        "Coronary atherosclerosis and other heart disease"}  # V4581: aortocoronary bypass
