"""Memory: the estimate behind strategy `auto` (does the model train on one device under ddp,
or does it need ZeRO-3?) and the measurements every training run reports (peak RSS, the share
of the parameters a worker holds). No Ray."""
from __future__ import annotations

import logging
from dataclasses import dataclass
import resource
import ctypes
import ctypes.util

import torch
from torch import nn
import torch.distributed as dist

log = logging.getLogger("ckd_ehr.training")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSize:
    """What `estimate_train_memory` needs to know of a model, without loading its weights."""

    total_params: int
    trainable_params: int
    param_bytes: int
    """Bytes per weight (2 for bf16/fp16, 4 for float32)."""
    hidden_size: int
    num_layers: int


def estimate_train_memory(size: ModelSize, batch_size: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes one ddp worker needs to train `size` at micro-batch `batch_size` x `seq_len` tokens:

    - the weights: total_params x param_bytes (frozen or not, every ddp rank holds them all);
    - trainable parameters: fp32 gradient + AdamW's two fp32 moments (+ an fp32 master copy
      when the weights are 16-bit): (3 or 4) x 4 bytes each;
    - activations kept for the backward pass, after Korthikanti et al. 2022 ("Reducing
      activation recomputation", ~34 x hidden bytes per token per layer in 16 bits, attention
      scores excluded: SDPA's fused kernels do not store them): 17 x param_bytes x hidden per
      token per layer; with gradient checkpointing only each layer's input (param_bytes x
      hidden per token per layer) plus one layer recomputed at a time.
    An estimate with no allocator overhead: `choose_strategy` compares it against a fraction
    (cfg.fit_fraction) of the device's memory."""
    weights = size.total_params * size.param_bytes
    per_trainable = 4 * (3 + (1 if size.param_bytes < 4 else 0))
    tokens = batch_size * seq_len
    per_layer = 17 * size.param_bytes * size.hidden_size * tokens
    if checkpointing:
        acts = size.num_layers * size.param_bytes * size.hidden_size * tokens + per_layer
    else:
        acts = size.num_layers * per_layer
    return int(weights + size.trainable_params * per_trainable + acts)


def choose_strategy(needed_bytes: int, device_bytes: int, fit_fraction: float) -> str:
    """`ddp` when the estimate fits `fit_fraction` of the device, else `zero3`."""
    return "ddp" if needed_bytes <= fit_fraction * device_bytes else "zero3"


def device_memory_bytes(device, local_world_size: int = 1) -> int:
    """Memory one worker may use: the GPU's total memory, or on CPU the node's RAM shared by
    the `local_world_size` workers on it."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    # not at module level: psutil, loaded only when this runs
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_world_size))


def resolve_strategy(cfg, model_size, ctx) -> tuple[str, int | None, dict]:
    """(`ddp` | `deepspeed`, ZeRO stage override, what `auto` measured): cfg.strategy, or for
    `auto` the pick of choose_strategy against the smallest device of all ranks (so every rank
    agrees). `model_size`: the task's () -> ModelSize; `ctx`: the loop's WorkerContext."""

    if cfg.strategy != "auto":
        return cfg.strategy, None, {}
    if model_size is None:
        raise ValueError("strategy 'auto' needs the task's model_size (the teacher gives it); "
                         "set strategy to ddp or deepspeed")
    size = model_size()
    need = estimate_train_memory(size, cfg.batch_size, cfg.max_length, cfg.use_gradient_checkpointing())
    have = device_memory_bytes(ctx.device, ctx.local_world)
    if dist.is_available() and dist.is_initialized() and ctx.world > 1:
        t = torch.tensor([float(have)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        have = int(t.item())
    choice = choose_strategy(need, have, cfg.fit_fraction)
    measured = {"auto_estimate_gib": round(need / 2**30, 2), "auto_device_gib": round(have / 2**30, 2)}
    if ctx.rank == 0:
        log.info("strategy auto: %.2f GiB estimated for ddp vs %.0f%% of %.2f GiB per device -> %s "
                 "(%d params, %d trainable)", need / 2**30, 100 * cfg.fit_fraction, have / 2**30,
                 "ddp" if choice == "ddp" else "deepspeed ZeRO-3", size.total_params, size.trainable_params)
    return ("ddp", None, measured) if choice == "ddp" else ("deepspeed", 3, measured)


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory(mmap_threshold: int = 1 << 20) -> None:
    """glibc only (a no-op elsewhere): serve allocations of `mmap_threshold` bytes or more by
    mmap, with the threshold fixed (glibc otherwise raises it up to 32 MiB as large blocks are
    freed), and hand the heap's free top back (malloc_trim). ZeRO-3 loading gathers and frees
    one full parameter after another; without this the freed buffers stay resident in the
    heap and a worker's RSS climbs towards a full copy even though it holds only its shard."""

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def local_param_fraction(model: nn.Module) -> float:
    """Elements of the model's parameters this process holds / the model's elements. A ZeRO-3
    partitioned parameter holds only its shard (`ds_tensor`) of `ds_numel`."""
    held = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            full += p.ds_numel
            held += p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else 0
        else:
            full += p.numel()
            held += p.numel()
    return held / full if full else 1.0
