"""Collecting a study: its runs' test predictions, code, stage times and evaluate's figures
copied into RUN/study (contracts.StudyFiles), what the summary is built from."""
from __future__ import annotations

import gzip
import io
import logging

import numpy as np
import pandas as pd

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import (REFERENCE_ROWS, TEACHER_ROWS, RunLayout,
                               StudyFiles)
from ckd_ehr.study.cohorts import StudyError, study_cohorts
from ckd_ehr.evaluation.predictions import read_predictions, teacher_predictions_from_soft_labels
from ckd_ehr.pipeline import read_manifest
from ckd_ehr.metrics import evaluate_predictions, macro_label_set, to_matrix

log = logging.getLogger(__name__)


TRAINING_STAGES = ("prepare", "eadf", "teacher", "soft_labels", "student", "evaluate")
"""The stages whose code a seed's figures depend on (their manifest records are compared)."""


def _write_csv_gz(path: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:   # mtime 0: the same bytes for the same table
        f.write(frame.to_csv(index=False, float_format="%.7g").encode())
    storage.write_bytes(path, buf.getvalue())


def read_csv_gz(path: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(gzip.decompress(storage.read_bytes(path))))


def _test_predictions(seed_dir: str, row: str) -> pd.DataFrame:
    """A row's test predictions in one seed's run (PREDICTIONS rows, sorted by sample_id)."""

    layout = RunLayout(seed_dir)
    if row in TEACHER_ROWS:
        df = teacher_predictions_from_soft_labels(layout, "test", row)
        if df is None:
            raise FileNotFoundError(f"{layout.soft_labels('test', row)}: no {row} test predictions in {seed_dir}")
        return df
    return read_predictions(layout.predictions(row))


def _stage_records(run_dir: str) -> dict:

    layout = RunLayout(run_dir)
    return read_manifest(layout)["stages"] if storage.exists(layout.manifest) else {}


def _stage_seconds(stages: dict, skip: tuple[str, ...] = ("prepare", "eadf")) -> float | None:
    """Seconds of a run's own stages (a seed's manifest starts as a copy of the base's: `skip`)."""
    if not stages:
        return None
    return round(sum(float(v.get("seconds") or 0.0) for k, v in stages.items() if k not in skip), 1)


def _evaluate_figures(metrics: dict) -> dict:
    """What the summary reads of a seed's evaluate: per model its kept step and the paper's
    secondary metrics; the reference rows (floors, ceilings, probes) with intervals."""
    models = {r: {"kept_step": e.get("kept_step"),
                  "accuracy_fixed": e["modes"]["fixed"]["metrics"].get("accuracy"),
                  "macro_f1_fixed": e["modes"]["fixed"]["metrics"].get("macro_f1"),
                  "macro_f1_tuned": e["modes"]["tuned"]["metrics"].get("macro_f1")
                  if "tuned" in e["modes"] else None}
              for r, e in (metrics.get("models") or {}).items()}
    refs = {n: {"role": e["role"], "macro_auroc": e["modes"]["fixed"]["metrics"].get("macro_auroc"),
                "interval": (e["modes"]["fixed"]["intervals"] or {}).get("macro_auroc"),
                "accuracy": e["modes"]["fixed"]["metrics"].get("accuracy")}
            for n, e in (metrics.get("baselines") or {}).items()}
    return {"models": models, "references": refs}


def collect(cfg: PipelineConfig, wall_s: float | None = None) -> StudyFiles:
    """Copy what the summary needs from the finished runs into RUN/study (StudyFiles): the
    config, per cohort the test labels, per cohort and seed every row's test predictions and a
    record (the code each stage ran at, stage times, evaluate's figures, the teachers' side-by-side
    figures). Returns the study's files."""
    st = cfg.study
    files = StudyFiles(RunLayout(cfg.run_dir).study_dir)
    storage.write_json(files.config, {"config": cfg.model_dump(mode="json"), "wall_s": wall_s})
    for cohort in study_cohorts(cfg):
        reference = None
        for seed in cohort.seeds:
            seed_dir = cohort.root.study_seed(seed)
            layout = RunLayout(seed_dir)
            rows = [*st.rows_at(cohort.first_seed(seed)), *st.teacher_rows(cohort.first_seed(seed)),
                    *[r for r in REFERENCE_ROWS if storage.exists(layout.predictions(r))]]
            frames = []
            for r in rows:
                df = _test_predictions(seed_dir, r)
                if reference is None:
                    reference = df[["sample_id", "subject_id", "labels"]]
                    labels = np.stack(reference["labels"].to_numpy())
                    _write_csv_gz(files.labels(cohort.name), pd.concat(
                        [reference[["sample_id", "subject_id"]],
                         pd.DataFrame(labels, columns=[f"y_{j}" for j in range(labels.shape[1])])], axis=1))
                elif df["sample_id"].tolist() != reference["sample_id"].tolist():
                    raise StudyError(f"cohort {cohort.name}, seed {seed}, row {r}: test samples differ from the "
                                     f"cohort's first seed (a cohort's test split must be fixed)")
                probs = np.stack(df["probs"].to_numpy())
                frames.append(pd.concat([pd.DataFrame({"sample_id": df["sample_id"], "row": r}),
                                         pd.DataFrame(probs, columns=[f"p_{j}" for j in range(probs.shape[1])])],
                                        axis=1))
            _write_csv_gz(files.predictions(cohort.name, seed), pd.concat(frames, ignore_index=True))
            own = _stage_records(seed_dir)
            sides = {s: _stage_records(cohort.root.study_side_teacher(seed, s))
                     for s in st.side_teachers(cohort.first_seed(seed))}
            code = {name: rec.get("code") for name, rec in own.items() if name in TRAINING_STAGES}
            for s, recs in sides.items():
                code.update({f"{s}/{name}": rec.get("code") for name, rec in recs.items() if name in TRAINING_STAGES})
            record = {"cohort": cohort.name, "seed": seed, "run_dir": seed_dir, "rows": rows, "code": code,
                      "seed_wall_s": None if not own else round(
                          _stage_seconds(own) + sum(_stage_seconds(r) or 0.0 for r in sides.values()), 1),
                      **_evaluate_figures(storage.read_json(layout.metrics) if storage.exists(layout.metrics) else {})}
            teachers = st.teacher_rows(cohort.first_seed(seed))
            if len(teachers) > 1:
                record["teachers"] = teacher_comparison(cohort.cfg, layout, seed, teachers, own,
                                                        {s: sides[s] for s in sides})
            storage.write_json(files.seed_record(cohort.name, seed), record)
        base = _stage_records(cohort.root.study_base)
        storage.write_json(files.base_record(cohort.name), {
            "stage_seconds": _stage_seconds(base, skip=()),
            "code": {name: rec.get("code") for name, rec in base.items() if name in TRAINING_STAGES}})
    return files


TEACHER_METRICS = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc")
"""The ranking metrics the teachers are compared on (issue 19), validation and test."""


def teacher_comparison(cfg: PipelineConfig, layout: RunLayout, seed: int, teachers: list[str], own: dict,
                       sides: dict) -> dict:
    """One seed's teachers side by side: validation metrics (its soft labels on the validation
    rows the student reads, patient-bootstrap intervals), test metrics and calibration (the
    seed's evaluate), soft-label throughput (rows the teacher computed per second, Ray Data's
    start-up included) and training time (from the manifest of the run that trained it)."""

    evaluated = storage.read_json(layout.metrics)
    out = {}
    for t in teachers:
        val = teacher_predictions_from_soft_labels(layout, "val", t)
        y = to_matrix(val["labels"], np.int8)
        v = evaluate_predictions(y, to_matrix(val["probs"]), val["subject_id"].to_numpy(), bootstrap=cfg.study.bootstrap,
                                 seed=cfg.evaluate.seed, label_set=macro_label_set(y, 1))
        test = evaluated["models"][t]
        fixed = test["modes"]["fixed"]
        stages = own if t == "teacher" else sides[t]
        out[t] = {"role": TEACHER_ROWS[t],
                  "val": {"n_samples": v["n_samples"], **{m: v["metrics"][m] for m in TEACHER_METRICS},
                          "intervals": {m: v["intervals"].get(m) for m in TEACHER_METRICS}},
                  "test": {"n_samples": test["n_samples"], **{m: fixed["metrics"][m] for m in TEACHER_METRICS},
                           "intervals": {m: (fixed["intervals"] or {}).get(m) for m in TEACHER_METRICS},
                           "ece": test["calibration"]["ece"]},
                  "calibration": test["calibration"], "kept_step": test.get("kept_step"),
                  "soft_labels": (stages["soft_labels"].get("summary") or {}).get("scoring"),
                  "teacher_train_s": stages["teacher"]["seconds"]}
    return out


# summarising: RUN/study (or a copy) -> results.json, study.md, forest.png ----------------------
