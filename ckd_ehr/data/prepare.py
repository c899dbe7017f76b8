"""`ckd-ehr prepare`: MIMIC tables -> data/visits.parquet, data/samples/{split}.parquet.

With `data.source: synthetic` the cohort is generated into RUN/raw first (kept when
raw/ground_truth.json already records the same generator parameters), then read like any
MIMIC directory; with `data.source: mimic` the tables are read from `data.mimic_dir`.
The release (MIMIC-III, `ckd_ehr.data.mimic`, or MIMIC-IV, `ckd_ehr.data.mimic4`) is `data.release`
or detected from the directory's layout; both give the same VISITS table, and the report
(and the stage summary in the manifest) records which release and ICD-10 crosswalk a run used.
Every table and value goes through one rule (`ckd_ehr.data.rules`): refuse naming file,
column, count and an example, or repair and count. data/prepare_report.json lists every
repair (`repairs`: table, file, column, what, count, example) and the notes (counted, nothing
changed), and the closing lines of `ckd-ehr prepare` print them; with `data.strict` any repair
fails the run after the report is written. The run directory is checked writable before any
table is read. An empty result that cannot be right (no visit pairs, an empty split, no
phenotype positive in training) stops the stage with the counts that explain it.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from ckd_ehr import storage
from ckd_ehr.config import DataConfig, PipelineConfig
from ckd_ehr.contracts import SPLITS, RunLayout, to_matrix
from ckd_ehr.data.mimic import load_visits, unparseable_rows
from ckd_ehr.data.rules import RELEASE_DATE_FORMAT, MimicError, Rules
from ckd_ehr.data.samples import build_samples
import ckd_ehr.data.mimic4 as mimic4
from ckd_ehr.data.synth.cohort import write_cohort

log = logging.getLogger(__name__)


class PrepareError(MimicError):
    """The prepare stage refuses its input (a repair under data.strict, an empty result that
    cannot be right, an unwritable run directory); the message names file, column and counts."""


def _generator_params(cfg: PipelineConfig) -> dict:
    """What synth records under ground_truth.json "params": every SynthConfig field and the
    generator's constants (so a changed generator also regenerates), as JSON gives it back."""
    from ckd_ehr.data.synth.model import constants_dict  # imported late: only the synthetic source needs it

    params = {**cfg.data.synth.model_dump(mode="json"), **constants_dict()}
    return json.loads(json.dumps(params, default=str))


def ensure_synthetic(cfg: PipelineConfig, layout: RunLayout) -> str:
    """Generate the synthetic cohort into RUN/raw unless the same one is already there
    (synth writes ground_truth.json last, so its presence marks a complete cohort)."""
    raw = layout.raw_dir
    marker = layout.ground_truth
    if storage.exists(marker) and storage.read_json(marker).get("params") == _generator_params(cfg):
        log.info("synthetic cohort with the same parameters already in %s: kept", raw)
        return raw

    # Clear what another generation left: a demo-form .csv would shadow a new .csv.gz.
    fs, inner = storage.resolve(raw)
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    log.info("generating a synthetic cohort of %d patients into %s", cfg.data.synth.patients, raw)
    write_cohort(raw, cfg.data.synth)
    return raw


def check_writable(run_dir: str, layout: RunLayout) -> None:
    """PrepareError unless RUN/data can be created and written (checked before any table is
    read, so an unwritable run directory does not cost a whole read of the tables)."""
    probe = layout.write_probe
    try:
        storage.makedirs(layout.path("data"))
        storage.write_text(probe, "ok")
        storage.remove(probe)
    except OSError as exc:
        raise PrepareError(f"{run_dir}: run directory not writable ({exc}); prepare writes "
                           f"{layout.prepare_report} and the samples there") from exc


def _strict_failure(repairs: list[dict], report_path: str) -> str:
    """One line naming the first repair's file, column, count and example."""
    first = repairs[0]
    return (f"{first['file']}: column '{first['column']}': {first['count']} {first['kind']} "
            f"({first['repair']}, e.g. {first['example']!r}); {len(repairs)} repair(s) in all, listed in "
            f"{report_path}; data.strict turns every repair into an error")


def load_release(source_dir: str, data: DataConfig) -> tuple:
    """(VISITS table, load report) of the MIMIC-III or MIMIC-IV tables in `source_dir`."""

    release = mimic4.detect_release(source_dir) if data.release == "auto" else data.release
    block_size = data.csv_block_mb << 20
    rules = Rules.of(data)
    log.info("prepare: reading %s tables from %s", "MIMIC-IV" if release == "mimic4" else "MIMIC-III", source_dir)
    if release == "mimic4":
        return mimic4.load_visits(source_dir, block_size=block_size, icd_versions=tuple(data.icd_versions),
                                  crosswalk=data.icd10_crosswalk, rules=rules)
    if 9 not in data.icd_versions:
        raise MimicError(f"{source_dir}: MIMIC-III is coded in ICD-9 only, but data.icd_versions is "
                         f"{data.icd_versions}")
    visits, report = load_visits(source_dir, block_size=block_size, rules=rules)
    return visits, {"release": "mimic3", **report}


