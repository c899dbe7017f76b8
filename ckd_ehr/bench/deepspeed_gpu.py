"""Teacher speed at full size: model FLOPs utilisation (MFU) of LoRA training and of
soft-label scoring of a Qwen2.5-7B-architecture teacher (random weights, no download).

    python -m ckd_ehr.bench.deepspeed_gpu                  # on a CUDA GPU: the full sweep
    ckd-ehr bench teacher --device cuda                     # the same, from the CLI
    python -m ckd_ehr.bench.deepspeed_gpu --device cpu --arch tiny --steps 1   # CPU smoke run

Standalone: imports only torch, transformers, peft and DeepSpeed (+ ckd_ehr.teacher.model,
which needs nothing more), so it runs on a GPU machine without Ray; the JSON it prints says
whether Ray got imported (`ray_imported`, must be false).

What it does, in one process (world size 1: one GPU of a Ray Train worker group):
  1. train  LoRA (q,k,v) + MLAPH training steps (forward, backward, AdamW) in bf16 + SDPA at
            --seq-len tokens (default 1,024; every token real, padding is measured by
            `ckd-ehr bench padding`), for each --train-batch-sizes x gradient checkpointing
            off/on (plain torch: what `strategy: auto` picks when the model fits the GPU, and
            what a DDP rank computes); out-of-memory configurations are recorded, not fatal.
  2. zero3  the best train configuration again under DeepSpeed ZeRO-3 (bf16), the engine
            `strategy: deepspeed` uses: its overhead at world size 1.
  3. score  soft-label scoring: the LoRA merged into the base (as load_teacher does), bf16
            inference forwards for each --score-batch-sizes.

MFU = model FLOPs per second / the chip's peak dense bf16 FLOP/s (a table of known GPUs; else
or with --peak-tflops as given; the measured bf16 matmul peak is printed as well). Model FLOPs
per real token, N = non-embedding parameters of the base (matmul weights; 6.5e9 for the 7B
architecture without LM head), L layers, d hidden size, s sequence length:
  scoring            2N + 2·L·d·s        forward: 2 FLOPs per weight; causal attention QK^T and
                                         AV cost s·d each per token per layer on average
  LoRA training      4N + 6·L·d·s        forward 2N, backward 2N for the activation gradients
                                         that must flow through every frozen layer to reach
                                         the adapters; the frozen weights' own gradients (2N
                                         more in full fine-tuning, hence the usual 6N) are
                                         never computed; attention backward = 2 x forward.
                                         LoRA's own matmuls (rank 16: < 0.5% of N) and the
                                         recomputation of gradient checkpointing are not
                                         counted (model FLOPs, not hardware FLOPs).
Targets on one H200: 35% for training, 50% for scoring.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from ckd_ehr.teacher.model import MLAPH, TeacherModel, add_lora

# Qwen2.5-7B-Instruct's published architecture (config.json of the hub model).
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# A tiny model of the same family, for CPU smoke runs of this script.
QWEN_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
ARCHS = {"7b": QWEN25_7B, "tiny": QWEN_TINY}

# Peak dense bf16 tensor-core FLOP/s by device name (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}


def peak_tflops_of(name: str) -> float | None:
    """The table's peak for a device name (longest matching key), None if unknown."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters that take part in per-token matmuls: all but embedding tables (a lookup is
    no FLOPs) and LoRA adapters (counted separately, negligible)."""
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for n, p in model.named_parameters() if id(p) not in emb and "lora_" not in n)


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int, training: bool) -> float:
    """Model FLOPs per real token (see the module docstring): 2N + 2Lds scoring, 4N + 6Lds
    LoRA training on a frozen base."""
    attn = 2.0 * n_layers * hidden * seq_len
    return 4.0 * n_params + 3 * attn if training else 2.0 * n_params + attn


def random_teacher(arch: dict, device: str, dtype: torch.dtype, attn: str = "sdpa", lora_rank: int = 16,
                   checkpointing: bool = False, pooling: str = "last"):
    """Qwen2 backbone of `arch` with random weights + LoRA (q, k, v) + MLAPH, built on `device`."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoModel, Qwen2Config


    conf = Qwen2Config(**arch)
    with torch.device(device):
        backbone = AutoModel.from_config(conf, dtype=dtype, attn_implementation=attn)
    if checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = add_lora(backbone, lora_rank, 2 * lora_rank, 0.0, ["q_proj", "k_proj", "v_proj"])
    return TeacherModel(backbone, MLAPH(conf.hidden_size, 25, pooling)).to(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_dist(device: str) -> None:

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


class _Clock:
    def __init__(self, device: str):
        self.device = device

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.device == "cuda" else None


def matmul_peak_tflops(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Best measured FLOP/s of an n x n matmul (TFLOP/s)."""
    clock = _Clock(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    clock.sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        clock.sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _batch(vocab: int, bs: int, seq: int, device: str, g: torch.Generator):
    ids = torch.randint(0, vocab, (bs, seq), device=device, generator=g)
    y = (torch.rand(bs, 25, device=device, generator=g) < 0.2).float()
    return ids, torch.ones_like(ids), y


def train_rate(step, vocab: int, bs: int, seq: int, steps: int, device: str, warmup: int = 2) -> dict:
    """Tokens/s of `step(ids, mask, y) -> loss` over `steps` timed steps after `warmup`."""
    clock, g = _Clock(device), torch.Generator(device=device).manual_seed(0)
    losses = []
    for _ in range(warmup):
        losses.append(float(step(*_batch(vocab, bs, seq, device, g))))
    clock.sync()
    clock.reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(float(step(*_batch(vocab, bs, seq, device, g))))
    clock.sync()
    wall = time.perf_counter() - t0
    return {"tokens_per_s": steps * bs * seq / wall, "step_s": wall / steps, "peak_gpu_mem_gib": clock.peak_gib(),
            "loss_first": losses[0], "loss_last": losses[-1]}


def _with_mfu(rec: dict, fpt: float, peak_tflops: float) -> dict:
    achieved = rec["tokens_per_s"] * fpt / 1e12
    rec.update(tokens_per_s=round(rec["tokens_per_s"], 1), achieved_tflops=round(achieved, 2),
               mfu=round(achieved / peak_tflops, 4))
    for k in ("step_s", "loss_first", "loss_last"):
        if k in rec:
            rec[k] = round(rec[k], 4)
    return rec


def _sweep(name: str, batch_sizes, run_one, fpt: float, peak: float, device: str) -> tuple[list, dict | None]:
    rows, best = [], None
    for bs in batch_sizes:
        try:
            rec = _with_mfu({"batch_size": bs, **run_one(bs)}, fpt, peak)
        except Exception as exc:  # noqa: BLE001 - an OOM (or a kernel missing) ends this size, not the sweep
            if not _is_oom(exc):
                raise
            rec = {"batch_size": bs, "oom": True}
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(rec)
        print(f"[{name}] {json.dumps(rec)}", file=sys.stderr, flush=True)
        if "mfu" in rec and (best is None or rec["mfu"] > best["mfu"]):
            best = rec
    return rows, best


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="7b")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--train-batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--score-batch-sizes", default="4,8,16,32,64")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--no-zero3", action="store_true", help="skip the DeepSpeed ZeRO-3 run")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s (default: table, else measured)")
    ap.add_argument("--out", help="also write the JSON here")
    return ap.parse_args(argv)


def _train_sweep(model, args, ckpts: list[bool], vocab: int, seq: int, fpt: float, peak: float, device: str) -> dict:
    """1. plain torch LoRA training over the batch sizes, with and without checkpointing."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def torch_step(ids, mask, y):
        loss = loss_fn(model(input_ids=ids, attention_mask=mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    train_rows, best = [], None
    for ck in ckpts:
        if ck:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.backbone.gradient_checkpointing_disable()
        rows, b = _sweep(f"train ckpt={ck}", [int(x) for x in args.train_batch_sizes.split(",")],
                         lambda bs: train_rate(torch_step, vocab, bs, seq, args.steps, device), fpt, peak, device)
        train_rows += [{"gradient_checkpointing": ck, **r} for r in rows]
        if b and (best is None or b["mfu"] > best["mfu"]):
            best = {"gradient_checkpointing": ck, **b}
    return {"engine": "torch (DDP-equivalent at world size 1)", "sweep": train_rows, "best": best}


def _score_sweep(model, args, vocab: int, seq: int, fpt: float, peak: float, device: str) -> dict:
    """3. scoring with the LoRA merged, in inference mode, over the batch sizes."""
    model.backbone.gradient_checkpointing_disable()
    model.backbone = model.backbone.merge_and_unload()
    model.eval()

    def score_one(bs):
        clock, g = _Clock(device), torch.Generator(device=device).manual_seed(1)
        ids, mask, _ = _batch(vocab, bs, seq, device, g)
        with torch.inference_mode():
            for _ in range(2):
                model(input_ids=ids, attention_mask=mask)
            clock.sync()
            clock.reset_peak()
            t = time.perf_counter()
            for _ in range(args.steps):
                out = model(input_ids=ids, attention_mask=mask)
            clock.sync()
            wall = time.perf_counter() - t
        return {"tokens_per_s": args.steps * bs * seq / wall, "step_s": wall / args.steps,
                "peak_gpu_mem_gib": clock.peak_gib(), "logits_finite": bool(torch.isfinite(out).all())}

    rows, sbest = _sweep("score", [int(x) for x in args.score_batch_sizes.split(",")], score_one, fpt, peak, device)
    return {"engine": "torch inference_mode, LoRA merged", "sweep": rows, "best": sbest}


def _zero3(args, arch: dict, best: dict, dtype, vocab: int, seq: int, fpt: float, peak: float, device: str) -> dict:
    """2. the best training configuration under DeepSpeed ZeRO-3 (world size 1)."""
    # not at module level: deepspeed, loaded only when this runs
    import deepspeed

    _init_dist(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model = random_teacher(arch, device, dtype, lora_rank=args.lora_rank, checkpointing=best["gradient_checkpointing"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ds_config = {"train_micro_batch_size_per_gpu": best["batch_size"], "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": device == "cuda"},
                 "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                 "zero_force_ds_cpu_optimizer": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    def ds_step(ids, mask, y):
        loss = loss_fn(engine(input_ids=ids, attention_mask=mask).float(), y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    engine.train()
    rows, _ = _sweep("zero3", [best["batch_size"]],
                     lambda bs: train_rate(ds_step, vocab, bs, seq, args.steps, device), fpt, peak, device)
    dist.destroy_process_group()
    return {"engine": f"DeepSpeed {deepspeed.__version__} ZeRO-3, world size 1",
            "gradient_checkpointing": best["gradient_checkpointing"], "result": rows[0]}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU on this machine (use --device cpu --arch tiny for a smoke run)")
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    arch = ARCHS[args.arch]
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    seq, vocab = args.seq_len, arch["vocab_size"]

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    measured = matmul_peak_tflops(device, dtype, n=8192 if device == "cuda" else 1024)
    peak = args.peak_tflops or (peak_tflops_of(gpu) if device == "cuda" else None) or measured
    res: dict = {"device": gpu, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
                 "arch": args.arch, "seq_len": seq, "peak_tflops_used": round(peak, 1),
                 "peak_source": "--peak-tflops" if args.peak_tflops else
                 ("data sheet" if peak != measured else "measured matmul"),
                 "matmul_tflops_measured": round(measured, 1)}

    t0 = time.perf_counter()
    model = random_teacher(arch, device, dtype, lora_rank=args.lora_rank)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    n_params = non_embedding_params(model.backbone)
    res.update(params_total=sum(p.numel() for p in model.parameters()),
               params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               params_non_embedding=n_params)
    fpt_train = flops_per_token(n_params, arch["num_hidden_layers"], arch["hidden_size"], seq, training=True)
    fpt_score = flops_per_token(n_params, arch["num_hidden_layers"], arch["hidden_size"], seq, training=False)
    res["flops_per_token"] = {"train_lora": fpt_train, "score": fpt_score}
    res["train"] = _train_sweep(model, args, ckpts, vocab, seq, fpt_train, peak, device)
    res["score"] = _score_sweep(model, args, vocab, seq, fpt_score, peak, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    best = res["train"]["best"]
    if not args.no_zero3 and best:
        res["zero3"] = _zero3(args, arch, best, dtype, vocab, seq, fpt_train, peak, device)

    res["targets"] = {"train_mfu": 0.35, "score_mfu": 0.50}
    res["ray_imported"] = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    return res


if __name__ == "__main__":
    main()
