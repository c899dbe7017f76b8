"""Student training on Ray Train: the per-worker loop, at the edge of the plain pieces.

Every rank gets the whole tokenised split through the object store and takes its own share
of length-grouped batches (same count on every rank). Each epoch (and every
checkpoint_every_steps) the ranks evaluate their share of validation, gather the
probabilities, and report identical metrics; rank 0 attaches the checkpoint:

    model/ (encoder save_pretrained), head.safetensors, train_state.pt

Ray Train keeps the best checkpoints by cfg.best_metric and always the latest, from which a
restarted worker group resumes (epoch, position in the epoch, optimiser and LR schedule).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import numpy as np

from ..config import StudentConfig
from .data import Encoded, collate, length_grouped_batches, shard_batches
from .loss import distill_loss, weights_at

log = logging.getLogger("ckd_ehr.student")

STATE_FILE = "train_state.pt"


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to 0."""
    warmup = int(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return f


def score_order(metric: str) -> str:
    return "min" if metric.endswith("loss") else "max"


def val_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """What selects the best checkpoint: macro-F1 at 0.5, macro AUROC and the hard BCE."""
    from ..metrics import all_scores

    s = all_scores(labels, probs, 0.5)
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    bce = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    return {"val_macro_f1": s["macro_f1"], "val_macro_auroc": s["macro_auroc"],
            "val_micro_f1": s["micro_f1"], "val_accuracy": s["accuracy"], "val_loss": bce}


def _inject_failure(marker: str | None, step: int, fail_at: int | None, rank: int, world: int) -> None:
    """Raise once at `fail_at` on rank 1 (0 when alone); the marker makes it once per run."""
    from ..storage import exists, write_text

    if fail_at is None or step != fail_at or rank != (1 if world > 1 else 0) or marker is None:
        return
    if exists(marker):
        return
    write_text(marker, f"failed at step {step}\n")
    raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from ..models import resolve_model_path
    from .model import build_student, predict_ids, save_student

    cfg = StudentConfig.model_validate(config["student"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train: Encoded = ray.get(config["train_ref"])
    val: Encoded = ray.get(config["val_ref"])
    hard_only = not config["distill"]
    class_w = torch.tensor(config["class_weights"]) if config["class_weights"] is not None else None
    pad_id = config["pad_id"]

    torch.manual_seed(cfg.seed)
    model = build_student(resolve_model_path(config["model_path"]), cfg.pooling, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    lengths = [len(x) for x in train.input_ids]
    n_batches = len(shard_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed), rank, world))
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, cfg.warmup_ratio))

    # --- resume ------------------------------------------------------------------------
    start_epoch, start_batch, step = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        from safetensors.torch import load_file
        from transformers import AutoModel

        with ckpt.as_directory() as d:
            model.encoder.load_state_dict(AutoModel.from_pretrained(os.path.join(d, "model")).state_dict())
            model.head.load_state_dict(load_file(os.path.join(d, "head.safetensors")))
            state = torch.load(os.path.join(d, STATE_FILE), weights_only=False)
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]

    if cfg.strategy == "deepspeed":
        import deepspeed

        ds = {"train_micro_batch_size_per_gpu": cfg.batch_size,
              "gradient_accumulation_steps": cfg.grad_accum, **cfg.deepspeed}
        if (ds.get("zero_optimization") or {}).get("stage", 0) == 3:
            raise ValueError("student: DeepSpeed ZeRO-3 is not supported (the student fits one device; use stage <= 2)")
        # a torch optimizer avoids DeepSpeed's fused Adam, which compiles for ~50 s on CPU
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        net, plain = engine, engine.module
    else:
        net = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, NCCL on GPU)
        plain = net.module if hasattr(net, "module") else net
        engine = None
    if state is not None and engine is None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    elif state is not None:
        # DeepSpeed owns the (ZeRO-sharded) optimizer state: weights resume, moments restart
        for _ in range(step):
            scheduler.step()

    def evaluate() -> dict[str, float]:
        mine = list(range(rank, len(val), world))
        probs = predict_ids(plain, [val.input_ids[i] for i in mine], pad_id, cfg.batch_size * 2, str(device))
        parts = [None] * world
        dist.all_gather_object(parts, (mine, probs)) if world > 1 else parts.__setitem__(0, (mine, probs))
        full = np.zeros((len(val), val.labels.shape[1]), dtype=np.float32)
        for idx, p in parts:
            full[idx] = p
        return val_metrics(val.labels, full)

    def report(epoch: int, batch: int, extra: dict) -> None:
        metrics = {**evaluate(), **extra, "epoch": epoch, "step": step}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_student(plain, d)
                torch.save({"epoch": epoch, "batch": batch, "step": step,
                            "optimizer": optimizer.state_dict() if engine is None else None,
                            "scheduler": scheduler.state_dict() if engine is None else None},
                           os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    # --- train -------------------------------------------------------------------------
    net.train()
    done = step >= total_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        batches = shard_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch), rank, world)
        first = start_batch if epoch == start_epoch else 0
        t0, seen, losses = time.perf_counter(), 0, []
        for b in range(first, len(batches)):
            batch = {k: v.to(device) for k, v in collate(train, batches[b], pad_id).items()}
            logits = net(batch["input_ids"], batch["attention_mask"])
            w = weights_at(step, total_steps, cfg.distill, hard_only=hard_only)
            loss, parts = distill_loss(
                logits.float(), batch["labels"], w, batch.get("teacher_probs"), batch.get("teacher_logits"),
                cfg.distill.soft_loss, cfg.distill.temperature,
                None if class_w is None else class_w.to(device))
            losses.append(float(loss.detach()))
            seen += len(batches[b])
            boundary = (b + 1 - first) % cfg.grad_accum == 0 or b == len(batches) - 1
            if engine is not None:
                engine.backward(loss)
                engine.step()  # applies the update at the accumulation boundary itself
            else:
                (loss / cfg.grad_accum).backward()
                if boundary:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not boundary:
                continue
            step += 1
            _inject_failure(config.get("failure_marker"), step, cfg.fail_at_step, rank, world)
            extra = {"train_loss": float(np.mean(losses[-cfg.grad_accum * 10:])), "alpha": w.alpha,
                     "beta": w.beta, "lr": scheduler.get_last_lr()[0],
                     "train_samples_per_s": seen * world / max(time.perf_counter() - t0, 1e-9), **parts}
            done = step >= total_steps
            if done:
                report(epoch, b + 1, extra)
                break
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and b + 1 < len(batches):
                report(epoch, b + 1, extra)
        else:
            report(epoch + 1, 0, {"train_loss": float(np.mean(losses)) if losses else float("nan"),
                                  "train_samples_per_s": seen * world / max(time.perf_counter() - t0, 1e-9)})
