"""`ckd-ehr export-hf`: a student artifact as a Hugging Face text-classification model + model card.

    export_hf(artifact, out)  -> out/ with config.json (problem_type multi_label_classification,
                                 id2label = the 25 phenotypes), model.safetensors, tokenizer
                                 (model_max_length = the student's max_length), hf_modeling.py
                                 (see its docstring: BertForSequenceClassification pooled as
                                 trained), README.md (the model card), ckd_ehr_export.json
    push_to_hub(out, repo_id) -> refuses a model trained on credentialed data (MIMIC)

    from transformers import pipeline
    clf = pipeline("text-classification", model=out, top_k=None, trust_remote_code=True)
    clf(text, truncation=True)   # the artifact's probabilities, per phenotype

Weights trained on MIMIC-III/IV fall under the PhysioNet Credentialed Health Data License:
they may not be shared with anyone who has not signed it, so such an export is marked
restricted (config, card, ckd_ehr_export.json) and `push_to_hub` refuses it. An artifact that
does not record its data source is treated as restricted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
import torch

from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.storage import exists, local_dir, read_json, scratch_dir, upload_dir, write_json, write_text
from ckd_ehr.contracts import ARTIFACT_TOKENIZER, STUDENT_ENCODER, STUDENT_META
from ckd_ehr.student.model import HEAD_FILE, load_encoder

EXPORT_FILE = "ckd_ehr_export.json"
DATA_LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
CARD_METRICS = ("macro_auroc", "micro_auroc", "macro_f1", "micro_f1", "accuracy")


class RestrictedModelError(PermissionError):
    """The model was trained on credentialed data and may not be shared publicly."""


def data_source_of(meta: dict[str, Any], given: str | None = None) -> tuple[str, bool]:
    """(data source, restricted): the artifact's record wins; a different `given` is an error."""
    recorded = (meta.get("data") or {}).get("source")
    if recorded and given and given != recorded:
        raise ValueError(f"{STUDENT_META}: data.source is '{recorded}', not '{given}' as given")
    source = recorded or given or "unknown"
    return source, source != "synthetic"


def _metrics_rows(metrics_path: str | None, variant: str) -> tuple[list[str], str]:
    """Markdown rows of the test metrics with 95% intervals, and where they came from."""
    if not metrics_path or not exists(metrics_path):
        return [], "no evaluate/metrics.json was given or found: no test metrics"
    m = read_json(metrics_path)
    entry = (m.get("models") or {}).get(variant)
    if entry is None:
        return [], f"{metrics_path} has no row for variant '{variant}'"
    rows = []
    for mode, result in entry["modes"].items():
        for k in CARD_METRICS:
            v = result["metrics"].get(k)
            ci = (result.get("intervals") or {}).get(k)
            if v is None:
                continue
            lo, hi = (ci.get("lower"), ci.get("upper")) if isinstance(ci, dict) else (ci or [None, None])[:2]
            interval = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "n/a"
            rows.append(f"| {k} | {mode} | {v:.4f} | {interval} |")
    boot = m.get("bootstrap", {})
    return rows, (f"{metrics_path}: test split, n = {entry.get('n_samples')} samples of {entry.get('n_patients')} "
                  f"patients; 95% intervals from {boot.get('resamples')} bootstrap resamples over patients")


def model_card(meta: dict[str, Any], source: str, restricted: bool, metrics_path: str | None) -> str:
    variant = meta.get("variant", "ckd_ehr")
    rows, metrics_note = _metrics_rows(metrics_path, variant)
    data = meta.get("data") or {}
    split = data.get("split")
    header = ["---", "pipeline_tag: text-classification", "tags: [ckd-ehr, multi-label-classification, ehr]"]
    header += (["license: other", f"license_name: {DATA_LICENSE.lower().replace(' ', '-')}",
                "restricted: true"] if restricted else ["license: apache-2.0"])
    header.append("---")
    lines = header + [
        f"# CKD-EHR student ({variant})",
        "",
        "Next-visit phenotype prediction: given one hospital admission rendered as text (diagnoses, drugs, "
        "procedures and, for EADF variants, efficacy clauses), the probability of each of the 25 acute-care "
        "phenotypes of the MIMIC-III benchmark at the next admission. Distilled by ckd-ehr "
        "(CKD-EHR, arXiv 2506.15118).",
        "",
    ]
    if restricted:
        lines += [
            "## Data-use restriction",
            "",
            f"**Trained on credentialed data ({source}).** These weights fall under the {DATA_LICENSE} "
            "and its data-use agreement: they may be shared only with people who hold credentialed access "
            "and signed the agreement, never publicly (no public model hub, no public bucket). "
            "`ckd-ehr export-hf` marks them restricted and its push to a hub refuses them.",
            "",
        ]
    lines += [
        "## Data and split",
        "",
        f"- Source: {source}" + (" (a synthetic cohort in MIMIC-III table format: no patient data)"
                                 if source == "synthetic" else ""),
        f"- Split: {json.dumps(split) if split else 'not recorded in the artifact'} (by patient: no patient in two splits)",
        f"- Training samples: {(meta.get('metrics') or {}).get('train_samples', 'n/a')}; input: column "
        f"`{meta['text']['column']}`, at most {meta['max_length']} tokens",
        f"- Encoder: {meta.get('config', {}).get('model')}, pooling `{meta.get('pooling', 'mean')}`, artifact "
        f"`{meta.get('artifact_id')}`",
        "",
        "## Metrics (test split)",
        "",
        metrics_note,
        "",
    ]
    if rows:
        lines += ["| metric | thresholds | value | 95% interval |", "|---|---|---|---|", *rows, ""]
    lines += [
        "`fixed`: 0.5 for every phenotype; `tuned`: per phenotype, tuned on validation. Compare with the "
        "floors in the run's evaluate report (prevalence-only and baselines): a figure alone says little.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "clf = pipeline('text-classification', model='PATH', top_k=None, trust_remote_code=True)",
        "clf('The patient-acquired disease is ...', truncation=True)",
        "```",
        "",
        "`trust_remote_code=True` loads `hf_modeling.py` shipped here: BertForSequenceClassification with the "
        "student's pooling (mean of the last hidden states) in place of BERT's pooler; the stock class would "
        "give different probabilities. Input text must be rendered as in training (ckd-ehr's `render_input`, "
        "or `ckd-ehr serve`, which renders structured records itself).",
        "",
        "## Intended use and limits",
        "",
        "- Research on clinical knowledge distillation and next-visit risk; **not** a medical device, not for "
        "decisions about individual patients.",
        "- Trained on one cohort's coding and prescribing habits (ICD-9-CM, one hospital's drug names); "
        "it does not transfer to ICD-10 coding or other hospitals without retraining and validation.",
        "- Probabilities are not calibrated unless the evaluate report says so; thresholds matter.",
        "- Models trained on synthetic data show the pipeline works, not clinical performance.",
    ]
    return "\n".join(lines) + "\n"


