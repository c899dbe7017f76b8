"""DeepSpeed on CUDA at full teacher size: a few LoRA + MLAPH training steps of a
Qwen2.5-7B-architecture teacher (random weights, no download) under ZeRO-3 with bf16 and
the NCCL backend, then bf16 batch inference. Prints samples/s, tokens/s and peak memory.

    python -m ckd_ehr.bench.deepspeed_gpu --steps 8 --batch-size 4 --seq-len 512

One process (world size 1), as on one GPU of a Ray Train worker group: the engine, the
ZeRO-3 partitioning and the collectives are the ones `strategy: deepspeed` uses; Ray itself
is not needed for the figures. Not run in CI (no GPU there).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--zero-stage", type=int, default=3, choices=[2, 3])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    import deepspeed
    import torch.distributed as dist

    from ..config import TeacherConfig
    from ..teacher.model import param_groups
    from .teacher import _random_qwen

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    tc = TeacherConfig(gguf_file=None, dtype="bfloat16", attn_implementation="sdpa",
                       gradient_checkpointing=args.gradient_checkpointing, lr=1e-5,
                       lora={"rank": args.rank, "alpha": 2 * args.rank})
    t0 = time.perf_counter()
    model = _random_qwen(tc, "cuda", torch.bfloat16)
    build_s = time.perf_counter() - t0
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr))  # torch optimiser: no fused-op build
    ds_config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": args.zero_stage, "overlap_comm": True,
                                       "stage3_gather_16bit_weights_on_model_save": True},
                 "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    vocab = 152064
    g = torch.Generator(device="cuda").manual_seed(0)

    def batch():
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device="cuda", generator=g)
        mask = torch.ones_like(ids)
        mask[1::2, args.seq_len // 2:] = 0       # half the rows padded: true-length pooling matters
        y = (torch.rand(args.batch_size, 25, device="cuda", generator=g) < 0.2).float()
        return ids, mask, y

    loss_fn = torch.nn.BCEWithLogitsLoss()
    engine.train()
    losses = []
    for i in range(args.steps + 2):               # 2 warm-up steps
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0, tokens = time.perf_counter(), 0
        ids, mask, y = batch()
        loss = loss_fn(engine(input_ids=ids, attention_mask=mask).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if i >= 2:
            tokens += int(mask.sum())
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    train = {"samples_per_s": round(args.steps * args.batch_size / wall, 2), "tokens_per_s": round(tokens / wall, 1),
             "step_s": round(wall / args.steps, 3), "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
             "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}

    engine.eval()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        ids, mask, _ = batch()
        engine(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        for _ in range(5):
            out = engine(input_ids=ids, attention_mask=mask)
            n += ids.shape[0]
        torch.cuda.synchronize()
        inf_wall = time.perf_counter() - t0
    finite = bool(torch.isfinite(out.float()).all())
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "backend": dist.get_backend(), "zero_stage": args.zero_stage, "dtype": "bfloat16",
              "model": "Qwen2.5-7B architecture (random weights) + LoRA q,k,v + MLAPH(last)",
              "params_total": total, "params_trainable": trainable, "build_s": round(build_s, 1),
              "batch_size": args.batch_size, "seq_len": args.seq_len, "train": train,
              "inference": {"samples_per_s": round(n / inf_wall, 2), "tokens_per_s": round(n * args.seq_len / inf_wall, 1),
                            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                            "logits_finite": finite}}
    print(json.dumps(result, indent=2))
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
