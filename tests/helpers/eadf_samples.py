"""Hand-built SAMPLES rows for the EADF tests: only drugs, present phenotypes and labels vary."""
from __future__ import annotations

import pyarrow as pa

from ckd_ehr.contracts import SAMPLES
from ckd_ehr.phenotypes import NUM_PHENOTYPES


def hot(*idx: int) -> list[int]:
    v = [0] * NUM_PHENOTYPES
    for i in idx:
        v[i] = 1
    return v


def samples_table(rows: list[tuple[list[str], list[int], list[int]]], split: str = "train") -> pa.Table:
    """SAMPLES rows from (drugs, phenotypes_current, labels); the other fields are filler."""
    n = len(rows)
    return pa.table({
        "sample_id": [f"{i}-{i}0-{i}1" for i in range(n)],
        "subject_id": list(range(n)), "hadm_id": [i * 10 for i in range(n)],
        "next_hadm_id": [i * 10 + 1 for i in range(n)], "split": [split] * n,
        "admittime": pa.array([0] * n, type=pa.timestamp("s")),
        "diagnosis_codes": [["4019"]] * n,
        "diagnosis_titles": [["Unspecified essential hypertension"]] * n,
        "diagnosis_short_titles": [["Hypertension NOS"]] * n,
        "procedure_codes": [[]] * n, "procedure_titles": [[]] * n,
        "drugs": [r[0] for r in rows],
        "phenotypes_current": [r[1] for r in rows], "labels": [r[2] for r in rows],
        "text_plain": ["plain"] * n,
    }, schema=SAMPLES)
