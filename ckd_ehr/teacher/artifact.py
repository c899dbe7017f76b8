"""The teacher artifact: one format whatever the training strategy (ddp, ZeRO-2, ZeRO-3).

    artifact/
      adapter/            peft save_pretrained of the LoRA weights only (no base weights)
      head.safetensors    MLAPH parameters (teacher.head: mlaph)
      calibration.json    per-phenotype score -> probability map fitted on validation (teacher.head: generative)
      tokenizer/          tokenizer save_pretrained (with its chat template)
      teacher.json        config, label_names, metrics, base model spec, gguf_file, pooling,
                          artifact_id (short hash of the weights and config)

Loads with plain transformers + peft: no Ray, no DeepSpeed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
import shutil

import torch
from safetensors.torch import load_file, save_file

from ckd_ehr import storage
from ckd_ehr.contracts import (ARTIFACT_HEAD, ARTIFACT_TOKENIZER, PROBE_HEAD, TEACHER_ADAPTER, TEACHER_CALIBRATION,
                               TEACHER_META)
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names
from ckd_ehr.teacher.generative import AnswerVocabulary, GenerativeTeacher, ScoreCalibration
from ckd_ehr.teacher.model import MLAPH, TeacherModel, load_backbone, quiet_peft_deprecation


class SaveTeacherWeights:
    """Checkpoint hook for `training.fit`: writes adapter/ and head.safetensors from the
    (gathered, full) trainable state dict, so every checkpoint is already in artifact form."""

    def __call__(self, model: TeacherModel, state_dict: dict[str, torch.Tensor], out_dir: str) -> None:
        write_weights(model, state_dict, out_dir)


def write_weights(model, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> None:
    """adapter/ (+ head.safetensors for an MLAPH teacher) from the trainable state dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, GenerativeTeacher):   # no head: the LM reads its answer from its vocabulary
        adapter = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        model.lm.save_pretrained(str(out / TEACHER_ADAPTER), state_dict=adapter, save_embedding_layers=False)
        return
    adapter = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    # train_top_layers froze the LoRA weights of the layers below the top: not in the trainable
    # state, still part of the adapter (at their initial values, B = 0: no change to those layers)
    adapter.update({name: p.detach().cpu() for name, p in model.backbone.named_parameters()
                    if "lora_" in name and not p.requires_grad and name not in adapter})
    head = {k[len("head."):]: v.detach().float().cpu().contiguous() for k, v in state_dict.items()
            if k.startswith("head.")}
    # peft filters the given state dict down to LoRA keys and strips the adapter name. LoRA never
    # trains the embeddings: save_embedding_layers=False also skips peft's look for the base's
    # config.json, which warns for a GGUF or pkg: base ("Could not find a config file ...").
    model.backbone.save_pretrained(str(out / TEACHER_ADAPTER), state_dict=adapter, save_embedding_layers=False)
    save_file(head, str(out / ARTIFACT_HEAD))


def _digest(local: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name != TEACHER_META:
            h.update(p.relative_to(local).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def write_artifact(weights_dir: str | os.PathLike, tokenizer, cfg, metrics: dict, dest: str,
                   calibration: ScoreCalibration | None = None) -> dict:
    """Assemble the artifact from a checkpoint's adapter/ + head.safetensors (an MLAPH teacher)
    or adapter/ + the validation calibration (a generative one) and upload it to `dest` (local
    or URI) atomically. Returns teacher.json's contents."""

    head = getattr(cfg, "head", "mlaph")
    if head == "generative" and calibration is None:
        raise ValueError("a generative teacher's artifact needs its score calibration (fitted on validation)")
    with storage.local_dir(str(weights_dir)) as src, storage.scratch_dir("teacher-art-") as tmp:
        local = Path(tmp) / "artifact"
        local.mkdir()
        shutil.copytree(src / TEACHER_ADAPTER, local / TEACHER_ADAPTER)
        if head == "generative":
            (local / TEACHER_CALIBRATION).write_text(calibration.to_json())
        else:
            shutil.copy2(src / ARTIFACT_HEAD, local / ARTIFACT_HEAD)
        if (src / PROBE_HEAD).exists():
            shutil.copy2(src / PROBE_HEAD, local / PROBE_HEAD)
        tokenizer.save_pretrained(str(local / ARTIFACT_TOKENIZER))
        config = cfg.model_dump(mode="json")
        meta = {
            "kind": "ckd-ehr-teacher",
            "artifact_id": hashlib.sha256((_digest(local) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:12],
            "head": head,
            "base_model": cfg.model,
            "gguf_file": cfg.gguf_file,
            "pooling": cfg.pooling,
            "num_labels": NUM_PHENOTYPES,
            "label_names": phenotype_names(),
            "use_chat_template": cfg.use_chat_template,
            "instruction": cfg.instruction,
            "text_column": cfg.text_column,
            "max_length": cfg.max_length,
            "metrics": metrics,
            "config": config,
            "created_unix": int(time.time()),
        }
        (local / TEACHER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        storage.upload_dir(local, dest)
    return meta


def teacher_instruction(meta: dict) -> str:
    """The instruction the teacher was trained with; artifacts from before the choice existed
    were all trained with the release's (`paper`)."""
    return meta.get("instruction") or meta.get("config", {}).get("instruction") or "paper"


def load_teacher(artifact_dir: str, device: str = "cpu", dtype=None, merge_lora: bool = True):
    """(TeacherModel in eval mode, tokenizer, teacher.json) from an artifact (local or URI).

    `dtype` None uses the training dtype; `merge_lora` folds the adapters into the base
    weights (faster inference, same outputs up to rounding)."""
    # not at module level: peft, loaded only when this runs
    from peft import PeftModel
    from transformers import AutoTokenizer

    with storage.local_dir(artifact_dir) as d:
        meta = json.loads((d / TEACHER_META).read_text())
        cfg = meta["config"]
        if dtype is None:  # the training dtype; `auto` = bfloat16 on a GPU, float32 elsewhere
            dtype = cfg.get("dtype", "float32")
            if dtype == "auto":
                dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        generative = meta.get("head", "mlaph") == "generative"
        backbone = load_backbone(meta["base_model"], meta.get("gguf_file"), dtype,
                                 cfg.get("attn_implementation", "sdpa"), lm_head=generative,
                                 num_layers=cfg.get("num_layers"))
        with quiet_peft_deprecation():
            backbone = PeftModel.from_pretrained(backbone, str(d / TEACHER_ADAPTER))
        if merge_lora:
            backbone = backbone.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(d / ARTIFACT_TOKENIZER))
        if generative:
            # not at module level: imported only on this branch
            from ckd_ehr.modeling.collate import pad_id

            model = GenerativeTeacher(backbone, AnswerVocabulary.build(tokenizer), pad_id(tokenizer),
                                      ScoreCalibration.from_json((d / TEACHER_CALIBRATION).read_text())).to(device)
        else:
            head = MLAPH(backbone.config.hidden_size, meta.get("num_labels", NUM_PHENOTYPES), meta["pooling"])
            head.load_state_dict(load_file(str(d / ARTIFACT_HEAD)))
            model = TeacherModel(backbone, head).to(device)
    model.use_chat_template = bool(meta.get("use_chat_template", True))
    model.instruction_kind = teacher_instruction(meta)
    model.eval()
    return model, tokenizer, meta
