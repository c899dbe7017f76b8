"""Two engines with the same methods, one per strategy; the loop never asks which it has.

    engine = make_engine(cfg, task, ctx)        # DDPEngine or DeepSpeedEngine (strategy auto resolved)
    model = engine.create_model(task.build_model)   # built where the engine needs it (ZeRO-3: partitioned)
    engine.build(model, groups, lr, weight_decay, total_steps, warmup_steps)  # AdamW + warm-up/cosine
    losses = engine.step(micro_batches, loss_of)    # one optimiser step over the accumulation group
    outputs = engine.forward(**inputs)
    engine.save(directory, rank) / engine.load(directory)   # optimiser + schedule (+ weights on load)
    state = engine.gather_trainable()               # full trainable weights on every rank

- DDPEngine: torch DDP (no_sync during accumulation; no wrapper for one worker), torch AdamW,
  LambdaLR, grad clip 1.0; optimiser state in `optim.pt`.
- DeepSpeedEngine: cfg.deepspeed with micro batch, accumulation and train_batch_size filled in
  (`deepspeed_config`); a torch AdamW is passed in so no fused op is compiled; ZeRO-3 with
  cfg.zero3_partitioned_init builds the model under transformers' HfDeepSpeedConfig, so
  `from_pretrained` runs inside deepspeed.zero.Init and every worker holds only its shard;
  DeepSpeed's own checkpoint files under `ds/` (every rank writes its shards); ZeRO-3
  parameters are gathered for saving.
No Ray here: `ctx` is the loop's WorkerContext (rank, world, local_world, device).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from ckd_ehr.training.memory import resolve_strategy, return_freed_memory

TRAINABLE = "trainable.safetensors"
OPTIM = "optim.pt"
DS_DIR = "ds"
DS_TAG = "state"


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up then cosine decay to 0."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def deepspeed_config(cfg, world: int, zero_stage: int | None = None) -> dict:
    """cfg.deepspeed with batch sizes and accumulation filled in (values given there win);
    `zero_stage` overrides the stage (strategy `auto` picking ZeRO-3). GPU workers whose
    weights train in bfloat16 (cfg.train_dtype()) get bf16 unless the section sets bf16/fp16."""
    ds = copy.deepcopy(cfg.deepspeed)
    if zero_stage is not None:
        ds["zero_optimization"] = {**(ds.get("zero_optimization") or {}), "stage": zero_stage}
    if cfg.use_gpu and "bf16" not in ds and "fp16" not in ds and cfg.train_dtype() == "bfloat16":
        ds["bf16"] = {"enabled": True}
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.batch_size)
    ds.setdefault("gradient_accumulation_steps", cfg.grad_accum)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    ds.setdefault("gradient_clipping", 1.0)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    # We pass a torch AdamW; with offload DeepSpeed would otherwise insist on its CPU Adam.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if not cfg.use_gpu:
        for key in ("bf16", "fp16"):  # CPU workers train in float32
            if isinstance(ds.get(key), dict):
                ds[key] = {**ds[key], "enabled": False}
    return ds


def _adamw(groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _build_on(device, build_model: Callable[[], nn.Module]) -> nn.Module:
    if device.type == "cuda":
        # Built under the GPU as default device: from_pretrained then loads the weights
        # straight onto it (transformers reads the device context as its device_map), so
        # host memory never holds a worker's full copy.
        with torch.device(device):
            return build_model()
    return build_model()


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def as_float(outputs: Any) -> Any:
    """Model outputs under bf16 autocast -> float32 (a tensor, or a dict of them): the loss and
    the metrics are computed in full precision outside the autocast region."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: as_float(v) for k, v in outputs.items()}
    return outputs


