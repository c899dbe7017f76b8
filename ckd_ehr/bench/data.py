"""`ckd-ehr bench synth` and `ckd-ehr bench prepare`: wall time and peak memory of the data layer.

    ckd-ehr bench synth --patients 46520                 # generate a MIMIC-III-scale cohort
    ckd-ehr bench prepare --patients 46520               # generate (unmeasured), then prepare
    ckd-ehr bench prepare --patients 100000 --form mimic4   # a MIMIC-IV-form cohort (hosp/*.csv.gz)
    ckd-ehr bench prepare --set data.source=mimic --set data.mimic_dir=DIR   # prepare real tables

The cohort form (demo .csv / full-release .csv.gz / mimic4) is `--form`, else `data.synth.form`. Figures are
printed as JSON (and written to --out); nothing here is asserted.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ckd_ehr.config import PipelineConfig
from ckd_ehr.bench.common import emit, measure
from ckd_ehr.data.synth.cohort import write_cohort


def _synth_cfg(cfg: PipelineConfig, args):
    synth = cfg.data.synth
    if getattr(args, "patients", None):
        synth = synth.model_copy(update={"patients": args.patients})
    if getattr(args, "form", None):
        synth = synth.model_copy(update={"form": args.form})
    return synth


def _table_sizes(directory: str) -> dict:
    """MiB per table file, MIMIC-IV's hosp/ included."""
    out = {}
    for root, _, files in sorted(os.walk(directory)):
        for f in sorted(files):
            if f.endswith((".csv", ".csv.gz")):
                path = os.path.join(root, f)
                out[os.path.relpath(path, directory)] = round(os.path.getsize(path) / 2**20, 2)
    return out


def bench_synth(cfg: PipelineConfig, args) -> dict:
    """Time and memory of writing one synthetic cohort."""

    synth = _synth_cfg(cfg, args)
    results: dict = {"benchmark": "synth", "patients": synth.patients, "form": synth.form}
    out = tempfile.mkdtemp(prefix="ckd-ehr-bench-synth-")
    try:
        with measure("synth", results):
            summary = write_cohort(out, synth)
        results["summary"] = summary
        results["table_mib"] = _table_sizes(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    emit(results, getattr(args, "out", None))
    return results


def bench_prepare(cfg: PipelineConfig, args) -> dict:
    """Time and memory of `run_prepare` on a synthetic cohort (or on `data.mimic_dir`)."""
    # not at module level: pandas, loaded only when this runs
    from ckd_ehr.data.prepare import run_prepare

    work = tempfile.mkdtemp(prefix="ckd-ehr-bench-prepare-")
    results: dict = {"benchmark": "prepare"}
    try:
        if cfg.data.source == "mimic":
            tables = cfg.data.mimic_dir
        else:
            # not at module level: imported only on this branch
            from ckd_ehr.data.synth.cohort import write_cohort

            synth = _synth_cfg(cfg, args)
            tables = os.path.join(work, "tables")
            results.update({"patients": synth.patients, "form": synth.form})
            with measure("synth (not part of prepare)", results):
                write_cohort(tables, synth)
        if "://" not in str(tables):
            results["table_mib"] = _table_sizes(str(tables))
        run_cfg = cfg.model_copy(update={
            "run_dir": os.path.join(work, "run"),
            "data": cfg.data.model_copy(update={"source": "mimic", "mimic_dir": str(tables)})})
        with measure("prepare", results):
            results["summary"] = run_prepare(run_cfg)
        seconds = results["prepare"]["wall_s"]
        results["admissions_per_s"] = round(results["summary"]["admissions"] / max(seconds, 1e-9), 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(results, getattr(args, "out", None))
    return results
