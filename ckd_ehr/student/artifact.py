"""The student artifact (layout in ckd_ehr/contracts) and the predictor that loads it.

    model/                  encoder save_pretrained
    head.safetensors        the linear head
    tokenizer/
    student.json            config, label_names, thresholds {fixed, tuned, served}, metrics,
                            text options, max_length, pooling, artifact_id
    efficacy_table.parquet  the training efficacy table: Serve renders text as training did

Loading needs neither Ray nor DeepSpeed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ckd_ehr.config import TextConfig
from ckd_ehr.contracts import (ARTIFACT_TOKENIZER, PROBE_HEAD, SERVE_PRECISIONS, STUDENT_EFFICACY, STUDENT_ENCODER,
                               STUDENT_META)
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.storage import local_dir, upload_dir, write_json, write_parquet
from ckd_ehr.student.model import (HEAD_FILE, autocast_bf16, cpu_has_amx, load_student_model, predict_ids,
                                   quantize_int8, save_student)
from ckd_ehr.storage import read_parquet
from ckd_ehr.text import render_input, efficacy_for

log = logging.getLogger("ckd_ehr.student")


VOCABULARY_FILE = "vocabulary.json"
"""In a student artifact: {"drugs": [...], "procedures": [...]}, the items of the training split."""


def artifact_id(directory: str | os.PathLike) -> str:
    """Content hash of the weights (head + encoder files): same weights, same id."""
    h = hashlib.sha256()
    d = Path(directory)
    for f in [d / HEAD_FILE, *sorted((d / STUDENT_ENCODER).glob("*.safetensors"))]:
        h.update(f.read_bytes())
    return "student-" + h.hexdigest()[:12]


def write_artifact(dest: str, weights_dir: str | os.PathLike, tokenizer, meta: dict[str, Any],
                   efficacy_table, staging: str | os.PathLike,
                   diagnosis_titles: dict[str, str] | None = None,
                   vocabulary: dict[str, list[str]] | None = None) -> dict:
    """Assemble the artifact in local `staging` from a checkpoint's `weights_dir` (model/ +
    head.safetensors) and upload it to `dest` (local or URI) in one move. Returns the meta."""
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(Path(weights_dir) / STUDENT_ENCODER, staging / STUDENT_ENCODER)
    shutil.copy2(Path(weights_dir) / HEAD_FILE, staging / HEAD_FILE)
    if (Path(weights_dir) / PROBE_HEAD).exists():
        shutil.copy2(Path(weights_dir) / PROBE_HEAD, staging / PROBE_HEAD)
    tokenizer.save_pretrained(staging / ARTIFACT_TOKENIZER)
    write_parquet(efficacy_table, staging / STUDENT_EFFICACY)
    if diagnosis_titles:  # Serve renders ICD-9 codes with the titles training saw
        write_json(staging / "diagnosis_titles.json", diagnosis_titles)
    if vocabulary:  # Serve warns when a record names nothing the model saw in training
        write_json(staging / VOCABULARY_FILE, vocabulary)
    meta = {"artifact_id": artifact_id(staging), "label_names": phenotype_names(), **meta}
    write_json(staging / STUDENT_META, meta)
    upload_dir(staging, dest)
    return meta


class StudentPredictor:
    """A loaded student: texts -> [N, 25] probabilities, and what Serve needs to render text."""

    def __init__(self, directory: str | os.PathLike, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False):
        # not at module level: transformers, loaded only when this runs
        from transformers import AutoTokenizer

        from ckd_ehr.student.data import load_efficacy

        if precision not in SERVE_PRECISIONS:
            raise ValueError(f"precision '{precision}': one of {', '.join(SERVE_PRECISIONS)}")
        d = Path(directory)
        self.meta: dict[str, Any] = json.loads((d / STUDENT_META).read_text())
        self.device = device
        self.label_names: list[str] = list(self.meta["label_names"])
        self.max_length: int = int(self.meta["max_length"])
        self.text_column: str = self.meta["text"]["column"]
        self.text_config = TextConfig.model_validate(self.meta["text"]["config"])
        self.tokenizer = AutoTokenizer.from_pretrained(d / ARTIFACT_TOKENIZER)
        self.model = load_student_model(d, pooling=self.meta.get("pooling", "mean"), device=device)
        if precision == "int8":
            if device != "cpu":
                raise ValueError(f"precision int8 is dynamic quantisation for CPU; device is {device}")
            quantize_int8(self.model)
        elif precision == "bf16":
            if device == "cpu" and not cpu_has_amx():
                log.warning("precision bf16 on a CPU without AMX: measured slower than fp32 on such a "
                            "CPU (README \"Serve\"); serve.precision fp32 or int8 may serve faster here")
            autocast_bf16(self.model, device)
        self.precision = precision
        th = self.meta["thresholds"]
        self.thresholds_fixed = np.asarray(th["fixed"], dtype=np.float64)
        self.thresholds_tuned = np.asarray(th["tuned"], dtype=np.float64)
        self.thresholds = self.thresholds_tuned if th["served"] == "tuned" else self.thresholds_fixed
        self.efficacy_table = read_parquet(str(d / STUDENT_EFFICACY))
        _, eff = load_efficacy(str(d / STUDENT_EFFICACY), int(self.meta["text"]["top_k"]))
        # plain-text students were trained without efficacy clauses: they render none
        self.efficacy: dict[str, list[str]] = eff if self.text_column == "text_eadf" else {}
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.compiled = compile
        if compile:
            self._compile()

    def _compile(self) -> None:
        """torch.compile the encoder (dynamic shapes: one graph for every batch size above 1 and
        every length) and compile it now, on batches of 1 and 2 rows of two lengths, so the
        first request does not pay for it (about a minute on 2 cores for MiniLM-L6)."""

        self.model.encoder = torch.compile(self.model.encoder, dynamic=True)
        for n in (2, 1):
            ids = [[self.pad_id + 1] * (8 + 24 * i) for i in range(n)]
            predict_ids(self.model, ids, self.pad_id, 2, self.device)

    @property
    def artifact_id(self) -> str:
        return self.meta["artifact_id"]

    def render(self, diagnoses: Sequence[str], drugs: Sequence[str], procedures: Sequence[str],
               phenotypes_current: Sequence[int] | None = None) -> str:
        """Text of one visit exactly as training rendered it, fitted to max_length by section."""
        # not at module level: pandas, loaded only when this runs
        from ckd_ehr.student.data import fit_text

        eff = efficacy_for(phenotypes_current, self.efficacy) if phenotypes_current is not None else None
        text = render_input(diagnoses, drugs, procedures, efficacy=eff or None, cfg=self.text_config).text
        shrink = float(self.meta.get("config", {}).get("fit_shrink", 0.7))
        return fit_text(self.tokenizer, self.max_length, text, diagnoses, drugs, procedures, eff,
                        self.text_config, shrink)[0]

    def predict_proba(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, 25] probabilities. Batches are sorted by length and padded to their longest."""
        if not texts:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return predict_ids(self.model, ids, self.pad_id, batch_size, self.device)

    def predict(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[N, 25] 0/1 decisions at the served thresholds."""
        return (self.predict_proba(texts, batch_size) >= self.thresholds).astype(np.int8)


def load_student(artifact_dir: str | os.PathLike, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False) -> StudentPredictor:
    """Load a student artifact from a local path or a URI (copied to a temp dir first);
    precision `int8` quantises the encoder's linear layers (CPU), `bf16` runs it under bf16
    autocast (serve.precision); `compile` runs the encoder
    through torch.compile (compiled at load)."""
    if "://" in str(artifact_dir):
        with local_dir(artifact_dir) as d:
            return StudentPredictor(d, device=device, precision=precision, compile=compile)  # all read in __init__
    return StudentPredictor(artifact_dir, device=device, precision=precision, compile=compile)


__all__ = ["StudentPredictor", "load_student", "write_artifact", "save_student", "artifact_id"]
