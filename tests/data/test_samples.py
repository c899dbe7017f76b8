"""Visit pairs, the patient split and the sample text, on hand-built visits and the demo."""
from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckd_ehr.config import PipelineConfig, SplitConfig, TextConfig, build
from ckd_ehr.contracts import SAMPLES, SPLITS, VISITS, RunLayout, check_schema
from ckd_ehr.data.mimic import load_visits
from ckd_ehr.data.prepare import run_prepare
from ckd_ehr.data.samples import assign_splits, build_samples, render_texts, split_of, visit_pairs


def hot(*indices: int) -> list[int]:
    v = [0] * 25
    for i in indices:
        v[i] = 1
    return v


def visits_table(rows: list[dict]) -> pa.Table:
    """A VISITS table from short dicts (subject, hadm, day, phenotypes, codes...)."""
    cols = {f.name: [] for f in VISITS}
    for r in rows:
        codes = r.get("codes", ["4019"])
        cols["subject_id"].append(r["subject"])
        cols["hadm_id"].append(r["hadm"])
        cols["admittime"].append(datetime(2150, 1, 1) + (r["day"] - 1) * (datetime(2150, 1, 2) - datetime(2150, 1, 1)))
        cols["dischtime"].append(None)
        cols["gender"].append("F")
        cols["age"].append(60.0)
        cols["diagnosis_codes"].append(codes)
        cols["diagnosis_titles"].append(r.get("long", [f"long {c}" for c in codes]))
        cols["diagnosis_short_titles"].append(r.get("short", [f"short {c}" for c in codes]))
        cols["procedure_codes"].append(r.get("proc_codes", []))
        cols["procedure_titles"].append(r.get("proc_titles", []))
        cols["drugs"].append(r.get("drugs", []))
        cols["phenotypes"].append(r["pheno"])
    return pa.table(cols, schema=VISITS)


@pytest.fixture(scope="module")
def demo_visits(mimic_demo_dir) -> pa.Table:
    return load_visits(str(mimic_demo_dir))[0]


# --- pairs ------------------------------------------------------------------------------------

def test_pairs_follow_admission_time_not_id_or_row_order():
    visits = visits_table([
        {"subject": 1, "hadm": 30, "day": 1, "pheno": hot(0)},
        {"subject": 2, "hadm": 40, "day": 1, "pheno": hot(5)},    # one visit: no pair
        {"subject": 1, "hadm": 10, "day": 9, "pheno": hot(2)},
        {"subject": 1, "hadm": 20, "day": 5, "pheno": hot(1, 3)},
        {"subject": 3, "hadm": 50, "day": 2, "pheno": hot(4)},
        {"subject": 3, "hadm": 60, "day": 3, "pheno": hot()},     # next visit without phenotype
    ])
    pairs = visit_pairs(visits)
    assert pairs["sample_id"].to_pylist() == ["1-30-20", "1-20-10", "3-50-60"]
    assert pairs["next_hadm_id"].to_pylist() == [20, 10, 60]
    assert pairs["phenotypes_current"].to_pylist() == [hot(0), hot(1, 3), hot(4)]
    assert pairs["labels"].to_pylist() == [hot(1, 3), hot(2), hot()]  # all-zero label kept


def test_sample_text_uses_titles_drugs_and_procedures_without_efficacy():
    visits = visits_table([
        {"subject": 1, "hadm": 1, "day": 1, "pheno": hot(5), "codes": ["4019", "7895"],
         "long": ["Unspecified essential hypertension", "7895"], "short": ["Hypertension NOS", "7895"],
         "drugs": ["Heparin", "Insulin"], "proc_codes": ["3893"], "proc_titles": ["Venous cath NEC"]},
        {"subject": 1, "hadm": 2, "day": 2, "pheno": hot()},
    ])
    pairs = visit_pairs(visits)
    long_text, dropped = render_texts(pairs, TextConfig(titles="long"))
    assert long_text == ["The patient-acquired disease is Unspecified essential hypertension, 7895. "
                         "The patient had used the following medication: Heparin, Insulin. "
                         "The surgical operation performed by the patient: Venous cath NEC."]
    assert dropped == {"diagnoses": 0, "drugs": 0, "procedures": 0, "samples_with_drops": 0}
    short_text, _ = render_texts(pairs, TextConfig(titles="short"))
    assert "disease is Hypertension NOS, 7895." in short_text[0]
    assert "therapeutic effect" not in long_text[0] + short_text[0]
    with_instruction, _ = render_texts(pairs, TextConfig(instruction="paper"))
    assert with_instruction[0].startswith("Determine that the patient has one or more") \
        and with_instruction[0].endswith(long_text[0])