class DDPEngine:
    """torch DDP (or the bare model for one worker) + torch AdamW + LambdaLR."""

    strategy = "ddp"
    zero_stage = -1
    zero3 = False
    files_on_every_rank = False
    """Whether every rank writes checkpoint files (DeepSpeed's shards) or rank 0 alone."""

    supports_autocast = True
    """bf16 autocast of forward and backward on CPU workers (the loop decides: TrainerConfig.autocast)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.micro_batch, self.accum = cfg.batch_size, cfg.grad_accum
        self.autocast = False

    def _autocast(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def create_model(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        return _build_on(self.ctx.device, build_model)

    def build(self, model: nn.Module, groups: list[dict], lr: float, weight_decay: float, total_steps: int,
              warmup_steps: int) -> None:
        self.optimizer = _adamw(groups, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(total_steps, warmup_steps))
        model.to(self.ctx.device)
        self.module = model
        if self.ctx.world > 1:
            kwargs = {"device_ids": [self.ctx.device.index]} if self.ctx.device.type == "cuda" else {}
            self.wrapped: nn.Module = nn.parallel.DistributedDataParallel(model, **kwargs)
        else:
            self.wrapped = model

    def forward(self, **inputs) -> Any:
        with self._autocast():
            out = self.wrapped(**inputs)
        return as_float(out) if self.autocast else out

    def step(self, micro_batches: list[tuple[dict, Any]], loss_of: Callable[[Any, Any], torch.Tensor]) -> list[float]:
        """Forward + backward of each micro-batch (gradients synchronised on the last only),
        then clip, AdamW and schedule. Returns each micro-batch's loss."""
        losses = []
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or self.ctx.world == 1) else self.wrapped.no_sync()
            with sync:
                loss = loss_of(self.forward(**inputs), targets)
                (loss / len(micro_batches)).backward()
            losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_([p for _, p in _trainable(self.module)], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool) -> None:
        self.module.train(mode)

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in _trainable(self.module)}

    def save(self, directory: str, rank: int) -> None:
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, OPTIM))

    def load(self, directory: str) -> None:
        # not at module level: safetensors, loaded only when this runs
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(os.path.join(directory, TRAINABLE)), strict=False)
        state = torch.load(os.path.join(directory, OPTIM), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    """deepspeed.initialize over a torch AdamW + LambdaLR; ZeRO stage from the config."""

    strategy = "deepspeed"
    files_on_every_rank = True
    supports_autocast = False
    """DeepSpeed has its own mixed precision (its bf16 section), not torch autocast."""
    autocast = False

    def __init__(self, cfg, ctx, zero_stage: int | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.ds_config = deepspeed_config(cfg, ctx.world, zero_stage)
        self.micro_batch = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.zero_stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))
        self.zero3 = self.zero_stage == 3
        self.hf_ds_config = None

    def create_model(self, build_model: Callable[[], nn.Module]) -> nn.Module:
        if self.zero3 and self.cfg.zero3_partitioned_init:
            # transformers keeps only a weak reference: held for the engine's life. With it,
            # from_pretrained/from_config build the model inside deepspeed.zero.Init (and the
            # teacher's load_backbone streams the checkpoint into the shards).
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)
            return_freed_memory()
            return build_model()
        return _build_on(self.ctx.device, build_model)

    def build(self, model: nn.Module, groups: list[dict], lr: float, weight_decay: float, total_steps: int,
              warmup_steps: int) -> None:
        # not at module level: deepspeed, loaded only when this runs
        import deepspeed

        lr_fn = cosine_with_warmup(total_steps, warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=_adamw(groups, lr, weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
        self.module = self.engine.module

    def forward(self, **inputs) -> Any:
        return self.engine(**inputs)

    def step(self, micro_batches: list[tuple[dict, Any]], loss_of: Callable[[Any, Any], torch.Tensor]) -> list[float]:
        """DeepSpeed scales each backward by 1/accum and steps optimiser and schedule at the
        accumulation boundary (the last micro-batch of the group)."""
        losses = []
        for inputs, targets in micro_batches:
            loss = loss_of(self.engine(**inputs), targets)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
        return losses

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self, mode: bool) -> None:
        self.module.train(mode)
        self.engine.train(mode)

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (a collective under ZeRO-3: shards gathered)."""
        named = _trainable(self.module)
        if self.zero3:
            # not at module level: imported only on this branch
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named}
        return {n: p.detach().cpu().clone() for n, p in named}

    def save(self, directory: str, rank: int) -> None:
        """Every rank writes its own ZeRO shards (Ray merges the ranks' directories)."""
        self.engine.save_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        self.engine.load_checkpoint(os.path.join(directory, DS_DIR), tag=DS_TAG, load_module_strict=False)


Engine = DDPEngine | DeepSpeedEngine


def make_engine(cfg, task, ctx) -> tuple[Engine, dict]:
    """The engine cfg.strategy asks for (`auto` resolved by memory.resolve_strategy) and what
    `auto` measured (empty otherwise)."""
    strategy, zero_stage, measured = resolve_strategy(cfg, task.model_size, ctx)
    engine: Engine = DeepSpeedEngine(cfg, ctx, zero_stage) if strategy == "deepspeed" else DDPEngine(cfg, ctx)
    return engine, measured
