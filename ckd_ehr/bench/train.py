"""`ckd-ehr bench train --model student|teacher`: training throughput on the run's EADF texts,
as a ratio to this machine's matrix-multiply peak measured in the same run.

    ckd-ehr bench train --config jobs/configs/demo.yaml --model student [--steps 20] [--samples 480]

Needs the run's `eadf` stage (RUN/eadf/samples). For each lever setting (today's recipe: full
fine-tune, fp32, the config's batch; a compact rendering; the top layers trained on cached
frozen states; bf16 autocast; all together) it builds the stage's real task and training loop
in this process (no Ray), times `steps` optimiser steps after one warm-up step, and prints:
samples/s, real and computed (padded) tokens/s, model FLOPs per step (forward 2 x matmul
parameters per token plus attention, backward 2x for layers whose weights train, 1x for layers
that only pass gradients down, nothing below the lowest trained layer) as GFLOP/s and as a
fraction of the fp32 and bf16 matmul peaks, the frozen cache's build time, and the estimated
time of one epoch over every training pair (cache included: building it for `--samples` rows,
scaled by tokens). Figures only; never asserted in tests.
"""
from __future__ import annotations

import logging
import time
import tempfile

import numpy as np
import pyarrow as pa

from ckd_ehr.bench.common import emit
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import RunLayout
from ckd_ehr.storage import exists, read_parquet, write_parquet
from ckd_ehr.data.samples import render_texts
from ckd_ehr.modeling.paths import resolve_model_path

log = logging.getLogger(__name__)

LEVERS = {
    "today": {},
    "compact": {"text": {"render": "compact"}},
    "top_layers": {"model": {"train_top_layers": 2}},
    "bf16": {"model": {"autocast": "on"}},
    "all": {"text": {"render": "compact"}, "model": {"train_top_layers": 2, "autocast": "auto"}},
}
"""Each lever alone, then together; `model` changes the student or teacher section. Today's
recipe forces autocast off (fp32), the others inherit that unless they set it."""


def matmul_peak(dtype_name: str, size: int = 1536, seconds: float = 2.0) -> float:
    """GFLOP/s of square matrix products at the torch threads this process has."""
    # not at module level: torch, loaded only when this runs
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - start) / 1e9


def layer_flops(cfg) -> tuple[float, float, int]:
    """(matmul FLOPs per token of one layer's forward, attention FLOPs per token per attended
    token, layers) from a Hugging Face config (BERT-like or decoder)."""
    h = cfg.hidden_size
    inter = cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    if getattr(cfg, "model_type", "") in ("bert", "roberta", "mpnet", "xlm-roberta"):
        params = 4 * h * h + 2 * h * inter
    else:   # q, k, v, o + gated MLP
        params = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * inter
    return 2.0 * params, 4.0 * heads * head_dim, int(cfg.num_hidden_layers)


def step_flops(cfg, batch_lengths: list[int], window: int | None, trained_layers: int, weights_train: bool,
               frozen_layers_cached: bool) -> float:
    """Model FLOPs of one optimiser step over rows of `batch_lengths` padded to the batch's width
    (what is computed); see the module docstring for the backward factors."""
    per_token, attn, layers = layer_flops(cfg)
    width = max(batch_lengths)
    tokens = width * len(batch_lengths)
    span = min(width, window) if window else width
    fwd_layer = tokens * (per_token + attn * span)
    bottom = layers - trained_layers
    fwd = fwd_layer * (trained_layers + (0 if frozen_layers_cached else bottom))
    bwd = fwd_layer * trained_layers * (2.0 if weights_train else 1.0)
    return fwd + bwd


def _apply(cfg, lever: dict, model_section: str):
    data = cfg.model_dump(mode="json")
    data[model_section] = {**data[model_section], "autocast": "off", **lever.get("model", {})}
    data["text"] = {**data["text"], **lever.get("text", {})}

    return build(PipelineConfig, data, source="bench train")


