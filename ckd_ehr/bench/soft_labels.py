"""`ckd-ehr bench soft-labels`: teacher inference, naive loop vs length-sorted batches vs Ray Data.

Same teacher, same samples, three ways:
  naive     one sample at a time, padded to max_length (the authors' released loop), timed on
            the first NAIVE_SAMPLES samples (each costs the same)
  sorted    in-process, rows sorted by length, padded per sub-batch (`soft_labels.score_ids`)
  ray_data  the stage's path: Ray Data read + actor pool (includes actor start and model load)
  units     `sorted` plus the multi-granularity targets (soft_labels.unit_targets: unit maps,
            label attention when the teacher pools by it, relations), with their parquet bytes
Achieved FLOP/s = 2 * non-embedding params * tokens computed / wall, against the measured
fp32 matmul peak of this machine. Figures are printed (and written with --out), never asserted.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import TEACHER_META, RunLayout
from ckd_ehr.bench.common import emit, measure
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.ray_utils import init_ray
from ckd_ehr.text import diagnosis_title_column
from ckd_ehr.bench.common import measure as timed

log = logging.getLogger(__name__)

NAIVE_SAMPLES = 16
"""Samples timed in the naive loop (its per-sample cost does not depend on the sample)."""


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an n x n torch.matmul on this machine (all intra-op threads)."""
    # not at module level: torch, loaded only when this runs
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def non_embedding_params(model) -> int:
    """Parameters that take part in per-token matmuls (embedding lookups are not FLOPs)."""
    # not at module level: torch, loaded only when this runs
    import torch

    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def _samples(layout: RunLayout, n: int, text_column: str, extra: tuple[str, ...] = ()) -> pa.Table:
    for split in ("test", "val", "train"):
        path = layout.augmented(split)
        if storage.exists(path):
            t = storage.read_parquet(path, columns=["sample_id", text_column, *extra])
            if t.num_rows:
                return t.slice(0, n)
    raise FileNotFoundError(f"{layout.root}: no samples under eadf/samples/ (run the pipeline up to eadf first)")


def untrained_artifact(teacher_cfg, dest: str) -> str:
    """A teacher artifact written by the teacher package from the configured backbone with
    fresh LoRA and head (no training): same shapes and cost as a trained one."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.teacher import build_teacher, write_artifact
    from ckd_ehr.teacher.artifact import write_weights

    model = build_teacher(teacher_cfg, seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head.")}
    kw = {"gguf_file": teacher_cfg.gguf_file} if teacher_cfg.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(resolve_model_path(teacher_cfg.model), **kw)
    weights = dest + ".weights"
    write_weights(model, state, weights)
    write_artifact(weights, tok, teacher_cfg, {}, dest)
    return dest


def naive_loop(model, ids: list[list[int]], pad_token_id: int, max_length: int) -> tuple[np.ndarray, int]:
    """The released style: batch of one, padded to max_length. Returns (logits, tokens computed)."""
    # not at module level: torch, loaded only when this runs
    import torch

    out = []
    with torch.inference_mode():
        for x in ids:
            input_ids = torch.full((1, max_length), pad_token_id, dtype=torch.long)
            mask = torch.zeros((1, max_length), dtype=torch.long)
            input_ids[0, :len(x)] = torch.as_tensor(x)
            mask[0, :len(x)] = 1
            out.append(model.forward(input_ids, mask).float().numpy())
    return np.concatenate(out), len(ids) * max_length


def bench_soft_labels(cfg, args) -> dict:
    # The untrained artifact (when the run has no trained teacher) lives only for the bench.
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        return _bench(cfg, args, tmp)


def _naive_pass(model, tok, texts: list[str], text_options: tuple, timings: dict):
    """(rows, their ids, logits, computed tokens) of the authors' loop (batch 1, padded to
    max_length), timed. Every naive pass costs the same, so its rate from the first
    NAIVE_SAMPLES samples holds for all of them; rates are per sample timed."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.soft_labels.scoring import tokenize
    from ckd_ehr.teacher.data import pad_id

    chat, max_length, instr = text_options
    n_naive = min(len(texts), NAIVE_SAMPLES)
    log.info("naive loop: %d samples, batch 1, padded to %d", n_naive, max_length)
    with measure("naive", timings):
        naive_ids = tokenize(tok, texts[:n_naive], chat, max_length, instr)
        naive_logits, naive_tokens = naive_loop(model, naive_ids, pad_id(tok), max_length)
    return n_naive, naive_ids, naive_logits, naive_tokens


