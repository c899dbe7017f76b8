"""`ckd-ehr bench teacher`: teacher training and inference throughput, on CPU or a CUDA GPU.

In-process (no Ray), on the device found (CUDA if available): LoRA + head training steps
(forward, backward, AdamW) over `--samples` samples in length-grouped batches of
teacher.batch_size, then predict_logits over the same samples. Prints samples/s, tokens/s
and peak memory (CUDA: max allocated; CPU: peak RSS).

Model: teacher.model from the config (default SmolLM2-135M GGUF), or with `--arch-only` a
Qwen2.5-7B-sized Qwen2 with random weights built from its published config (bf16 on GPU;
no download), to size the full-scale teacher on one GPU. Samples: RUN/eadf/samples/train
when the run has them, else the toy set.

With `--train-run`: also a short end-to-end `ckd-ehr teacher` run on Ray Train (`--samples`
training samples, 1 epoch, RUN/eadf samples or the toy set) reporting wall time, samples/s
and validation macro-F1 / macro-AUROC. On CPU the in-process part uses at most 32 samples.

GPU example: `ckd-ehr bench teacher --arch-only --samples 256 --set teacher.max_length=1024
--set teacher.batch_size=8 --set teacher.gradient_checkpointing=true`.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from .common import emit, measure

# Qwen2.5-7B-Instruct's published architecture (config.json of the hub model).
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _texts(cfg, n: int) -> tuple[list[str], np.ndarray, str]:
    from .. import storage
    from ..contracts import RunLayout
    from ..teacher.toy import toy_samples
    from ..teacher.train import read_texts_and_labels

    path = RunLayout(cfg.run_dir).augmented("train")
    if storage.exists(path):
        texts, labels = read_texts_and_labels(path, cfg.teacher.text_column)
        if len(texts) >= n:
            return texts[:n], labels[:n], path
    texts, labels = toy_samples(n, seed=0)
    return texts, labels, "toy"


def _random_qwen(tc, device: str, dtype: torch.dtype):
    """Qwen2.5-7B-sized backbone with random weights + LoRA + MLAPH, built on `device`."""
    from transformers import AutoModel, Qwen2Config

    from ..phenotypes import NUM_PHENOTYPES
    from ..teacher.model import MLAPH, TeacherModel, add_lora

    conf = Qwen2Config(**QWEN25_7B)
    with torch.device(device):
        backbone = AutoModel.from_config(conf, dtype=dtype, attn_implementation=tc.attn_implementation)
    if tc.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = add_lora(backbone, tc.lora.rank, tc.lora.alpha, tc.lora.dropout, tc.lora.target_modules)
    return TeacherModel(backbone, MLAPH(conf.hidden_size, NUM_PHENOTYPES, tc.pooling)).to(device)


def _peak(device: str) -> dict:
    if device == "cuda":
        return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(cfg, n: int, arch_only: bool, device: str) -> dict:
    from ..teacher.data import Collate, make_examples, pad_id, predict_logits
    from ..teacher.model import build_teacher, param_groups
    from ..teacher.train import BCELoss, load_tokenizer
    from ..training import length_grouped_batches

    tc = cfg.teacher
    texts, labels, source = _texts(cfg, n)
    tok = load_tokenizer(tc)
    res: dict = {"device": device, "samples": len(texts), "source": source, "max_length": tc.max_length,
                 "batch_size": tc.batch_size}
    t0 = time.perf_counter()
    if arch_only:
        if device != "cuda" and not os.environ.get("CKD_EHR_BENCH_ALLOW_CPU_7B"):
            raise RuntimeError("--arch-only builds a 7.6B-parameter model: run it on a CUDA GPU "
                               "(or set CKD_EHR_BENCH_ALLOW_CPU_7B=1 with >= 40 GiB of RAM)")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = _random_qwen(tc, device, dtype)
        res["model"] = "Qwen2.5-7B architecture, random weights"
    else:
        model = build_teacher(tc, seed=0).to(device)
        res["model"] = tc.model
    _sync(device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    res["params_total"] = sum(p.numel() for p in model.parameters())
    res["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    examples = make_examples(texts, labels, tok, tc.max_length, tc.use_chat_template)
    res["mean_tokens"] = float(np.mean([e["length"] for e in examples]))
    collate, loss_fn = Collate(pad_id(tok)), BCELoss()
    opt = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr))
    batches = length_grouped_batches([e["length"] for e in examples], tc.batch_size, seed=0, epoch=0)

    def step(idx):
        inputs, y = collate([examples[i] for i in idx])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        loss = loss_fn(model(**inputs), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(inputs["attention_mask"].sum())

    model.train()
    step(batches[0])                 # warm-up: kernels, allocator
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    m: dict = {}
    with measure("train", m):
        t0, tokens = time.perf_counter(), 0
        for idx in batches:
            tokens += step(idx)
        _sync(device)
        wall = time.perf_counter() - t0
    res["train"] = {"samples_per_s": round(len(texts) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
                    "wall_s": round(wall, 2), **_peak(device), "peak_rss_mib": m["train"]["peak_rss_mib"]}

    bs = max(16, 2 * tc.batch_size)
    predict_logits(model, tok, texts[:bs], batch_size=bs, max_length=tc.max_length, device=device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with measure("infer", m):
        t0 = time.perf_counter()
        predict_logits(model, tok, texts, batch_size=bs, max_length=tc.max_length, device=device)
        _sync(device)
        wall = time.perf_counter() - t0
    tokens = sum(e["length"] for e in examples)
    res["infer"] = {"batch_size": bs, "samples_per_s": round(len(texts) / wall, 2),
                    "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2), **_peak(device),
                    "peak_rss_mib": m["infer"]["peak_rss_mib"]}
    return res


def bench_ray_run(cfg, n: int) -> dict:
    """A short end-to-end teacher run on Ray Train (1 epoch) in a temporary run directory."""
    from .. import storage
    from ..contracts import RunLayout
    from ..ray_utils import init_ray
    from ..teacher.toy import write_toy_samples
    from ..teacher.train import train_teacher

    tc = cfg.teacher.model_copy(update={"epochs": 1, "max_train_samples": n,
                                        "max_eval_samples": cfg.teacher.max_eval_samples or max(50, n // 4)})
    src = RunLayout(cfg.run_dir)
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        if storage.exists(src.augmented("train")) and storage.exists(src.augmented("val")):
            train, val, source = src.augmented("train"), src.augmented("val"), cfg.run_dir
        else:
            lay = write_toy_samples(tmp, n_train=n, n_val=tc.max_eval_samples, seed=0)
            train, val, source = lay.augmented("train"), lay.augmented("val"), "toy"
        init_ray(cfg.ray)
        t0 = time.perf_counter()
        result, meta = train_teacher(tc, train, val, os.path.join(tmp, "train"), "bench",
                                     os.path.join(tmp, "artifact"))
        wall = time.perf_counter() - t0
    m = meta["metrics"]
    return {"source": source, "train_samples": n, "val_samples": tc.max_eval_samples, "strategy": tc.strategy,
            "num_workers": tc.num_workers, "max_length": tc.max_length, "wall_s": round(wall, 1),
            "steps": m.get("final_step"), "train_samples_per_s": round(m.get("train_samples_per_s") or 0, 2),
            "val_macro_f1": m.get("val_macro_f1"), "val_macro_auroc": m.get("val_macro_auroc"),
            "val_loss": m.get("val_loss")}


def bench_teacher(cfg, args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = getattr(args, "samples", None) or (256 if device == "cuda" else 32)
    # On CPU the in-process part stays short (a 135M LLM trains at ~1 sample/s at 256 tokens on 2 cores).
    n_model = n if device == "cuda" else min(n, 32)
    results = {"teacher_model": bench_model(cfg, n_model, bool(getattr(args, "arch_only", False)), device)}
    if getattr(args, "train_run", False):
        results["ray_train_run"] = bench_ray_run(cfg, n)
    emit(results, getattr(args, "out", None))
    return results