def bench_train(cfg, args) -> dict:
    # not at module level: torch, loaded only when this runs
    import torch


    which = args.model or "student"
    section = "student" if which == "student" else "teacher"
    layout = RunLayout(cfg.run_dir)
    if not exists(layout.augmented("train")):
        raise SystemExit(f"bench train needs the run's EADF texts: {layout.augmented('train')} is missing "
                         f"(run `ckd-ehr pipeline --config ... --to eadf` first)")
    steps = args.steps or 20
    samples = args.samples or 480
    torch.set_num_threads(max(1, round(getattr(cfg, section).cpus_per_worker)))
    results: dict = {"model": which, "steps": steps, "rows_cached_for_estimate": samples,
                     "peak_gflops": {d: round(matmul_peak(d), 1) for d in ("fp32", "bf16")}}
    log.info("matmul peak: %s GFLOP/s", results["peak_gflops"])
    levers = [name for name in LEVERS if name in (args.levers or ",".join(LEVERS)).split(",")]
    for name in levers:
        lcfg = _apply(cfg, LEVERS[name], section)
        results[name] = _measure(lcfg, which, steps, samples)
        log.info("%s: %s", name, {k: v for k, v in results[name].items() if not isinstance(v, dict)})
    base = results.get("today", {}).get("epoch_s")
    for name in levers:
        if base and results[name].get("epoch_s"):
            results[name]["epoch_speedup_vs_today"] = round(base / results[name]["epoch_s"], 2)
    emit(results, args.out)
    return results


def rerendered_run(cfg, tmp: str) -> str:
    """A run directory under `tmp` holding the run's EADF samples with both texts rendered anew
    under cfg.text (the EADF stage's own renderers, the run's efficacy table): what the EADF stage
    would have written with this text config. Returns its path."""

    # not at module level: pandas, ray, loaded only when this runs
    from ckd_ehr.eadf.run import fused_texts
    from ckd_ehr.eadf.stats import top_drugs

    src, dst = RunLayout(cfg.run_dir), RunLayout(f"{tmp}/run")
    table = read_parquet(src.efficacy_table)
    write_parquet(table, dst.efficacy_table)
    top = top_drugs(table, cfg.eadf.top_k)
    for split in ("train", "val", "test"):
        t = read_parquet(src.augmented(split))
        plain, _ = render_texts(t, cfg.text)
        columns = {"text_plain": pa.array(plain, pa.string()), "text_eadf": fused_texts(t, top, cfg.text)}
        for name, values in columns.items():
            t = t.set_column(t.column_names.index(name), name, values)
        write_parquet(t, dst.augmented(split))
    return dst.root


