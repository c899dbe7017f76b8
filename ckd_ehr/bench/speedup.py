"""`ckd-ehr bench speedup`: teacher vs student inference throughput, against the paper's 22.2x.

Both models run on the same machine and the same inputs, each at its best batch size (a few
are tried), under torch.inference_mode; bf16 on CUDA, float32 on CPU. Two modes:

- default: the trained artifacts of a run (RUN/teacher/artifact, RUN/student/ckd_ehr/artifact)
  on the EADF texts of the test split, through the same predict functions the pipeline uses;
- `--arch-only`: randomly initialised models built from the published configs (Qwen2.5-0.5B /
  1.5B / 7B against bert-base), random token ids of one fixed length. No weights needed; the
  models that do not fit this machine's memory are skipped and the output says so.

The paper does not publish hardware or batch size, so the ratio here is the one we can
defend: best throughput against best throughput. The analytic compute ratio (forward FLOPs per
sample) is printed too, also for the skipped sizes, to put the measured ratio in context.
"""
from __future__ import annotations

import logging
import math
import time
import psutil

from ckd_ehr.bench.common import emit
from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout

log = logging.getLogger(__name__)

PAPER_SPEEDUP = 22.2
NUM_LABELS = 25

# Published dimensions (config.json of each model on the Hugging Face hub).
QWEN_SIZES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
BERT_BASE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=30522, max_position_embeddings=512)


# --- models from configs ------------------------------------------------------------------------

class Classifier:
    """Backbone + linear head to 25 logits, pooled as the pipeline pools: the last real token
    for the decoder teacher, the mean over tokens for the encoder student. No padding here
    (fixed-length random ids), so the last position is the last real token."""

    def __init__(self, backbone, pooling: str):
        # not at module level: torch, loaded only when this runs
        import torch

        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, NUM_LABELS)
        self.pooling = pooling

    def to(self, device, dtype):
        self.backbone.to(device=device, dtype=dtype).eval()
        self.head.to(device=device, dtype=dtype).eval()
        return self

    def __call__(self, input_ids):
        hidden = self.backbone(input_ids=input_ids).last_hidden_state
        pooled = hidden[:, -1] if self.pooling == "last" else hidden.mean(dim=1)
        return self.head(pooled)


def build_on(device: str, dtype, builder, size: dict) -> Classifier:
    """Build straight on the device in the benchmark dtype: a 7B model initialised in float32
    on the CPU first would need 28 GiB of host memory and minutes of random init."""
    # not at module level: torch, loaded only when this runs
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = builder(size)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device, dtype)


def build_teacher(size: dict):
    # not at module level: transformers, loaded only when this runs
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1_000_000.0, **size)
    return Classifier(Qwen2Model(cfg), "last")


def build_student(size: dict):
    # not at module level: transformers, loaded only when this runs
    from transformers import BertConfig, BertModel

    return Classifier(BertModel(BertConfig(**size), add_pooling_layer=False), "mean")


def count_params(kind: str, size: dict) -> tuple[int, int]:
    """(total, embedding) parameters, counted on the meta device (no memory allocated)."""
    # not at module level: torch, loaded only when this runs
    import torch

    with torch.device("meta"):
        model = (build_teacher if kind == "teacher" else build_student)(size)
    total = sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in model.head.parameters())
    embedding = model.backbone.get_input_embeddings().weight.numel()
    return total, embedding


def forward_flops(params: int, embedding: int, size: dict, seq_len: int) -> float:
    """Forward FLOPs per sample: 2 per weight per token (embeddings are lookups) plus the
    attention scores and the weighted sum (2 x 2 x seq^2 x hidden per layer)."""
    return 2.0 * (params - embedding) * seq_len + 4.0 * size["num_hidden_layers"] * seq_len ** 2 * size["hidden_size"]


def available_bytes() -> int:

    return int(psutil.virtual_memory().available)