def test_budget_drops_whole_items_and_counts_them():
    drugs = [f"Drug{i:02d}" for i in range(10)]  # 6 characters each, 8 with the separator
    visits = visits_table([{"subject": 1, "hadm": 1, "day": 1, "pheno": hot(), "drugs": drugs},
                           {"subject": 1, "hadm": 2, "day": 2, "pheno": hot(), "drugs": drugs},
                           {"subject": 1, "hadm": 3, "day": 3, "pheno": hot()}])
    texts, dropped = render_texts(visit_pairs(visits), TextConfig(max_chars_drugs=29))
    # 6 + 8 + 8 = 22 <= 29 < 30: three drugs fit, seven are dropped from each of two samples
    assert "medication: Drug00, Drug01, Drug02." in texts[0]
    assert dropped == {"diagnoses": 0, "drugs": 14, "procedures": 0, "samples_with_drops": 2}


# --- split ------------------------------------------------------------------------------------

def test_split_is_deterministic_proportional_and_per_patient():
    ids = list(range(100_000, 120_000))
    cfg = SplitConfig(seed=13)
    first = assign_splits(ids, cfg)
    assert assign_splits(list(reversed(ids)), cfg) == list(reversed(first))  # order does not matter
    fractions = {s: first.count(s) / len(ids) for s in SPLITS}
    for s, want in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(fractions[s] - want) < 0.015, fractions
    # adding patients does not move anyone, and a patient's split is one value
    assert assign_splits(ids[:500], cfg) == first[:500]
    assert assign_splits([ids[0]] * 3, cfg) == [first[0]] * 3
    # another seed is another split
    other = assign_splits(ids, SplitConfig(seed=14))
    assert 0.4 < np.mean([a == b for a, b in zip(first, other)]) < 0.7


def test_split_follows_the_configured_fractions():
    ids = range(5000)
    cfg = SplitConfig(train=0.5, val=0.0, test=0.5, seed=1)
    splits = [split_of(i, cfg) for i in ids]
    assert "val" not in splits and abs(splits.count("train") / 5000 - 0.5) < 0.03


def test_demo_samples_put_each_patient_in_one_split(demo_visits):
    out, stats = build_samples(demo_visits, SplitConfig(seed=3), TextConfig())
    owner = {}
    for split, table in out.items():
        check_schema(table, SAMPLES, split)
        for subject in table["subject_id"].to_pylist():
            assert owner.setdefault(subject, split) == split, f"patient {subject} in two splits"
    assert sum(t.num_rows for t in out.values()) == stats["samples"] == 29
    assert len(owner) == stats["patients_with_pairs"] == 14
    # same seed, same split; the text never changes with the split
    again, _ = build_samples(demo_visits, SplitConfig(seed=3), TextConfig())
    assert all(again[s].equals(out[s]) for s in SPLITS)


def test_an_empty_split_is_written_with_the_schema(mimic_demo_dir, tmp_path):
    cfg = build(PipelineConfig, {"run_dir": str(tmp_path),
                                 "data": {"source": "mimic", "mimic_dir": str(mimic_demo_dir)},
                                 "split": {"train": 0.8, "val": 0.0, "test": 0.2},
                                 "text": {"max_chars_drugs": 200}})
    summary = run_prepare(cfg)
    layout = RunLayout(str(tmp_path))
    val = pq.read_table(layout.samples("val"))
    assert val.num_rows == 0 and summary["per_split"]["val"] == 0
    assert check_schema(val, SAMPLES, "val").schema == SAMPLES
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    dropped = report["samples"]["text_items_dropped_by_budget"]
    assert dropped["drugs"] > 0 and dropped["drugs"] == summary["text_items_dropped"]["drugs"]


def test_synthetic_cohort_is_generated_once_per_parameters(tmp_path):
    """source: synthetic generates RUN/raw, reuses it while the generator parameters are
    unchanged and regenerates it when they change."""
    def prepare(seed: int) -> dict:
        return run_prepare(build(PipelineConfig, {
            "run_dir": str(tmp_path),
            "data": {"source": "synthetic", "synth": {"patients": 40, "seed": seed}}}))

    marker = tmp_path / "raw" / "ground_truth.json"
    first = prepare(seed=1)
    assert first["patients"] == 40 and first["samples"] > 0
    written = marker.stat().st_mtime_ns
    again = prepare(seed=1)
    assert {**again, "seconds": 0} == {**first, "seconds": 0}
    assert marker.stat().st_mtime_ns == written  # kept, not regenerated
    prepare(seed=2)
    assert marker.stat().st_mtime_ns != written
    assert json.loads(marker.read_text())["params"]["seed"] == 2
