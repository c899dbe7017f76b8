"""The teacher: decoder LLM + LoRA + MLAPH head, trained on Ray Train (ddp or DeepSpeed).

Public interface (others code against these):
    run_teacher(cfg: PipelineConfig) -> dict                      the `ckd-ehr teacher` stage
    load_teacher(artifact_dir, device="cpu", dtype=None, merge_lora=True)
        -> (TeacherModel, tokenizer, meta)                        no Ray, no DeepSpeed; eval mode
    TeacherModel.forward(input_ids, attention_mask) -> logits [B, 25]
    build_prompts(texts, tokenizer, use_chat_template) -> list[str]
    predict_logits(model, tokenizer, texts, batch_size=16, max_length=1024, device="cpu")
        -> np.ndarray [N, 25] in input order
    encode_texts(texts, tokenizer, max_length, use_chat_template=True, instruction_kind="paper") -> token ids as trained

Imported lazily, so `ckd_ehr.teacher.model` alone needs only torch (+ transformers, peft when
called): the standalone GPU benchmark (ckd_ehr.bench.deepspeed_gpu) imports it on machines
that have no Ray, pyarrow or pydantic.
"""
from __future__ import annotations

import importlib

_WHERE = {"load_teacher": "artifact", "write_artifact": "artifact", "predict_logits": "data",
          "build_prompts": "ckd_ehr.modeling.prompts", "encode_texts": "ckd_ehr.modeling.prompts",
          "TeacherModel": "model", "MLAPH": "model",
          "build_teacher": "model"}


def run_teacher(cfg):
    # not at module level: safetensors, torch, loaded only when this runs
    from ckd_ehr.teacher.run import run_teacher as _run

    return _run(cfg)


def __getattr__(name: str):
    if name in _WHERE:
        where = _WHERE[name]
        return getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["run_teacher", "load_teacher", "predict_logits", "build_prompts", "encode_texts", "TeacherModel", "MLAPH",
           "build_teacher", "write_artifact"]