def fits(params: int, bytes_per_param: int, device: str, share: float = 0.6) -> tuple[bool, str]:
    """Whether the weights (plus 30% and 1 GiB for activations and the runtime) fit in a share
    of the free memory, so the benchmark never pushes the machine (or its neighbours) into swap."""
    # not at module level: torch, loaded only when this runs
    import torch

    need = params * bytes_per_param * 1.3 + 2 ** 30
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = available_bytes()
    ok = need <= share * free
    return ok, f"needs ~{need / 2**30:.1f} GiB, {share:.0%} of free {device} memory is {share * free / 2**30:.1f} GiB"


# --- timing ---------------------------------------------------------------------------------

def _sync(device: str) -> None:
    # not at module level: torch, loaded only when this runs
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_batches(run_batch, batch_sizes, min_samples: int, max_measure_s: float, device: str) -> dict:
    """Throughput of `run_batch(bs)` at each batch size: one warm-up batch, then enough batches
    for `min_samples` samples, cut down to fit `max_measure_s`. A batch size whose single batch
    is predicted (from the previous size) to take longer than max_measure_s is skipped."""
    results, per_sample_s = {}, None
    for bs in batch_sizes:
        if per_sample_s is not None and per_sample_s * bs > max_measure_s:
            results[bs] = {"skipped": f"one batch predicted to take {per_sample_s * bs:.0f}s > {max_measure_s:.0f}s"}
            continue
        start = time.perf_counter()
        run_batch(bs)                          # warm-up: allocation, kernels, caches
        _sync(device)
        warm = time.perf_counter() - start
        reps = max(1, math.ceil(min_samples / bs))
        reps = max(1, min(reps, int(max_measure_s / max(warm, 1e-6))))
        start = time.perf_counter()
        for _ in range(reps):
            run_batch(bs)
        _sync(device)
        elapsed = time.perf_counter() - start
        per_sample_s = elapsed / (reps * bs)
        results[bs] = {"samples": reps * bs, "seconds": round(elapsed, 4), "samples_per_s": round(1 / per_sample_s, 3)}
    return results


def best(throughput: dict) -> tuple[int | None, float | None]:
    timed = {bs: r["samples_per_s"] for bs, r in throughput.items() if "samples_per_s" in r}
    if not timed:
        return None, None
    bs = max(timed, key=timed.get)
    return bs, timed[bs]


def pick_device() -> tuple[str, "object"]:
    # not at module level: torch, loaded only when this runs
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


# --- arch-only mode -----------------------------------------------------------------------------

def bench_arch_only(teachers: dict[str, dict] | None = None, student: dict | None = None, seq_len: int = 256,
                    batch_sizes=(1, 8, 32), min_samples: int = 8, max_measure_s: float = 60.0,
                    seed: int = 0) -> dict:
    """Random Qwen2.5 teachers against a random bert-base student on random ids of `seq_len`."""
    # not at module level: torch, loaded only when this runs
    import torch

    teachers = QWEN_SIZES if teachers is None else teachers
    student = BERT_BASE if student is None else student
    device, dtype = pick_device()
    bytes_per_param = torch.finfo(dtype).bits // 8
    torch.manual_seed(seed)

    def measure(kind: str, size: dict) -> dict:
        params, embedding = count_params(kind, size)
        entry = {"params": params, "flops_per_sample": forward_flops(params, embedding, size, seq_len)}
        ok, why = fits(params, bytes_per_param, device)
        if not ok:
            entry["skipped"] = f"does not fit: {why}"
            return entry
        model = build_on(device, dtype, build_teacher if kind == "teacher" else build_student, size)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, size["vocab_size"], (max(batch_sizes), seq_len), generator=gen).to(device)

        @torch.inference_mode()
        def run_batch(bs):
            return model(ids[:bs])

        entry["throughput"] = time_batches(run_batch, batch_sizes, min_samples, max_measure_s, device)
        entry["best_batch_size"], entry["best_samples_per_s"] = best(entry["throughput"])
        model = None  # free it before the next size (run_batch is not called again)
        if device == "cuda":
            torch.cuda.empty_cache()
        return entry

    results = {"mode": "arch_only", "device": device, "dtype": str(dtype).replace("torch.", ""),
               "seq_len": seq_len, "batch_sizes": list(batch_sizes), "paper_speedup": PAPER_SPEEDUP}
    log.info("student (bert-base dims) ...")
    results["student"] = {"name": "bert-base" if student is BERT_BASE else "student", **measure("student", student)}
    results["teachers"], results["speedup"], results["compute_ratio"] = {}, {}, {}
    for name, size in teachers.items():
        log.info("teacher %s ...", name)
        entry = measure("teacher", size)
        results["teachers"][name] = entry
        results["compute_ratio"][name] = round(entry["flops_per_sample"] / results["student"]["flops_per_sample"], 2)
        if entry.get("best_samples_per_s") and results["student"].get("best_samples_per_s"):
            results["speedup"][name] = round(results["student"]["best_samples_per_s"] / entry["best_samples_per_s"], 2)
    return results


