"""A hand-built run directory for the student's tests: three phenotypes with a marker diagnosis
each (the marker at visit i predicts the label), an efficacy table listing drugs for two of
them, EADF text and soft labels that follow the labels."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr.contracts import AUGMENTED_SAMPLES, EFFICACY, SOFT_LABELS, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names
from ckd_ehr.storage import write_parquet
from ckd_ehr.text import render_input

NAMES = phenotype_names()
# three phenotypes with a marker diagnosis each: the marker at visit i predicts the label
MARKERS = {0: "Sepsis marker finding", 1: "Diabetes marker finding", 5: "Hypertension marker finding"}
TOP = {0: ["Vancomycin", "Cefepime"], 5: ["Lisinopril"]}
FILLER = ["Chronic pain", "Anemia unspecified", "Obesity", "Tobacco use disorder", "Cough"]


def efficacy_table() -> pa.Table:
    rows = []
    for p, drugs in TOP.items():
        for r, d in enumerate(drugs + ["Ward saline"], start=1):
            rows.append({"phenotype_index": p, "phenotype": NAMES[p], "drug": d, "n_given": 20,
                         "resolved_given": 15, "n_not_given": 20, "resolved_not_given": 5,
                         "rate_given": 0.75, "rate_not_given": 0.25, "effect": 0.5, "lower": 0.2,
                         "upper": 0.7, "risk_ratio": 3.0, "score": 0.2,
                         "rank": r if d != "Ward saline" else None, "ranking": "efficacy"})
    return pa.Table.from_pylist(rows, schema=EFFICACY)


def efficacy_map() -> dict[str, list[str]]:
    return {NAMES[p]: d for p, d in TOP.items()}


def student_samples(split: str, n: int, seed: int, n_filler: int = 2) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        present = [p for p in MARKERS if rng.random() < 0.5]
        dx = [MARKERS[p] for p in present] + list(rng.choice(FILLER, n_filler))
        rx = ["Vancomycin"] if 0 in present else ["Acetaminophen"]
        px = ["Venous cath NEC"]
        hot = [1 if j in present else 0 for j in range(NUM_PHENOTYPES)]
        eff = {NAMES[p]: TOP[p] for p in present if p in TOP}
        sid = 1000 * seed + i
        rows.append({
            "sample_id": f"{sid}-{2 * i}-{2 * i + 1}", "subject_id": sid, "hadm_id": 2 * i,
            "next_hadm_id": 2 * i + 1, "split": split, "admittime": None, "diagnosis_codes": ["0000"] * len(dx),
            "diagnosis_titles": dx, "diagnosis_short_titles": dx, "procedure_codes": ["3893"],
            "procedure_titles": px, "drugs": rx, "phenotypes_current": hot, "labels": hot,
            "text_plain": render_input(dx, rx, px).text,
            "text_eadf": render_input(dx, rx, px, efficacy=eff).text,
        })
    return pa.Table.from_pylist(rows, schema=AUGMENTED_SAMPLES)


def soft_labels_of(samples: pa.Table) -> pa.Table:
    y = np.asarray(samples.column("labels").to_pylist(), dtype=np.float32)
    p = 0.1 + 0.8 * y
    return pa.Table.from_pydict({
        "sample_id": samples.column("sample_id"), "logits": np.log(p / (1 - p)).tolist(),
        "probs": p.tolist(), "teacher_id": ["teacher-test"] * len(y)}, schema=SOFT_LABELS)


def build_run_dir(root, sizes=(40, 16, 12)) -> RunLayout:
    layout = RunLayout(str(root))
    write_parquet(efficacy_table(), layout.efficacy_table)
    for seed, (split, n) in enumerate(zip(("train", "val", "test"), sizes), start=1):
        s = student_samples(split, n, seed)
        write_parquet(s, layout.augmented(split))
        write_parquet(soft_labels_of(s), layout.soft_labels(split))
    return layout
