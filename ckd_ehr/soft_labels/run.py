"""Soft labels: the teacher's probabilities for every sample, by Ray Data batch inference.

    RUN/eadf/samples/{split}.parquet  --(Ray Data, actor pool, one teacher per actor)-->
    RUN/soft_labels/{split}.parquet   (contracts.SOFT_LABELS)  + RUN/soft_labels/quality/

The scoring itself is plain torch and runs without Ray (`scoring.py`); `ray_scoring.py` is the
Ray Data edge (one teacher per actor); this module is the stage: which rows, scoring, checks,
writing.

With `soft_labels.unit_targets` the same forward pass also gives the teacher's targets of
multi-granularity distillation (`score_with_units`): its label attention summed per clinical
item of the text and the relations between the items (RUN/soft_labels/units/, contracts.UNIT_TARGETS).

The stage is complete or fails: every input sample_id appears exactly once in the output
(`check_complete`), probabilities are finite and in [0, 1], and each split's file is written
under a temporary name and renamed, so a rerun replaces it and never appends.
"""
from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr import storage
from ckd_ehr.contracts import SOFT_LABELS, SPLITS, UNIT_TARGETS, RunLayout
from ckd_ehr.modeling.collate import padding_efficiency
from ckd_ehr.training.batching import trainer_rows
from ckd_ehr.soft_labels.ray_scoring import empty_scored, infer_soft_labels
from ckd_ehr.soft_labels.scoring import (SPREAD_WARNING, check_complete, check_unit_targets, in_input_order,
                                         label_attention_spread, soft_labels_from_probe)
from ckd_ehr.ray_utils import init_ray
from ckd_ehr.soft_labels.quality import write_quality_report

log = logging.getLogger(__name__)


def rows_to_score(cfg, layout: RunLayout) -> tuple[dict[str, pa.Table], dict[str, int]]:
    """({split: the rows this stage scores}, {split: rows in the split}): every row, or under
    `soft_labels.rows: student` the training / validation rows the student reads."""
    rows, totals = {}, {}
    for split in SPLITS:
        table = storage.read_parquet(layout.augmented(split))
        totals[split] = table.num_rows
        if cfg.soft_labels.rows == "student" and split in ("train", "val"):
            keep = trainer_rows(cfg.student, split, table.num_rows)
            if len(keep) < table.num_rows:
                log.info("soft labels %s: the %d of %d rows the student reads (soft_labels.rows: student)",
                         split, len(keep), table.num_rows)
                table = table.take(pa.array(keep))
        rows[split] = table
    return rows, totals


def score_rows(cfg, layout: RunLayout, meta: dict, rows: dict[str, pa.Table], totals: dict[str, int],
               from_probe: dict[str, pa.Table], unit_columns) -> tuple[dict[str, pa.Table], float]:
    """({split: scored rows}, seconds): the rows not already scored from the probe's features,
    through the Ray Data actor pool (whole splits read in place; subsets written to
    RunLayout.scoring_subsets and removed after)."""
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.train import teacher_frozen_cache

    to_score, subsets = {}, []
    try:
        for split, table in rows.items():
            if split in from_probe:
                done = set(from_probe[split].column("sample_id").to_pylist())
                log.info("soft labels %s: %d of %d rows from the teacher's probe features (it kept its probe, step 0)",
                         split, len(done), table.num_rows)
                table = table.filter(pa.array([sid not in done for sid in table.column("sample_id").to_pylist()]))
            if not table.num_rows:
                continue
            if table.num_rows == totals[split]:
                to_score[split] = layout.augmented(split)
            else:   # beside the run's other files (same filesystem for Ray Data), removed below
                to_score[split] = storage.join(layout.scoring_subsets, f"{split}.parquet")
                storage.write_parquet(table, to_score[split])
                subsets.append(to_score[split])
        if not to_score:
            return {}, 0.0
        init_ray(cfg.ray)
        started = time.time()
        raw = infer_soft_labels(to_score, layout.teacher_artifact, cfg.soft_labels, unit_columns,
                                None if unit_columns else teacher_frozen_cache(layout, meta))
        return raw, time.time() - started
    finally:
        for path in subsets:
            storage.remove(path)


def _split_summary(split: str, table: pa.Table, raw: pa.Table, from_probe: dict, from_frozen: dict) -> dict:
    scored = raw.filter(pc.greater(raw.column("n_computed"), 0))   # not from the probe's cache
    real = int(pc.sum(scored.column("n_tokens")).as_py() or 0)
    computed = int(pc.sum(raw.column("n_computed")).as_py() or 0)
    return {"rows": table.num_rows, "tokens": real, "computed_tokens": computed,
            "padding_efficiency": padding_efficiency(real, computed),
            "rows_from_probe_features": from_probe[split].num_rows if split in from_probe else 0,
            "rows_from_frozen_cache": from_frozen.get(split, 0)}