def _ray_data_pass(cfg, table, artifact: str, cores: int, timings: dict):
    """(the SoftLabelsConfig used, the scored rows) of one timed Ray Data pass over `table`."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.soft_labels.ray_scoring import infer_soft_labels

    init_ray(cfg.ray)
    sl = cfg.soft_labels
    # One actor using every core unless the config says otherwise: a like-for-like comparison
    # with the in-process runs, which also use every core.
    ray_cfg = sl.model_copy(update={"torch_threads": sl.torch_threads or max(1, cores // sl.num_actors)})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.parquet")
        storage.write_parquet(table, path)
        log.info("Ray Data: %d actor(s), %s CPU, %s torch threads", ray_cfg.num_actors, ray_cfg.cpus_per_actor,
                 ray_cfg.torch_threads)
        with measure("ray_data", timings):
            out = infer_soft_labels({"bench": path}, artifact, ray_cfg)["bench"]
    return ray_cfg, out


def _rates(t: dict, samples: int, useful: int, computed: int, params: int, peak: float) -> None:
    """Add to a timing its rates: samples and real tokens per second, achieved GFLOP/s and the
    fractions of the matmul peak (of the computed tokens, and of the useful ones)."""
    wall = t["wall_s"]
    t["samples"] = samples
    t["samples_per_s"] = round(samples / wall, 3)
    t["real_tokens_per_s"] = round(useful / wall, 1)
    t["tokens_computed"] = computed
    t["achieved_gflops"] = round(2 * params * computed / wall / 1e9, 2)
    t["fraction_of_peak"] = round(2 * params * computed / wall / peak, 4)
    t["useful_fraction_of_peak"] = round(2 * params * useful / wall / peak, 4)


def _bench(cfg, args, tmp_dir: str) -> dict:
    # not at module level: torch, loaded only when this runs
    import torch

    from ckd_ehr.soft_labels.scoring import score_ids, teacher_text_column, teacher_text_options, tokenize
    from ckd_ehr.teacher import load_teacher

    layout = RunLayout(cfg.run_dir)
    artifact = layout.teacher_artifact
    trained = storage.exists(storage.join(artifact, TEACHER_META))
    if not trained:
        log.info("no trained teacher in %s: building an untrained one from %s", layout.root, cfg.teacher.model)
        artifact = untrained_artifact(cfg.teacher, os.path.join(tmp_dir, "artifact"))
    n = args.samples or 64
    text_column = teacher_text_column(artifact)

    unit_columns = (diagnosis_title_column(cfg.text), "drugs", "procedure_titles")
    table = _samples(layout, n, text_column, unit_columns)
    texts = table.column(text_column).to_pylist()
    sl = cfg.soft_labels
    cores = os.cpu_count() or 1
    res: dict = {"samples": len(texts), "artifact": artifact, "trained_teacher": trained, "cores": cores}

    torch.set_num_threads(cores)
    peak = matmul_peak_flops()
    res["matmul_peak_gflops"] = round(peak / 1e9, 1)

    model, tok, meta = load_teacher(artifact, device="cpu", merge_lora=True)
    chat, max_length, instr = teacher_text_options(meta, sl.max_length)
    params = non_embedding_params(model)
    ids = tokenize(tok, texts, chat, max_length, instr)
    real_tokens = sum(len(x) for x in ids)
    res.update(teacher_id=meta["artifact_id"], non_embedding_params=params, max_length=max_length,
               real_tokens=real_tokens, mean_tokens=round(real_tokens / len(texts), 1))

    # Warm-up: the first forward pass pays one-time allocation costs; no timed phase should.
    score_ids(model, tok, ids[:1], 1)
    timings: dict = {}
    n_naive, naive_ids, naive_logits, naive_tokens = _naive_pass(model, tok, texts, (chat, max_length, instr), timings)
    log.info("in-process length-sorted sub-batches of %d", sl.sub_batch_size)
    with measure("sorted", timings):
        ids = tokenize(tok, texts, chat, max_length, instr)
        sorted_logits, sorted_padded = score_ids(model, tok, ids, sl.sub_batch_size)
    # Sorted batches must not change the answer; only the time.
    res["max_abs_diff_naive_vs_sorted"] = float(np.abs(naive_logits - sorted_logits[:n_naive]).max())
    res["unit_targets"] = _unit_targets(model, tok, table, texts, unit_columns, (chat, max_length, instr), sl,
                                        timings, sorted_logits)
    del model

    ray_cfg, out = _ray_data_pass(cfg, table, artifact, cores, timings)
    if out.num_rows != len(texts):
        raise RuntimeError(f"ray_data path returned {out.num_rows} rows for {len(texts)} samples")

    computed = {"naive": naive_tokens, "sorted": int(sorted_padded.sum()),
                "ray_data": int(np.sum(out.column("n_computed").to_numpy())), "units": int(sorted_padded.sum())}
    samples = {"naive": n_naive, "sorted": len(texts), "ray_data": len(texts), "units": len(texts)}
    useful = {"naive": sum(len(x) for x in naive_ids), "sorted": real_tokens, "ray_data": real_tokens,
              "units": real_tokens}
    for name, t in timings.items():
        _rates(t, samples[name], useful[name], computed[name], params, peak)
    res["timings"] = timings
    # Other work on a shared machine moves the peak: measure it again and judge against both.
    peak_after = matmul_peak_flops()
    res["matmul_peak_gflops_after"] = round(peak_after / 1e9, 1)
    for t in timings.values():
        t["fraction_of_best_peak"] = round(t["fraction_of_peak"] * peak / max(peak, peak_after), 4)
    rate = {k: v["samples_per_s"] for k, v in timings.items()}
    res["speedup_sorted_vs_naive"] = round(rate["sorted"] / rate["naive"], 2)
    res["speedup_ray_data_vs_naive"] = round(rate["ray_data"] / rate["naive"], 2)
    res["unit_targets"]["time_vs_sorted"] = round(rate["sorted"] / rate["units"], 3)
    res["note"] = "ray_data wall includes actor start and teacher load; naive and sorted exclude the load"
    res["ray_data_config"] = ray_cfg.model_dump()
    emit(res, getattr(args, "out", None))
    return res


def _unit_targets(model, tok, table: pa.Table, texts: list[str], unit_columns, text_options, sl, timings: dict,
                  sorted_logits: np.ndarray) -> dict:
    """Time the in-process scoring with the unit targets (the `sorted` path plus unit maps,
    label attention and relations) and measure the targets' parquet bytes per sample."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.soft_labels.scoring import score_with_units, unit_inputs, unit_target_table

    chat, max_length, instr = text_options
    items = list(zip(*(table.column(c).to_pylist() for c in unit_columns)))
    with timed("units", timings):
        ids, maps, keys = unit_inputs(tok, texts, items, chat, max_length, instr)
        out = score_with_units(model, tok, ids, maps, keys, sl.sub_batch_size, sl.relation_layer)
    units = unit_target_table(table.column("sample_id").to_pylist(), keys, out["unit_attention"], out["unit_relation"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "units.parquet")
        storage.write_parquet(units, path)
        nbytes = os.path.getsize(path)
    return {"label_attention": out["unit_attention"][0] is not None, "relation_layer": sl.relation_layer,
            "mean_units": round(float(np.mean([len(k) for k in keys])), 1),
            "parquet_bytes_per_sample": round(nbytes / max(1, len(texts)), 1),
            "max_abs_logit_diff_vs_sorted": float(np.abs(out["logits"] - sorted_logits).max())}
