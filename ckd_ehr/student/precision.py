"""The served student at a reduced precision (serve.precision: int8 or bf16) scored like any other model.

    write_precision_predictions(cfg, precision)
                                  RUN/evaluate/predictions/{variant}_{precision}.parquet for
                                  every student variant with an artifact: the test split's
                                  texts fitted exactly as training did, scored by the artifact
                                  loaded at that precision (StudentPredictor(precision=...)),
                                  so `evaluate` reports the served model as its own row
    run_texts(cfg, predictor, n)  texts of the run's samples (every split) as the student saw
                                  them: the precision vs fp32 agreement check of `bench serve`
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import PREDICTIONS, PRIMARY_VARIANTS, RunLayout, precision_name
from ckd_ehr.storage import exists, write_parquet

log = logging.getLogger("ckd_ehr.student")


def _fitted(cfg: PipelineConfig, predictor, split: str):
    """(samples, texts) of one split as the predictor's variant saw them (fit to max_length)."""
    # not at module level: pandas, loaded only when this runs
    from ckd_ehr.student.data import fit_texts, read_split

    layout = RunLayout(cfg.run_dir)
    samples, _ = read_split(layout.augmented(split), None)
    shrink = float(predictor.meta.get("config", {}).get("fit_shrink", 0.7))
    texts, _ = fit_texts(samples, predictor.tokenizer, predictor.max_length, predictor.text_column,
                         predictor.efficacy, predictor.text_config, shrink)
    return samples, texts


def run_texts(cfg: PipelineConfig, predictor, at_least: int) -> tuple[list[str], str]:
    """`at_least` texts of the run's samples (test, then val, then train); fewer if the run has fewer."""
    layout = RunLayout(cfg.run_dir)
    texts, used = [], []
    for split in ("test", "val", "train"):
        if len(texts) >= at_least or not exists(layout.augmented(split)):
            continue
        texts += _fitted(cfg, predictor, split)[1]
        used.append(split)
    texts = texts[:at_least]
    return texts, f"{len(texts)} samples of {cfg.run_dir} ({', '.join(used) or 'none'})"


def write_precision_predictions(cfg: PipelineConfig, precision: str) -> list[str]:
    """Test predictions of every trained variant's artifact at `precision`; returns the row names."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.student.artifact import load_student

    layout = RunLayout(cfg.run_dir)
    names = []
    for variant in PRIMARY_VARIANTS:   # the controls render their own texts: not served
        artifact = layout.student_artifact(variant)
        if not exists(f"{artifact}/student.json") or not exists(layout.predictions(variant)):
            continue
        predictor = load_student(artifact, precision=precision)
        samples, texts = _fitted(cfg, predictor, "test")
        probs = predictor.predict_proba(texts, 32)
        labels = samples.column("labels").to_pylist()
        table = pa.Table.from_arrays([
            samples.column("sample_id"), samples.column("subject_id"),
            pa.array(labels, PREDICTIONS.field("labels").type),
            pa.array(probs.astype(np.float32).tolist(), PREDICTIONS.field("probs").type)], schema=PREDICTIONS)
        name = precision_name(variant, precision)
        write_parquet(table, layout.predictions(name))
        log.info("%s: %s test predictions of %s (%d samples)", name, precision, artifact, len(texts))
        names.append(name)
    return names


__all__ = ["write_precision_predictions", "run_texts"]