def check_samples(visits, splits: dict, stats: dict, cfg: PipelineConfig, source_dir: str) -> None:
    """PrepareError where an empty result cannot be right: no visit pairs, an empty split whose
    fraction is above 0, or no phenotype positive in the training split; the message gives
    the counts that explain it (patients, admissions per patient, pairs per split)."""
    subjects = visits["subject_id"].to_numpy()
    per_patient = np.unique(np.unique(subjects, return_counts=True)[1], return_counts=True)
    shown = ", ".join(f"{n} admission(s): {k}" for n, k in zip(*per_patient))
    pairs = ", ".join(f"{n} {s['samples']}" for n, s in stats["per_split"].items())
    counts = (f"{visits.num_rows} admissions of {len(np.unique(subjects))} patients (patients with {shown}); "
              f"pairs per split: {pairs}")
    if stats["samples"] == 0:
        raise PrepareError(f"{source_dir}: no visit pairs: a sample is two consecutive admissions of one "
                           f"patient, and no patient has two ({counts})")
    for name in SPLITS:
        if getattr(cfg.split, name) > 0 and stats["per_split"][name]["samples"] == 0:
            raise PrepareError(f"{source_dir}: the {name} split is empty (split.{name}={getattr(cfg.split, name)} "
                               f"of {stats['patients_with_pairs']} patients with pairs; {counts}): use more "
                               f"patients or change split.seed / split.{name}")
    train_labels = to_matrix(splits["train"]["labels"], np.int64)
    if train_labels.sum() == 0:
        raise PrepareError(f"{source_dir}: no phenotype positive in the training split ({len(train_labels)} "
                           f"pairs, every label all-zero): the diagnoses reach none of the 25 phenotypes "
                           f"(see the prepare report's coding counts; {counts})")


def _log_repairs(repairs: list[dict], notes: list[str], report_path: str) -> None:
    """The closing lines: every repair with its count and an example, then the notes."""
    if not repairs:
        log.info("prepare: no repairs (%s)", report_path)
    else:
        log.warning("prepare: %d repair(s), listed in %s (data.strict: true makes them errors):",
                    len(repairs), report_path)
        for r in repairs:
            log.warning("  %s: column %s: %s %s: %s (e.g. %r)", r["file"], r["column"], r["count"], r["kind"],
                        r["repair"], r["example"])
    for line in notes:
        log.info("  noted: %s", line)


def _notes(load_report: dict) -> list[str]:
    return [f"{t['file']}: {n} {what}" for t in load_report["tables"].values() for what, n in t["notes"].items()]


def run_prepare(cfg: PipelineConfig) -> dict:
    """Load the tables, build visit-pair samples and the patient split, write them; return counts."""
    start = time.perf_counter()
    layout = RunLayout(cfg.run_dir)
    check_writable(cfg.run_dir, layout)
    source_dir = ensure_synthetic(cfg, layout) if cfg.data.source == "synthetic" else cfg.data.mimic_dir
    report = {"source": cfg.data.source, "source_dir": source_dir, "strict": cfg.data.strict,
              "rules": {"date_formats": dict(cfg.data.date_formats), "max_bad_fraction": cfg.data.max_bad_fraction,
                        "default_date_format": RELEASE_DATE_FORMAT}}
    try:
        visits, load_report = load_release(source_dir, cfg.data)
    except MimicError as exc:
        storage.write_json(layout.prepare_report, {**report, "status": f"failed: {exc}"})
        raise
    bad = unparseable_rows(load_report)
    repairs = load_report["repairs"]
    report.update({"release": load_report["release"], "icd10_crosswalk": load_report.get("icd10_crosswalk"),
                   "unparseable_values": bad, "repairs": repairs, "notes": _notes(load_report),
                   "load": load_report})
    if repairs and cfg.data.strict:
        report["status"] = "failed: repairs with data.strict"
        storage.write_json(layout.prepare_report, report)
        raise PrepareError(_strict_failure(repairs, layout.prepare_report))
    log.info("prepare: %d admissions of %d patients", visits.num_rows, load_report["patients"])

    splits, stats = build_samples(visits, cfg.split, cfg.text)
    report.update({"split": cfg.split.model_dump(mode="json"), "text": cfg.text.model_dump(mode="json"),
                   "samples": stats})
    try:
        check_samples(visits, splits, stats, cfg, source_dir)
    except PrepareError as exc:
        storage.write_json(layout.prepare_report, {**report, "status": f"failed: {exc}"})
        raise
    storage.write_parquet(visits, layout.visits)
    for name in SPLITS:
        storage.write_parquet(splits[name], layout.samples(name))
    log.info("prepare: %d samples (%s)", stats["samples"],
             ", ".join(f"{n} {s['samples']}" for n, s in stats["per_split"].items()))
    dropped = stats["text_items_dropped_by_budget"]
    if dropped["samples_with_drops"]:
        log.info("prepare: text budgets dropped items from %d sample(s): %s",
                 dropped["samples_with_drops"], dropped)

    report.update({"status": "ok", "seconds": round(time.perf_counter() - start, 3)})
    storage.write_json(layout.prepare_report, report)
    _log_repairs(repairs, report["notes"], layout.prepare_report)
    return {
        "release": load_report["release"],
        **({"icd10_crosswalk": load_report["icd10_crosswalk"]["package"],
            "icd_admissions": load_report["icd"]["admissions_by_version"],
            "icd10_codes_unmapped": load_report["icd"]["icd10_diagnosis_codes"]["unmapped"]}
           if load_report["release"] == "mimic4" else {}),
        "admissions": visits.num_rows,
        "patients": load_report["patients"],
        "samples": stats["samples"],
        "per_split": {n: s["samples"] for n, s in stats["per_split"].items()},
        "unparseable_values": bad,
        "repairs": {f"{r['table']}: {r['repair']}": r["count"] for r in repairs},
        "text_items_dropped": {k: v for k, v in dropped.items() if k != "samples_with_drops"},
        "seconds": report["seconds"],
    }
