"""Visits -> samples: consecutive admission pairs, the patient split and the sample text.

A sample is one pair (visit i, visit i+1) of the same patient, admissions ordered by
admittime (ties by hadm_id, so the order never depends on file order). The input is visit i,
the label is the 25-phenotype multi-hot of visit i+1; pairs whose next visit has none of the
25 are kept with an all-zero label.

The split is by patient: a patient's split depends only on `split.seed` and its subject_id
(sha256 mapped to [0, 1) against the cumulative fractions), so no patient is in two splits,
adding patients never moves existing ones, and the same seed gives the same split anywhere.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr.config import SplitConfig, TextConfig
from ckd_ehr.contracts import SAMPLES, SPLITS, VISITS, check_schema, to_matrix
from ckd_ehr.text import diagnosis_title_column, render_input

# Columns of visit i copied as they are into the sample.
_VISIT_COLUMNS = ("subject_id", "hadm_id", "admittime", "diagnosis_codes", "diagnosis_titles",
                  "diagnosis_short_titles", "procedure_codes", "procedure_titles", "drugs")


def visit_pairs(visits: pa.Table) -> pa.Table:
    """One row per consecutive admission pair of a patient: visit i's columns, `next_hadm_id`,
    `phenotypes_current` (visit i) and `labels` (visit i+1). No split or text yet."""
    visits = check_schema(visits, VISITS, "visits")
    order = pc.sort_indices(visits, [("subject_id", "ascending"), ("admittime", "ascending"),
                                     ("hadm_id", "ascending")])
    visits = visits.take(order)
    subject = visits["subject_id"].to_numpy()
    first = np.flatnonzero(subject[:-1] == subject[1:])   # visit i of each pair
    second = first + 1
    cur = visits.take(pa.array(first, pa.int64()))
    nxt = visits.take(pa.array(second, pa.int64()))
    cols = {c: cur[c] for c in _VISIT_COLUMNS}
    cols["next_hadm_id"] = nxt["hadm_id"]
    cols["phenotypes_current"] = cur["phenotypes"]
    cols["labels"] = nxt["phenotypes"]
    cols["sample_id"] = pa.array([f"{s}-{h}-{n}" for s, h, n in zip(
        cur["subject_id"].to_pylist(), cur["hadm_id"].to_pylist(), nxt["hadm_id"].to_pylist())], pa.string())
    return pa.table(cols)


def split_of(subject_id: int, cfg: SplitConfig) -> str:
    """The split of one patient: sha256 of (seed, subject_id) as a number in [0, 1)."""
    digest = hashlib.sha256(f"{cfg.seed}:{int(subject_id)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < cfg.train:
        return "train"
    if u < cfg.train + cfg.val:
        return "val"
    return "test"


def assign_splits(subject_ids: Iterable[int], cfg: SplitConfig) -> list[str]:
    """`split_of` for many ids, hashing each distinct patient once."""
    cache: dict[int, str] = {}
    out = []
    for s in subject_ids:
        if s not in cache:
            cache[s] = split_of(s, cfg)
        out.append(cache[s])
    return out


def render_texts(pairs: pa.Table, cfg: TextConfig) -> tuple[list[str], dict[str, int]]:
    """text_plain of every sample (no efficacy clauses: EADF adds them) and the number of
    items the section budgets dropped, per section, plus how many samples lost any.

    Reads the title columns as EADF and the student do, so the texts differ only by the
    efficacy clauses (the loader already put the code where a dictionary has no title)."""
    dx_column = diagnosis_title_column(cfg)
    dropped = {"diagnoses": 0, "drugs": 0, "procedures": 0, "samples_with_drops": 0}
    texts = []
    for dx, px, rx in zip(pairs[dx_column].to_pylist(), pairs["procedure_titles"].to_pylist(),
                          pairs["drugs"].to_pylist()):
        rendered = render_input(dx, rx, px, cfg=cfg)
        texts.append(rendered.text)
        lost = 0
        for section in ("diagnoses", "drugs", "procedures"):
            dropped[section] += rendered.dropped[section]
            lost += rendered.dropped[section]
        dropped["samples_with_drops"] += lost > 0
    return texts, dropped


def build_samples(visits: pa.Table, split_cfg: SplitConfig, text_cfg: TextConfig,
                  ) -> tuple[dict[str, pa.Table], dict]:
    """Visits -> {split: SAMPLES table} (every split present, possibly empty) and stats."""
    pairs = visit_pairs(visits)
    splits = assign_splits(pairs["subject_id"].to_pylist(), split_cfg)
    texts, dropped = render_texts(pairs, text_cfg)
    table = pairs.append_column("split", pa.array(splits, pa.string())) \
                 .append_column("text_plain", pa.array(texts, pa.string()))
    table = check_schema(table, SAMPLES, "samples")
    split_col = table["split"]
    out = {name: table.filter(pc.equal(split_col, name)) for name in SPLITS}
    labels = to_matrix(pairs["labels"], np.int64)
    stats = {
        "samples": table.num_rows,
        "patients_with_pairs": len(set(pairs["subject_id"].to_pylist())),
        "per_split": {name: {"samples": t.num_rows, "patients": len(set(t["subject_id"].to_pylist()))}
                      for name, t in out.items()},
        "all_zero_labels": int((labels.sum(axis=1) == 0).sum()),
        "label_prevalence": [round(float(x), 6) for x in labels.sum(axis=0) / max(len(labels), 1)],
        "text_items_dropped_by_budget": dropped,
        "text_chars": _char_stats(texts),
    }
    return out, stats


def _char_stats(texts: list[str]) -> dict:
    if not texts:
        return {"mean": 0.0, "max": 0}
    lengths = np.array([len(t) for t in texts])
    return {"mean": round(float(lengths.mean()), 1), "max": int(lengths.max())}