def _measure(cfg, which: str, steps: int, samples: int) -> dict:
    """Time `steps` optimiser steps of the stage's own task and loop, in this process."""

    # not at module level: torch, loaded only when this runs
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext
    from ckd_ehr.training.batching import length_grouped_batches

    section = cfg.student if which == "student" else cfg.teacher

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if cfg.text.render != "paper":   # the run's texts are the paper's: render them as this lever asks
            cfg = cfg.model_copy(update={"run_dir": rerendered_run(cfg, tmp)})
        # head_init random: the probe's fit is not part of a step; samples rows are enough to time steps
        over = {"head_init": "random", "max_train_samples": samples, "max_eval_samples": 16,
                "epochs": 1, "max_steps": steps + 1, "frozen_cache_dir": None} if which == "student" else \
            {"head_init": "random", "max_train_samples": samples, "max_eval_samples": 16, "epochs": 1,
             "max_steps": steps + 1}
        section = section.model_copy(update=over)
        task, n_train, all_train_tokens, model_config, window = _task(cfg, which, section, tmp)
        start = time.perf_counter()
        loop = TrainLoop(section, task, WorkerContext(), LocalReporter(tmp + "/ckpt"))
        setup_s = time.perf_counter() - start
        batches = length_grouped_batches(loop.train_len, loop.micro_bs, section.seed, 0, 1, 0)
        loop.engine.train(True)
        loop.train_step([batches[0]])   # warm-up: allocations, autocast caches
        real = computed = 0
        flops = 0.0
        t0 = time.perf_counter()
        for idx in batches[1: steps + 1]:
            lengths = [loop.train_len[i] for i in idx]
            real += sum(lengths)
            computed += max(lengths) * len(lengths)
            flops += step_flops(model_config, lengths, window, section.train_top_layers or model_config.num_hidden_layers,
                                which == "student", bool(section.train_top_layers))
            loop.train_step([idx])
        elapsed = time.perf_counter() - t0
        n_steps = len(batches[1: steps + 1])
        rows = n_steps * loop.micro_bs
        cache_s = loop.setup_metrics.get("frozen_cache_s", 0.0)
        cached_tokens = sum(loop.train_len) + sum(loop.val_len)
        # one epoch over every training pair: its steps at this rate, plus (top layers) the cache
        # built for all of them, scaled from this run's cache by tokens
        epoch_s = n_train / (rows / elapsed) + (cache_s * all_train_tokens / max(1, cached_tokens) if cache_s else 0.0)
        peak = {d: matmul_peak(d, seconds=1.0) for d in ("fp32", "bf16")}
        out = {"samples_per_s": round(rows / elapsed, 2), "real_tokens_per_s": round(real / elapsed),
               "computed_tokens_per_s": round(computed / elapsed), "gflops": round(flops / elapsed / 1e9, 1),
               "of_fp32_peak": round(flops / elapsed / 1e9 / peak["fp32"], 3),
               "of_bf16_peak": round(flops / elapsed / 1e9 / peak["bf16"], 3),
               "step_s": round(elapsed / n_steps, 3), "setup_s": round(setup_s, 1),
               "frozen_cache_s": cache_s, "frozen_cache_rows": len(loop.train) + len(loop.val),
               "autocast_bf16": bool(loop.engine.autocast), "train_top_layers": section.train_top_layers,
               "mean_tokens": round(float(np.mean(loop.train_len)), 1), "train_pairs": n_train,
               "epoch_s": round(epoch_s, 1),
               "autocast_timing": {k: v for k, v in loop.setup_metrics.items() if k.startswith("autocast_step")}}
        del loop
    return out


def _task(cfg, which: str, section, tmp: str):
    """(task, training pairs in the run, their tokens, the backbone's HF config, window)."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoConfig


    if which == "student":
        # not at module level: imported only on this branch
        from ckd_ehr.student.train import build_student_task

        full = cfg.model_copy(update={"student": section.model_copy(update={"max_train_samples": None})})
        built = build_student_task(full, "hard_eadf")
        lengths = [len(x) for x in built.prep.splits["train"].input_ids]
        built = build_student_task(cfg.model_copy(update={"student": section}), "hard_eadf")
        built.task.feature_cache, built.task.frozen_cache = None, None
        config = AutoConfig.from_pretrained(built.model_path)
        return built.task, len(lengths), sum(lengths), config, int(config.max_position_embeddings)
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.teacher.model import cut_config
    from ckd_ehr.teacher.train import TeacherData, teacher_task

    layout = RunLayout(cfg.run_dir)
    train_path, val_path = layout.augmented("train"), layout.augmented("val")
    every = TeacherData(section.model_copy(update={"max_train_samples": None, "max_eval_samples": 1}), train_path,
                        val_path)()[0]
    lengths = [int(e["length"]) for e in every]
    task = teacher_task(section, train_path, val_path)
    config = AutoConfig.from_pretrained(resolve_model_path(section.model),
                                        **({"gguf_file": section.gguf_file} if section.gguf_file else {}))
    if section.num_layers is not None:
        cut_config(config, min(section.num_layers, config.num_hidden_layers))
    return task, len(lengths), sum(lengths), config, None
