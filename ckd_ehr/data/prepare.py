"""`ckd-ehr prepare`: MIMIC tables -> data/visits.parquet, data/samples/{split}.parquet.

With `data.source: synthetic` the cohort is generated into RUN/raw first (kept when
raw/ground_truth.json already records the same generator parameters), then read like any
MIMIC directory; with `data.source: mimic` the tables are read from `data.mimic_dir`.
The release (MIMIC-III, `ckd_ehr.data.mimic`, or MIMIC-IV, `ckd_ehr.data.mimic4`) is `data.release`
or detected from the directory's layout; both give the same VISITS table, and the report
(and the stage summary in the manifest) records which release and ICD-10 crosswalk a run used.
Counts of rows read and dropped, and why, go to data/prepare_report.json; with `data.strict`
any unparseable id or timestamp fails the run after the report is written.
"""
from __future__ import annotations

import json
import logging
import time

from ckd_ehr import storage
from ckd_ehr.config import DataConfig, PipelineConfig
from ckd_ehr.contracts import SPLITS, RunLayout
from ckd_ehr.data.mimic import MimicError, load_visits, unparseable_rows
from ckd_ehr.data.samples import build_samples

log = logging.getLogger(__name__)


class PrepareError(ValueError):
    """The prepare stage refuses its input (strict mode); the message names file and column."""


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
    from ckd_ehr.data.synth.cohort import write_cohort

    # Clear what another generation left: a demo-form .csv would shadow a new .csv.gz.
    fs, inner = storage.resolve(raw)
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    log.info("generating a synthetic cohort of %d patients into %s", cfg.data.synth.patients, raw)
    write_cohort(raw, cfg.data.synth)
    return raw


def _strict_failure(report: dict) -> str:
    """One line naming the first offending file, column and values."""
    for table in report["tables"].values():
        for column, n in table["unparseable"].items():
            shown = ", ".join(repr(v) for v in table["examples"].get(column, []))
            return (f"{table['file']}: column '{column}' has {n} unparseable value(s) (e.g. {shown}); "
                    f"{unparseable_rows(report)} in all, see the prepare report (data.strict is set)")
    return "unparseable values (data.strict is set)"


def load_release(source_dir: str, data: DataConfig) -> tuple:
    """(VISITS table, load report) of the MIMIC-III or MIMIC-IV tables in `source_dir`."""
    from ckd_ehr.data import mimic4 as mimic4

    release = mimic4.detect_release(source_dir) if data.release == "auto" else data.release
    block_size = data.csv_block_mb << 20
    log.info("prepare: reading %s tables from %s", "MIMIC-IV" if release == "mimic4" else "MIMIC-III", source_dir)
    if release == "mimic4":
        return mimic4.load_visits(source_dir, block_size=block_size, icd_versions=tuple(data.icd_versions),
                                  crosswalk=data.icd10_crosswalk)
    if 9 not in data.icd_versions:
        raise MimicError(f"{source_dir}: MIMIC-III is coded in ICD-9 only, but data.icd_versions is "
                         f"{data.icd_versions}")
    visits, report = load_visits(source_dir, block_size=block_size)
    return visits, {"release": "mimic3", **report}


def run_prepare(cfg: PipelineConfig) -> dict:
    """Load the tables, build visit-pair samples and the patient split, write them; return counts."""
    start = time.perf_counter()
    layout = RunLayout(cfg.run_dir)
    source_dir = ensure_synthetic(cfg, layout) if cfg.data.source == "synthetic" else cfg.data.mimic_dir
    visits, load_report = load_release(source_dir, cfg.data)
    bad = unparseable_rows(load_report)
    report = {"source": cfg.data.source, "source_dir": source_dir, "release": load_report["release"],
              "icd10_crosswalk": load_report.get("icd10_crosswalk"), "strict": cfg.data.strict,
              "unparseable_values": bad, "load": load_report}
    if bad:
        log.warning("prepare: %d unparseable value(s); rows dropped or values set to null (see %s)",
                    bad, layout.prepare_report)
        if cfg.data.strict:
            report["status"] = "failed: unparseable values with data.strict"
            storage.write_json(layout.prepare_report, report)
            raise PrepareError(_strict_failure(load_report))
    log.info("prepare: %d admissions of %d patients", visits.num_rows, load_report["patients"])

    splits, stats = build_samples(visits, cfg.split, cfg.text)
    storage.write_parquet(visits, layout.visits)
    for name in SPLITS:
        storage.write_parquet(splits[name], layout.samples(name))
    log.info("prepare: %d samples (%s)", stats["samples"],
             ", ".join(f"{n} {s['samples']}" for n, s in stats["per_split"].items()))
    dropped = stats["text_items_dropped_by_budget"]
    if dropped["samples_with_drops"]:
        log.info("prepare: text budgets dropped items from %d sample(s): %s",
                 dropped["samples_with_drops"], dropped)

    report.update({"status": "ok", "split": cfg.split.model_dump(mode="json"),
                   "text": cfg.text.model_dump(mode="json"), "samples": stats,
                   "seconds": round(time.perf_counter() - start, 3)})
    storage.write_json(layout.prepare_report, report)
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
        "text_items_dropped": {k: v for k, v in dropped.items() if k != "samples_with_drops"},
        "seconds": report["seconds"],
    }
