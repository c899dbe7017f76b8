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

`--device cuda` runs the full-size speed check instead (ckd_ehr.bench.deepspeed_gpu: MFU of
LoRA training and of soft-label scoring of the 7B architecture, batch sizes swept, plain torch
and DeepSpeed ZeRO-3); `--device cpu` forces the in-process part onto the CPU.

`ckd-ehr bench zero3-load` (bench_zero3_load): per-worker peak memory of two Ray Train
workers training a ~0.5B Qwen2 under ZeRO-3, with and without partitioned loading.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from ckd_ehr.bench.common import emit, measure

from ckd_ehr.bench.deepspeed_gpu import QWEN25_7B
from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from ckd_ehr.bench.toy_samples import toy_samples, write_toy_samples
from ckd_ehr.bench.deepspeed_gpu import random_teacher
from ckd_ehr.teacher.data import Collate, make_examples, pad_id, predict_logits
from ckd_ehr.teacher.model import build_teacher, param_groups
from ckd_ehr.training import length_grouped_batches
from ckd_ehr.ray_utils import init_ray
from ckd_ehr.modeling.paths import resolve_model_path


def _texts(cfg, n: int) -> tuple[list[str], np.ndarray, str]:
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.train import read_texts_and_labels

    path = RunLayout(cfg.run_dir).augmented("train")
    if storage.exists(path):
        texts, labels = read_texts_and_labels(path, cfg.teacher.text_column)
        if len(texts) >= n:
            return texts[:n], labels[:n], path
    texts, labels = toy_samples(n, seed=0)
    return texts, labels, "toy"


def _random_qwen(tc, device: str, dtype: torch.dtype):
    """Qwen2.5-7B-sized backbone with random weights + LoRA + MLAPH, built on `device`."""

    return random_teacher(QWEN25_7B, device, dtype, tc.attn_implementation, tc.lora.rank,
                          tc.use_gradient_checkpointing(), tc.pooling)


