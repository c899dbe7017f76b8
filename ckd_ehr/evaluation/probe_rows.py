"""Evaluate's probe rows: each frozen pretrained model with the linear probe its training
started from (`head_init: probe`, saved in its artifact as contracts.PROBE_HEAD).

- `probe_teacher`: the frozen teacher backbone (no LoRA), pooled as the MLAPH pools, probe head;
  prompts built exactly as the teacher's (instruction, chat template, max_length).
- `probe_student`: the frozen student encoder (`student.model`), mean-pooled, probe head, on
  the CKD-EHR student's text (EADF clauses) fitted as in its training.

A fine-tuned model that does not beat its probe row learned nothing its frozen features did
not already give a logistic regression. Both probes were fitted on the model's own training
samples (C chosen on validation); here they are applied to validation (threshold tuning) and
test. A model trained with `head_init: random` has no probe in its artifact: no row, a note.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ckd_ehr import storage
from ckd_ehr.contracts import ARTIFACT_TOKENIZER, PROBE_HEAD, RunLayout, student_variant
from ckd_ehr.metrics import to_matrix
from ckd_ehr.evaluation.predictions import (as_predictions, kept_step, read_predictions, read_thresholds,
                                            reference_thresholds, teacher_predictions_from_soft_labels)
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.probe import LinearProbe
from ckd_ehr.modeling.prompts import encode_texts
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.student.data import encode, fit_texts, load_efficacy, read_split

log = logging.getLogger(__name__)

PROBE_ROLES = {
    "probe_teacher": "probe: frozen teacher backbone, pooled, logistic-regression head fitted on its training samples",
    "probe_student": "probe: frozen student encoder, mean-pooled, logistic-regression head fitted on its training "
                     "samples (EADF text)",
}


def _frame(samples: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """PREDICTIONS-shaped rows (evaluate's), sorted by sample_id as evaluate's other rows."""
    order = np.argsort(samples["sample_id"].to_numpy(), kind="stable")
    return as_predictions(samples.iloc[order].reset_index(drop=True), np.asarray(probs)[order])


def _thresholds(y_val: np.ndarray, p_val: np.ndarray) -> tuple[dict, dict]:
    return reference_thresholds(y_val, p_val)   # the reference rows' thresholds, the same for probes


def teacher_probe_row(cfg, layout: RunLayout):
    """(test frame, thresholds, details) of `probe_teacher`, or a note saying why there is none."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.modeling.collate import pad_id
    from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, cached_states, predict_through_cache
    from ckd_ehr.teacher.artifact import teacher_instruction
    from ckd_ehr.teacher.model import MLAPH, TeacherModel, load_backbone
    from ckd_ehr.teacher.train import teacher_frozen_cache

    art = layout.teacher_artifact
    path = storage.join(art, PROBE_HEAD)
    if not storage.exists(path):
        return None, f"no probe_teacher row: {path} not found (teacher trained with head_init: random?)"
    meta = storage.read_json(layout.teacher_meta)
    with storage.local_dir(art) as d:
        probe = LinearProbe.load(str(d / PROBE_HEAD))
    details = {"model": meta["base_model"], "pooling": meta["pooling"], "C": probe.c_value,
               "probe_val_macro_auroc": probe.val_macro_auroc, "train_samples": probe.train_samples,
               "text": meta.get("text_column", "text_eadf")}
    if (meta.get("metrics") or {}).get("step") == 0:
        # Checkpoint selection kept step 0: no update was ever applied (LoRA's B starts at zero),
        # so the teacher IS its probe and the soft labels already hold these predictions; scoring
        # the test split again would cost a whole teacher pass (~8 min on the demo) for the same numbers.

        test, val = (teacher_predictions_from_soft_labels(layout, s) for s in ("test", "val"))
        if test is not None and val is not None:
            thresholds, source = _thresholds(to_matrix(val["labels"], np.int8), np.stack(val["probs"]))
            return (test, thresholds, {**details, "threshold_source": source,
                                       "predictions": "the teacher's soft labels: it kept its probe (step 0)"}), None
    with storage.local_dir(art) as d:
        # not at module level: imported only on this branch
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(d / ARTIFACT_TOKENIZER))
    backbone = load_backbone(meta["base_model"], meta.get("gguf_file"), "float32",
                             meta.get("config", {}).get("attn_implementation", "sdpa"),
                             num_layers=meta.get("config", {}).get("num_layers"))
    model = TeacherModel(backbone, MLAPH(backbone.config.hidden_size, NUM_PHENOTYPES, meta["pooling"]))
    model.load_probe(probe)
    model.eval()
    column = meta.get("text_column", "text_eadf")
    chat = bool(meta.get("use_chat_template", True))
    max_eval = meta.get("config", {}).get("max_eval_samples")
    frozen = teacher_frozen_cache(layout, meta)
    if frozen is not None:   # the frozen part's states the teacher (val) and the soft labels (test) cached
        model.freeze_below(frozen[2])
        cache = LayerCache(frozen[0], frozen[1], CACHE_DTYPES[frozen[3]])
    out, found = {}, 0
    for split in ("val", "test"):
        df = storage.read_parquet(layout.augmented(split),
                                  columns=["sample_id", "subject_id", "labels", column]).to_pandas()
        if split == "val" and max_eval:
            df = df.iloc[:max_eval]
        ids = encode_texts(df[column].tolist(), tokenizer, int(meta["max_length"]), chat, teacher_instruction(meta))
        states = cached_states(cache, ids) if frozen else {}
        logits, _, hit = predict_through_cache(model, ids, pad_id(tokenizer), 16, NUM_PHENOTYPES, states)
        found += int(hit.sum())
        out[split] = (df, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
    details["rows_from_frozen_cache"] = found
    thresholds, source = _thresholds(to_matrix(out["val"][0]["labels"], np.int8), out["val"][1])
    return (_frame(out["test"][0], out["test"][1]), thresholds,
            {**details, "threshold_source": source, "predictions": "frozen backbone + probe, scored here"}), None


def student_probe_row(cfg, layout: RunLayout, variant: str | None = None):
    """(test frame, thresholds, details) of `probe_student`: the probe of `variant`'s artifact;
    None = the CKD-EHR student's, else (not trained in this run) hard_eadf's: the same text."""
    if variant is None:
        variant = next((v for v in ("ckd_ehr", "hard_eadf")
                        if storage.exists(storage.join(layout.student_artifact(v), PROBE_HEAD))), "ckd_ehr")
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, cached_states, layer_cache_key, predict_through_cache
    from ckd_ehr.modeling.token_bag import token_bag_for
    from ckd_ehr.training.batching import split_limit
    from ckd_ehr.student.model import build_student, predict_ids

    art = layout.student_artifact(variant)
    path = storage.join(art, PROBE_HEAD)
    if not storage.exists(path):
        return None, f"no probe_student row: {path} not found (student trained with head_init: random?)"
    s = cfg.student
    with storage.local_dir(art) as d:
        probe = LinearProbe.load(str(d / PROBE_HEAD))
    column = student_variant(variant).text_column
    details = {"model": s.model, "pooling": s.pooling, "C": probe.c_value, "variant": variant,
               "probe_val_macro_auroc": probe.val_macro_auroc, "train_samples": probe.train_samples, "text": column}

    if kept_step(layout, variant) == 0 and storage.exists(layout.predictions(variant)):
        # Checkpoint selection kept step 0: no update was applied, so the student IS its probe and
        # its test predictions (and thresholds tuned on its validation predictions) already exist;
        # scoring val and test again would cost ~2.5 min on the demo for the same numbers.
        thresholds, source = read_thresholds(layout, variant)
        return (read_predictions(layout.predictions(variant)), thresholds,
                {**details, "threshold_source": source,
                 "predictions": f"{variant}'s test predictions: it kept its probe (step 0)"}), None
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(s.model), model_max_length=s.max_length)
    bag = token_bag_for(tokenizer, cfg.text) if s.token_bag else None
    model = build_student(s.model, s.pooling, s.seed, token_bag=bag)
    model.load_probe(probe)
    model.eval()
    cache = None
    directory = s.frozen_cache_dir or layout.student_frozen_cache
    if s.train_top_layers and storage.exists(directory):   # the states the student stage cached
        model.freeze_below(s.train_top_layers)
        cache = LayerCache(directory, layer_cache_key(s.model, s.train_top_layers, s.frozen_cache_dtype),
                           CACHE_DTYPES[s.frozen_cache_dtype])
    _, efficacy = load_efficacy(layout.efficacy_table, cfg.eadf.top_k)
    out, found = {}, 0
    for split in ("val", "test"):
        samples, _ = read_split(layout.augmented(split), None, split_limit(s, split), seed=s.seed)
        texts, _ = fit_texts(samples, tokenizer, s.max_length, column, efficacy, cfg.text, s.fit_shrink)
        enc = encode(samples, None, texts, tokenizer, s.max_length)
        if cache is None:
            probs = predict_ids(model, enc.input_ids, tokenizer.pad_token_id or 0)
        else:
            logits, _, hit = predict_through_cache(model, enc.input_ids, tokenizer.pad_token_id or 0, 32,
                                                   NUM_PHENOTYPES, cached_states(cache, enc.input_ids))
            probs, found = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), found + int(hit.sum())
        out[split] = (samples.select(["sample_id", "subject_id", "labels"]).to_pandas(), probs)
    details["rows_from_frozen_cache"] = found
    thresholds, source = _thresholds(to_matrix(out["val"][0]["labels"], np.int8), out["val"][1])
    return (_frame(out["test"][0], out["test"][1]), thresholds,
            {**details, "threshold_source": source, "predictions": "frozen encoder + probe, scored here"}), None


def probe_rows(cfg, layout: RunLayout) -> tuple[dict, list[str]]:
    """{name: (test frame, thresholds, details)} of the probe rows that can be computed, and notes."""
    rows, notes = {}, []
    for name, fn in (("probe_teacher", teacher_probe_row), ("probe_student", student_probe_row)):
        row, note = fn(cfg, layout)
        if row is not None:
            rows[name] = row
            log.info("%s: computed (probe C=%s)", name, row[2]["C"])
        if note:
            notes.append(note)
    return rows, notes