def _check_spread(split: str, units: pa.Table, unit_attention: bool) -> float | None:
    spread = label_attention_spread(units) if unit_attention else None
    if spread is not None and spread < SPREAD_WARNING:
        log.warning("soft labels %s: the teacher's label attention is the same for every phenotype (spread "
                    "%.2g < %g): its queries never left their start (zero under head_init probe), so the "
                    "label-level term would distil only how the tokens fall into units; train the queries at "
                    "a rate of their own (teacher.query_lr, docs/method.md)", split, spread, SPREAD_WARNING)
    return spread


def run_soft_labels(cfg) -> dict:
    """`ckd-ehr soft-labels`: SOFT_LABELS for every split plus the quality report."""

    layout = RunLayout(cfg.run_dir)
    if not storage.exists(layout.teacher_meta):
        raise FileNotFoundError(f"{layout.teacher_artifact}: no teacher artifact (run `ckd-ehr teacher` first)")
    meta = storage.read_json(layout.teacher_meta)
    rows, totals = rows_to_score(cfg, layout)
    input_ids = {split: t.column("sample_id").to_pylist() for split, t in rows.items()}
    unit_columns, unit_attention = None, False
    if cfg.soft_labels.unit_targets:
        # not at module level: imported only on this branch
        from ckd_ehr.text import diagnosis_title_column

        unit_columns = (diagnosis_title_column(cfg.text), "drugs", "procedure_titles")
        if meta.get("head", "mlaph") != "mlaph":
            raise ValueError("soft_labels.unit_targets needs an MLAPH teacher (teacher.head: mlaph): a generative "
                             "teacher has neither label attention nor a projection head's states")
        unit_attention = meta.get("pooling") == "label_attention"
    # A teacher that kept its probe: rows whose frozen features the probe cached need no pass.
    from_probe = {} if unit_columns else soft_labels_from_probe(layout, meta, cfg.soft_labels, rows)
    raw, scoring_s = score_rows(cfg, layout, meta, rows, totals, from_probe, unit_columns)
    from_frozen = {split: int(pc.sum(t.column("frozen_cached")).as_py() or 0) if "frozen_cached" in t.column_names
                   else 0 for split, t in raw.items()}
    for split in SPLITS:
        parts = [t.select([*SOFT_LABELS.names, "n_tokens", "n_computed"]) for t in (raw.get(split), from_probe.get(split))
                 if t is not None] if not unit_columns else [raw[split]]
        raw[split] = pa.concat_tables(parts) if parts else empty_scored(False)
    # Every split is checked before any is written: the stage fails whole, not half-replaced.
    tables, unit_tables = {}, {}
    for split in SPLITS:
        table = raw[split].select(SOFT_LABELS.names)
        check_complete(input_ids[split], table, layout.soft_labels(split))
        tables[split] = in_input_order(table, input_ids[split])
        if unit_columns:
            units = raw[split].select(UNIT_TARGETS.names)
            check_unit_targets(units, input_ids[split], layout.unit_targets(split), unit_attention,
                               cfg.soft_labels.relation_layer is not None)
            unit_tables[split] = in_input_order(units, input_ids[split])
    summary = {}
    for split, table in tables.items():
        storage.write_parquet(table, layout.soft_labels(split))
        summary[split] = _split_summary(split, table, raw[split], from_probe, from_frozen)
        if split in unit_tables:
            storage.write_parquet(unit_tables[split], layout.unit_targets(split))
            summary[split]["unit_targets_bytes"] = storage.size(layout.unit_targets(split))
            summary[split]["label_attention_spread"] = _check_spread(split, unit_tables[split], unit_attention)
        elif storage.exists(layout.unit_targets(split)):   # another teacher's: never left to be read as this one's
            storage.remove(layout.unit_targets(split))
        log.info("soft labels %s: %d rows -> %s (%d from the probe's features, %d through the top layers only on the "
                 "teacher's frozen cache; scored: padding efficiency %.3f, %d real / %d computed tokens)", split,
                 table.num_rows, layout.soft_labels(split), summary[split]["rows_from_probe_features"],
                 summary[split]["rows_from_frozen_cache"], summary[split]["padding_efficiency"],
                 summary[split]["tokens"], summary[split]["computed_tokens"])
    quality = write_quality_report(layout, cfg.soft_labels.ece_bins)
    # Throughput of the rows the teacher computed (not those from its probe's cache), Ray Data's
    # start-up included: what a user waits for per row (the study compares teacher heads on it).
    scored_rows = sum(v["rows"] - v["rows_from_probe_features"] for v in summary.values())
    scoring = {"rows": scored_rows, "seconds": round(scoring_s, 1), "head": meta.get("head", "mlaph"),
               "rows_per_s": round(scored_rows / scoring_s, 3) if scoring_s > 0 else None}
    log.info("soft labels: %d rows scored in %.1f s (%s rows/s, %s head)", scored_rows, scoring_s,
             scoring["rows_per_s"], scoring["head"])
    return {"splits": summary, "scoring": scoring, "quality": quality}
