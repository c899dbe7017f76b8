"""The 25 acute-care phenotypes of the MIMIC-III benchmark and the ICD-9-CM -> phenotype map.

Source: HCUP CCS 2015 groups with `use_in_benchmark: True`, shipped in
`resources/hcup_ccs_2015_definitions.yaml` (see resources/NOTICE.md). The order of
`PHENOTYPES` is the order of the 25 label columns everywhere in ckd-ehr.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import yaml

NUM_PHENOTYPES = 25


@dataclass(frozen=True)
class Phenotype:
    index: int
    """Column of this phenotype in every 25-dim label vector."""
    name: str
    """CCS group name, e.g. 'Essential hypertension'."""
    ccs_id: int
    """HCUP CCS group id."""
    kind: str
    """'acute' or 'chronic' (the benchmark's typing)."""
    codes: tuple[str, ...]
    """ICD-9-CM codes without dots."""


_CODE_CLEAN = re.compile(r"[\s.]")


def normalize_icd9(code: object) -> str:
    """Normalise an ICD-9-CM code as MIMIC-III stores it: no dots, no spaces, upper case.

    Leading zeros and E/V prefixes are kept ('038.9' -> '0389', 'v45.81' -> 'V4581').
    Returns '' for missing values.
    """
    if code is None:
        return ""
    text = str(code)
    if text.lower() in ("nan", "none"):
        return ""
    return _CODE_CLEAN.sub("", text).upper()


def load_yaml_fast(text: str):
    """yaml.safe_load with libyaml's C loader where present: the CCS file takes 2.5 s with
    the pure-Python loader and 0.4 s with the C one (same result)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@lru_cache(maxsize=1)
def _load() -> tuple[tuple[Phenotype, ...], dict[str, tuple[int, ...]]]:
    text = resources.files("ckd_ehr").joinpath("resources/hcup_ccs_2015_definitions.yaml").read_text()
    groups = load_yaml_fast(text)
    chosen = [(name, g) for name, g in groups.items() if g.get("use_in_benchmark")]
    if len(chosen) != NUM_PHENOTYPES:
        raise RuntimeError(f"expected {NUM_PHENOTYPES} benchmark phenotypes, found {len(chosen)}")
    phenos = []
    code_map: dict[str, list[int]] = {}
    for i, (name, g) in enumerate(chosen):
        codes = tuple(normalize_icd9(c) for c in g["codes"])
        phenos.append(Phenotype(i, name, int(g["id"]), str(g["type"]), codes))
        for c in codes:
            code_map.setdefault(c, []).append(i)
    return tuple(phenos), {c: tuple(v) for c, v in code_map.items()}


def phenotypes() -> tuple[Phenotype, ...]:
    """The 25 phenotypes in label order."""
    return _load()[0]


def phenotype_names() -> list[str]:
    return [p.name for p in phenotypes()]


def phenotypes_of_code(code: object) -> tuple[int, ...]:
    """Label indices a single ICD-9-CM code belongs to (empty if none of the 25)."""
    return _load()[1].get(normalize_icd9(code), ())


def multi_hot(codes) -> np.ndarray:
    """25-dim int8 multi-hot of the phenotypes present among `codes`."""
    out = np.zeros(NUM_PHENOTYPES, dtype=np.int8)
    table = _load()[1]
    for c in codes:
        for i in table.get(normalize_icd9(c), ()):
            out[i] = 1
    return out


def code_to_phenotype_table() -> dict[str, tuple[int, ...]]:
    """The whole map (normalised code -> label indices)."""
    return dict(_load()[1])