def export_hf(artifact: str, out: str, metrics_path: str | None = None, data_source: str | None = None) -> dict:
    """Write the Hugging Face export of `artifact` (local path or URI) to `out` (local or URI)."""
    # not at module level: safetensors, loaded only when this runs
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ckd_ehr.student.hf_modeling import CkdEhrStudentConfig, CkdEhrStudentForSequenceClassification

    with local_dir(artifact) as d:
        d = Path(d)
        meta = json.loads((d / STUDENT_META).read_text())
        source, restricted = data_source_of(meta, data_source)
        encoder = load_encoder(d / STUDENT_ENCODER)
        if encoder.config.model_type != "bert":
            raise ValueError(f"{d / 'model'}: encoder model_type '{encoder.config.model_type}'; the export "
                             "supports BERT-family encoders (bert, e.g. MiniLM)")
        if meta.get("config", {}).get("token_bag"):
            raise ValueError(f"{d / STUDENT_META}: student trained with token_bag; the Hugging Face export has "
                             "no token-bag path (serve the artifact with `ckd-ehr serve`)")
        names = list(meta["label_names"])
        if names != phenotype_names():
            raise ValueError(f"{d / STUDENT_META}: label_names are not the 25 phenotypes in label order")
        base = {k: v for k, v in encoder.config.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version", "id2label", "label2id",
                              "problem_type", "num_labels")}
        cfg = CkdEhrStudentConfig(
            **base, student_pooling=meta.get("pooling", "mean"), num_labels=len(names),
            problem_type="multi_label_classification", id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)})
        cfg.ckd_ehr = {"artifact_id": meta["artifact_id"], "variant": meta.get("variant"), "data_source": source,
                       "restricted": restricted, "max_length": meta["max_length"],
                       "text_column": meta["text"]["column"]}
        model = CkdEhrStudentForSequenceClassification(cfg)
        model.bert.load_state_dict(encoder.state_dict(), strict=True)
        head = load_file(str(d / HEAD_FILE))
        model.classifier.load_state_dict({"weight": head["weight"], "bias": head["bias"]}, strict=True)
        if model.label_queries is not None:
            with torch.no_grad():
                model.label_queries.copy_(head["queries"])
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(d / ARTIFACT_TOKENIZER)
        tokenizer.model_max_length = int(meta["max_length"])
        CkdEhrStudentConfig.register_for_auto_class()
        CkdEhrStudentForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
        info = {"artifact_id": meta["artifact_id"], "variant": meta.get("variant"), "data_source": source,
                "restricted": restricted, "data_license": DATA_LICENSE if restricted else None,
                "max_length": meta["max_length"], "pooling": cfg.student_pooling}
        with scratch_dir("ckd-ehr-hf-") as tmp:
            with torch.no_grad():
                model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_text(f"{tmp}/README.md", model_card(meta, source, restricted, metrics_path))
            write_json(f"{tmp}/{EXPORT_FILE}", info)
            upload_dir(tmp, out)
    return info


def push_to_hub(export_dir: str, repo_id: str, private: bool = True) -> str:
    """Upload an export to a model hub; a restricted (credentialed-data) export is refused."""
    info = read_json(os.path.join(export_dir, EXPORT_FILE))
    if info.get("restricted", True):
        raise RestrictedModelError(
            f"{export_dir}: trained on {info.get('data_source', 'unrecorded')} data under the {DATA_LICENSE}; "
            "its weights may not be shared publicly: refusing to push to a hub")
    # not at module level: huggingface_hub, loaded only when this runs
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=export_dir, repo_id=repo_id)
    return repo_id


__all__ = ["export_hf", "push_to_hub", "model_card", "RestrictedModelError", "data_source_of"]