def _peak(device: str) -> dict:
    if device == "cuda":
        return {"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_model(cfg, n: int, arch_only: bool, device: str) -> dict:
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.train import BCELoss, load_tokenizer

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

    examples = make_examples(texts, labels, tok, tc.max_length, tc.use_chat_template, tc.instruction)
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
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.run import train_teacher

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
    choice = getattr(args, "device", None) or "auto"
    if choice == "cuda":
        # not at module level: imported only on this branch
        from ckd_ehr.bench.deepspeed_gpu import main as gpu_main

        return gpu_main(["--device", "cuda"] + (["--out", args.out] if getattr(args, "out", None) else []))
    device = "cuda" if choice == "auto" and torch.cuda.is_available() else "cpu"
    n = getattr(args, "samples", None) or (256 if device == "cuda" else 32)
    # On CPU the in-process part stays short (a 135M LLM trains at ~1 sample/s at 256 tokens on 2 cores).
    n_model = n if device == "cuda" else min(n, 32)
    results = {"teacher_model": bench_model(cfg, n_model, bool(getattr(args, "arch_only", False)), device)}
    if getattr(args, "train_run", False):
        results["ray_train_run"] = bench_ray_run(cfg, n)
    emit(results, getattr(args, "out", None))
    return results


# Qwen2.5-0.5B's published architecture (494M parameters with its tied embeddings).
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def save_random_qwen(dest: str, arch: dict, tokenizer_src: str, gguf_file: str | None = None, seed: int = 0) -> int:
    """A randomly initialised Qwen2ForCausalLM of `arch` saved (safetensors) with a real
    tokenizer at `dest`; returns its parameter count."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM


    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**arch))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(dest)
    del model
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_src), **kw).save_pretrained(dest)
    return n


ZERO3_BOUNDED = {"stage3_max_live_parameters": 1e8, "stage3_max_reuse_distance": 1e8,
                 "stage3_prefetch_bucket_size": 1e7}
"""ZeRO-3 settings that bound what a worker holds gathered during training: DeepSpeed's defaults
(1e9 live parameters, reuse distance 1e9, prefetch 5e7) let a whole 0.5B model stay gathered on
every worker, which is what partitioning is meant to avoid; at 1e8 at most about a fifth of it
is live at once. The price is more gathers per step (on GPUs, where the gathers go to device
memory, DeepSpeed's defaults are usually the faster choice)."""


def bench_zero3_load(cfg, args) -> dict:
    """Two Ray Train CPU workers (gloo) train a randomly initialised ~0.5B Qwen2 teacher under
    ZeRO-3 for two steps, once with partitioned loading (teacher.zero3_partitioned_init) and
    once loading the full model on every worker first; prints each run's per-worker peak RSS
    (VmHWM, largest over the workers) right after the model is built and over the whole run,
    against the size of one full fp32 copy of the model."""
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.run import train_teacher

    init_ray(cfg.ray)
    res: dict = {"workers": 2, "backend": "gloo", "zero_stage": 3}
    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        model_dir = os.path.join(tmp, "qwen05b")
        t0 = time.perf_counter()
        n = save_random_qwen(model_dir, QWEN25_05B, cfg.teacher.model, cfg.teacher.gguf_file)
        res.update(model="Qwen2.5-0.5B architecture, random weights, saved with save_pretrained",
                   params=n, full_copy_fp32_mib=round(n * 4 / 2**20, 1), save_s=round(time.perf_counter() - t0, 1))
        lay = write_toy_samples(tmp, n_train=8, n_val=4, seed=0)
        runs = {}
        for partitioned in (True, False):
            tc = cfg.teacher.model_copy(update=dict(
                model=model_dir, gguf_file=None, strategy="deepspeed", num_workers=2, cpus_per_worker=1,
                use_gpu=False, dtype="float32",
                # Bounded gathers (ZERO3_BOUNDED, below), then the config's own ZeRO settings
                # (--set teacher.deepspeed.zero_optimization.KEY=VALUE), stage 3 forced.
                deepspeed={"zero_optimization": {**ZERO3_BOUNDED,
                                                 **(cfg.teacher.deepspeed.get("zero_optimization") or {}),
                                                 "stage": 3}},
                zero3_partitioned_init=partitioned, head_init="random", epochs=1, max_steps=2, batch_size=1,
                grad_accum=1,
                max_length=64, max_train_samples=8, max_eval_samples=4, checkpoint_every_steps=None,
                gradient_checkpointing=False))
            t0 = time.perf_counter()
            _, meta = train_teacher(tc, lay.augmented("train"), lay.augmented("val"), os.path.join(tmp, "train"),
                                    f"partitioned-{partitioned}", os.path.join(tmp, f"artifact-{partitioned}"))
            m = meta["metrics"]
            runs["partitioned" if partitioned else "full_load"] = {
                "wall_s": round(time.perf_counter() - t0, 1), "steps": m.get("final_step"),
                "local_param_fraction_after_build": m.get("local_param_fraction"),
                "worker_start_rss_mib": m.get("worker_start_rss_mib"),
                "worker_peak_rss_after_build_mib": m.get("worker_build_peak_rss_mib"),
                "worker_peak_rss_mib": m.get("worker_peak_rss_mib"),
                "peak_after_build_vs_full_copy": round(m["worker_build_peak_rss_mib"] / (n * 4 / 2**20), 3),
                "train_loss_first": m.get("train_loss_first"), "train_loss": m.get("train_loss")}
    res["runs"] = runs
    res["zero3"] = {**ZERO3_BOUNDED, **(cfg.teacher.deepspeed.get("zero_optimization") or {}), "stage": 3}
    res["note"] = ("peaks are VmHWM of the worker processes (max over the 2 workers), which include the Ray worker's "
                   "own baseline (worker_start_rss_mib) and, for worker_peak_rss_mib, AdamW state, activations and "
                   "the ZeRO-3 gathers of training (bounded by the zero_optimization settings in `zero3`); "
                   "full_copy_fp32_mib is the model's weights alone. Without "
                   "partitioned loading, from_pretrained memory-maps the checkpoint lazily, so its after-build "
                   "figure counts no weights yet: compare the whole-run peaks")
    emit(res, getattr(args, "out", None))
    return res