# --- artifact mode ------------------------------------------------------------------------------

def bench_artifacts(run_dir: str, samples: int = 64, batch_sizes=(1, 8, 32), max_measure_s: float = 120.0,
                    variant: str = "ckd_ehr") -> dict:
    """The trained teacher and student of a run on the same test texts (text_eadf)."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.student import load_student
    from ckd_ehr.teacher import load_teacher, predict_logits

    layout = RunLayout(run_dir)
    device, dtype = pick_device()
    table = storage.read_parquet(layout.augmented("test"), columns=["text_eadf"])
    texts = table.column("text_eadf").to_pylist()[:samples]
    if not texts:
        raise ValueError(f"{layout.augmented('test')}: no test texts to time")

    loaded = load_teacher(layout.teacher_artifact, device=device, dtype=dtype if device == "cuda" else None)
    teacher, tokenizer = loaded[0], loaded[1]
    meta = loaded[2] if len(loaded) > 2 else {}
    max_length = int(meta.get("max_length") or (meta.get("config") or {}).get("max_length", 1024))
    student = load_student(layout.student_artifact(variant), device=device)

    # not at module level: torch, loaded only when this runs
    import torch

    def throughput(predict) -> dict:
        """Warm up on one batch, then time one pass over all texts; stop growing the batch
        once a pass takes longer than max_measure_s."""
        out = {}
        for bs in batch_sizes:
            with torch.inference_mode():
                predict(texts[:bs], bs)                      # warm-up
                _sync(device)
                start = time.perf_counter()
                predict(texts, bs)
                _sync(device)
            elapsed = time.perf_counter() - start
            out[bs] = {"samples": len(texts), "seconds": round(elapsed, 4),
                       "samples_per_s": round(len(texts) / elapsed, 3)}
            if elapsed > max_measure_s:
                break
        return out

    results = {"mode": "artifacts", "run_dir": run_dir, "device": device, "samples": len(texts),
               "batch_sizes": list(batch_sizes), "paper_speedup": PAPER_SPEEDUP,
               "teacher_model": meta.get("base_model"), "teacher_max_length": max_length,
               "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
               "student_variant": variant, "student_max_length": student.max_length,
               "student_dtype": "float32 (as the artifact serves it)"}
    results["student"] = {"throughput": throughput(lambda t, bs: student.predict_proba(t, batch_size=bs))}
    results["teacher"] = {"throughput": throughput(
        lambda t, bs: predict_logits(teacher, tokenizer, t, batch_size=bs, max_length=max_length, device=device))}
    for who in ("student", "teacher"):
        results[who]["best_batch_size"], results[who]["best_samples_per_s"] = best(results[who]["throughput"])
    results["speedup"] = round(results["student"]["best_samples_per_s"] / results["teacher"]["best_samples_per_s"], 2)
    return results


def bench_speedup(cfg, args, sizes: dict[str, dict] | None = None, student_size: dict | None = None,
                  **options) -> dict:
    """CLI entry. `sizes` / `student_size` replace the published dims of the arch-only mode;
    `options` (seq_len, batch_sizes, max_measure_s) its defaults or the artifact mode's. Tests
    use tiny ones."""
    samples = getattr(args, "samples", None)
    if getattr(args, "arch_only", False):
        results = bench_arch_only(sizes, student_size, min_samples=samples or 8, seed=cfg.seed, **options)
    else:
        results = bench_artifacts(cfg.run_dir, samples=samples or 64, **options)
    emit(results, getattr(args, "out", None))
    return results
