"""Generic Ray Train loop shared by the teacher and the student.

Usage (the caller owns the model, the data and the loss; this file owns distribution):

    from ckd_ehr.training import TrainTask, fit

    task = TrainTask(
        build_model=lambda: MyModel(...),          # on each worker; CPU module, requires_grad set
        load_data=lambda: (train_examples, val_examples),   # on each worker (read via storage.py)
        collate=my_collate,                        # list[example] -> (model kwargs dict, targets)
        loss_fn=my_loss,                           # (logits, targets, progress 0..1) -> scalar
        param_groups=None,                         # model -> AdamW groups (e.g. separate head lr)
        eval_fn=multilabel_metrics,                # (logits ndarray, labels ndarray) -> metrics
        labels_of=None,                            # targets -> labels tensor (default: targets or targets["labels"])
        save_weights=None,                         # (model, full trainable state dict, dir): extra files per checkpoint
        model_size=None,                           # () -> ModelSize, for strategy `auto` (estimated, no weights loaded)
    )
    result = fit(cfg.student, task, storage_path=layout.student_train(v), name="run")
    with result.best_checkpoint.as_directory() as d: ...   # trainable.safetensors + your files

Everything in TrainTask runs on the workers, so it must pickle (cloudpickle: closures are fine).
Examples are dicts; `example["length"]` (tokens) drives length grouping when present.
Reported metrics: step, epoch, train_loss, train_loss_first, resumed_from_step, lr,
samples_per_s, train_padding_efficiency (real tokens / computed tokens of the training
batches so far, all ranks; from each batch's attention_mask), strategy (as resolved),
local_param_fraction (share of the model's elements a worker held right after building it:
about 1/world under ZeRO-3's partitioned init, 1 otherwise), worker_peak_rss_mib (largest
VmHWM of the worker processes) and at validations val_loss + `val_` + each key of eval_fn's
result + val_padding_efficiency.

What fit does:
- TorchTrainer with cfg.num_workers workers (gloo on CPU, NCCL on GPU), strategy `ddp`
  (torch DDP, no_sync during accumulation) or `deepspeed` (cfg.deepspeed, with micro batch,
  accumulation and train_batch_size filled in; a torch AdamW is passed in so no fused op is
  compiled; ZeRO-3 parameters are gathered for saving), or `auto` (`choose_strategy`: ddp if
  `estimate_train_memory` fits cfg.fit_fraction of the smallest worker's device, else ZeRO-3).
- ZeRO-3 with cfg.zero3_partitioned_init: the model is built under transformers'
  HfDeepSpeedConfig, so `from_pretrained` runs inside deepspeed.zero.Init and every worker
  holds only its shard of the weights from the start (never the full model).
- Length-grouped batches: a seeded shuffle, sorted by length within mega-batches, padded per
  batch by `collate`; the same global batch list on every rank, each rank takes batches
  rank::world (so every rank runs the same number of steps, which ZeRO-3 needs).
- AdamW + linear warm-up (cfg.warmup_ratio) + cosine decay per optimiser step; grad clip 1.0.
- Validation at every epoch end (and when cfg.max_steps stops training): val_loss, metrics of
  `eval_fn` on the gathered validation logits, reported with a checkpoint.
- Checkpoints every epoch and every cfg.checkpoint_every_steps steps; Ray keeps
  cfg.num_checkpoints_to_keep scored by cfg.best_metric. Each checkpoint holds
  `trainable.safetensors` (full trainable weights, whatever the strategy), `train_state.json`
  (epoch, step, batches done), `val_logits.npy` + `val_labels.npy` when validated (rows in the
  order of load_data's validation examples: use them to tune thresholds), the optimiser
  state (`optim.pt` for ddp, DeepSpeed's own files under `ds/` for deepspeed) and what
  `save_weights` writes.
- Resume: ray.train.get_checkpoint() restores weights, optimiser, schedule and the position
  inside the epoch; Ray restarts failed workers up to cfg.max_failures times.
- cfg.fail_at_step (debug): one worker raises once at that step; a marker file in the run's
  storage makes it fail only once.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ckd_ehr.contracts import PROBE_HEAD

log = logging.getLogger("ckd_ehr.training")

TRAINABLE = "trainable.safetensors"
TRAIN_STATE = "train_state.json"
DS_DIR = "ds"
DS_TAG = "state"
FAIL_MARKER = "fail_injected.marker"


# --- plain pieces, testable without Ray ---------------------------------------------------

def format_duration(seconds: float) -> str:
    """A short human duration for progress lines: '45 s', '3.2 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Validation metrics of logits: ckd_ehr.evaluation.metrics.all_scores on the probabilities (the same
    definitions the evaluate stage reports, checked there against scikit-learn), plus
    `n_auroc_labels`, the phenotypes with both classes present (macro AUROC averages those)."""
    from ckd_ehr.evaluation.metrics import all_scores, single_class_labels

    labels = np.asarray(labels).astype(int)
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    if not labels.size:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "micro_f1": float("nan"),
                "macro_auroc": float("nan"), "micro_auroc": float("nan"), "n_auroc_labels": 0}
    out = all_scores(labels, probs, threshold)
    out["n_auroc_labels"] = int((~single_class_labels(labels)).sum())
    return out


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up then cosine decay to 0."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, world: int = 1,
                           rank: int = 0, mega: int = 50) -> list[np.ndarray]:
    """This rank's batches (index arrays) for one epoch: a seeded shuffle, sorted by length
    inside mega-batches of `mega` global batches so each batch pads little, then the batch
    order shuffled. Every rank gets the same number of batches."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    span = batch_size * world * mega
    batches = []
    for s in range(0, len(idx), span):
        chunk = idx[s: s + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def eval_batches(lengths: Sequence[int], batch_size: int, world: int, rank: int) -> list[np.ndarray | None]:
    """Validation batches sorted by length, rank-strided; padded with None so every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    n = math.ceil(len(batches) / world) if batches else 0
    mine: list[np.ndarray | None] = list(batches[rank::world])
    return mine + [None] * (n - len(mine))


def subset_indices(n_total: int, max_n: int | None, seed: int) -> np.ndarray:
    """The training rows kept under cfg.max_train_samples (a seeded sample, in file order).
    load_data may apply it itself to skip work on rows that would be dropped anyway."""
    if not max_n or n_total <= max_n:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:max_n])


def default_labels_of(targets: Any) -> torch.Tensor:
    return targets["labels"] if isinstance(targets, dict) else targets


def to_device(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


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


# --- strategy `auto`: does the model train on one device? ---------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_world_size))


# --- measurements every loop reports ------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_freed_memory(mmap_threshold: int = 1 << 20) -> None:
    """glibc only (a no-op elsewhere): serve allocations of `mmap_threshold` bytes or more by
    mmap, with the threshold fixed (glibc otherwise raises it up to 32 MiB as large blocks are
    freed), and hand the heap's free top back (malloc_trim). ZeRO-3 loading gathers and frees
    one full parameter after another; without this the freed buffers stay resident in the
    heap and a worker's RSS climbs towards a full copy even though it holds only its shard."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def padding_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """Real tokens / computed tokens (batch rows x padded width); 1.0 = no padding."""
    return float(real_tokens) / computed_tokens if computed_tokens else float("nan")


def batch_tokens(inputs: dict) -> tuple[int, int]:
    """(real, computed) tokens of a collated batch, from its attention_mask ((0, 0) without one)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return 0, 0
    return int(mask.sum()), int(mask.numel())


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


@dataclass
class TrainTask:
    """What a caller supplies to `fit`; see the module docstring."""

    build_model: Callable[[], nn.Module]
    load_data: Callable[[], tuple[Sequence[dict], Sequence[dict]]]
    collate: Callable[[list[dict]], tuple[dict[str, torch.Tensor], Any]]
    loss_fn: Callable[[torch.Tensor, Any, float], torch.Tensor]
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    eval_fn: Callable[[np.ndarray, np.ndarray], dict] = multilabel_metrics
    labels_of: Callable[[Any], torch.Tensor] | None = None
    save_weights: Callable[[nn.Module, dict, str], None] | None = None
    model_size: Callable[[], ModelSize] | None = None


@dataclass
class TrainResult:
    best_checkpoint: Any
    """ray.train.Checkpoint picked by cfg.best_metric (use .as_directory())."""
    best_metrics: dict
    """Metrics reported with the best checkpoint."""
    latest_checkpoint: Any
    metrics: dict
    """The last reported metrics."""
    path: str
    """The run's storage directory."""
    history: list[dict] = field(default_factory=list)
    """Metrics of every kept checkpoint."""

    @property
    def best_checkpoint_path(self) -> str:
        return self.best_checkpoint.path


# --- the worker loop ----------------------------------------------------------------------

class _Worker:
    """State of one training worker; methods are the steps of the loop."""

    def __init__(self, cfg, task: TrainTask, marker: str | None):
        import ray.train
        import ray.train.torch

        self.cfg, self.task, self.marker = cfg, task, marker
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if not cfg.use_gpu:
            # round, not floor: a Tune trial's worker holds e.g. 0.99 of a CPU (see ckd_ehr.tune.run)
            torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.labels_of = task.labels_of or default_labels_of
        self.start_peak_rss = peak_rss_bytes()
        self.memory_estimate: dict = {}
        self.strategy, zero_stage = self._resolve_strategy()
        self.ds = self.strategy == "deepspeed"
        self.zero3 = False
        self.tokens = {"train": [0, 0], "val": [0, 0]}   # [real, computed] on this rank

        train, val = task.load_data()
        train, val = list(train), list(val)
        if cfg.max_train_samples and len(train) > cfg.max_train_samples:
            train = [train[i] for i in subset_indices(len(train), cfg.max_train_samples, cfg.seed)]
        if cfg.max_eval_samples:
            val = val[: cfg.max_eval_samples]
        self.train, self.val = train, val
        self.train_len = [int(e.get("length", 1)) for e in train]
        self.val_len = [int(e.get("length", 1)) for e in val]

        if self.ds:
            self.ds_config = deepspeed_config(cfg, self.world, zero_stage)
            self.micro_bs = self.ds_config["train_micro_batch_size_per_gpu"]
            self.accum = self.ds_config["gradient_accumulation_steps"]
            self.zero3 = (self.ds_config.get("zero_optimization") or {}).get("stage", 0) == 3
        else:
            self.micro_bs, self.accum = cfg.batch_size, cfg.grad_accum
        n_batches = len(length_grouped_batches(self.train_len, self.micro_bs, cfg.seed, 0, self.world, self.rank))
        self.steps_per_epoch = n_batches // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(train)} training samples make no full optimiser step with batch {self.micro_bs}"
                             f" x accumulation {self.accum} x {self.world} workers")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._build()

    def _resolve_strategy(self) -> tuple[str, int | None]:
        """(`ddp` | `deepspeed`, ZeRO stage override): cfg.strategy, or for `auto` the pick of
        choose_strategy against the smallest device of all ranks (so every rank agrees)."""
        import ray.train
        import torch.distributed as dist

        cfg = self.cfg
        if cfg.strategy != "auto":
            return cfg.strategy, None
        if self.task.model_size is None:
            raise ValueError("strategy 'auto' needs the task's model_size (the teacher gives it); "
                             "set strategy to ddp or deepspeed")
        size = self.task.model_size()
        need = estimate_train_memory(size, cfg.batch_size, cfg.max_length, cfg.use_gradient_checkpointing())
        have = device_memory_bytes(self.device, ray.train.get_context().get_local_world_size())
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            t = torch.tensor([float(have)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            have = int(t.item())
        choice = choose_strategy(need, have, cfg.fit_fraction)
        self.memory_estimate = {"auto_estimate_gib": round(need / 2**30, 2), "auto_device_gib": round(have / 2**30, 2)}
        if self.rank == 0:
            log.info("strategy auto: %.2f GiB estimated for ddp vs %.0f%% of %.2f GiB per device -> %s "
                     "(%d params, %d trainable)", need / 2**30, 100 * cfg.fit_fraction, have / 2**30,
                     "ddp" if choice == "ddp" else "deepspeed ZeRO-3", size.total_params, size.trainable_params)
        return ("ddp", None) if choice == "ddp" else ("deepspeed", 3)

    def _build(self) -> None:
        cfg = self.cfg
        self.hf_ds_config = None
        if self.zero3 and cfg.zero3_partitioned_init:
            # transformers keeps only a weak reference: held for the worker's life. With it,
            # from_pretrained/from_config build the model inside deepspeed.zero.Init (and the
            # teacher's load_backbone streams the checkpoint into the shards).
            from transformers.integrations import HfDeepSpeedConfig

            self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)
            return_freed_memory()
            model = self.task.build_model()
        elif self.device.type == "cuda":
            # Built under the GPU as default device: from_pretrained then loads the weights
            # straight onto it (transformers reads the device context as its device_map), so
            # host memory never holds a worker's full copy.
            with torch.device(self.device):
                model = self.task.build_model()
        else:
            model = self.task.build_model()
        self.build_local_fraction = local_param_fraction(model)
        self.build_peak_rss = peak_rss_bytes()
        if self.rank == 0:
            log.info("model built: this worker holds %.3f of its parameters' elements, peak RSS %.0f MiB",
                     self.build_local_fraction, self.build_peak_rss / 2**20)
        self.probe_metrics: dict = {}
        self.probe = self._fit_probe(model) if cfg.head_init == "probe" else None
        groups = self.task.param_groups(model) if self.task.param_groups else \
            [{"params": [p for p in model.parameters() if p.requires_grad]}]
        groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        lr_fn = cosine_with_warmup(self.total_steps, warmup)
        if self.ds:
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
            self.module = self.engine.module
            self.forward = self.engine
        else:
            model.to(self.device)
            self.module = model
            self.optimizer = optimizer
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
            if self.world > 1:
                ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
                self.forward = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
            else:
                self.forward = model
        self.trainable_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.resumed_from = -1          # step of the checkpoint this attempt started from
        self.first_loss = float("nan")  # train loss of step 1, reported so callers can see it fall

    # linear probe, then fine-tune ---------------------------------------------------------

    def _fit_probe(self, model: nn.Module):
        """head_init `probe`: fit ckd_ehr.modeling.probe's logistic regression on the frozen model's
        pooled features of every training and validation sample (all ranks' shares gathered,
        the same deterministic fit on each rank) and load it into the model's head."""
        from ckd_ehr.modeling.probe import fit_probe

        if self.zero3:
            raise ValueError("head_init: probe needs an unpartitioned model (ddp or DeepSpeed ZeRO-1/2), "
                             "not ZeRO-3")
        if not hasattr(model, "features") or not hasattr(model, "load_probe"):
            raise ValueError(f"head_init: probe: {type(model).__name__} has no features()/load_probe()")
        start = time.time()
        model.to(self.device)
        x_train, y_train = self._pooled_features(model, self.train, self.train_len)
        x_val, y_val = self._pooled_features(model, self.val, self.val_len)
        probe = fit_probe(x_train, y_train, x_val, y_val, seed=self.cfg.seed)
        model.load_probe(probe)
        self.probe_metrics = {"probe_val_macro_auroc": probe.val_macro_auroc, "probe_c": probe.c_value,
                              "probe_s": round(time.time() - start, 1)}
        if self.rank == 0:
            log.info("head_init probe: head set to the linear probe (C=%s, validation macro AUROC %.4f) in %.0f s",
                     probe.c_value, probe.val_macro_auroc, time.time() - start)
        return probe

    @torch.no_grad()
    def _pooled_features(self, model: nn.Module, examples: Sequence[dict], lengths: list[int]
                         ) -> tuple[np.ndarray, np.ndarray]:
        """model.features of `examples` [N, H] and their labels [N, K], in input order."""
        import torch.distributed as dist

        was = model.training
        model.eval()
        bs = self.cfg.eval_batch_size or 2 * self.micro_bs
        mine, batches = [], eval_batches(lengths, bs, self.world, self.rank)
        start, last = time.time(), time.time()
        for b, idx in enumerate(batches):
            if self.rank == 0 and time.time() - last > 30:
                last, per = time.time(), (time.time() - start) / b
                log.info("head_init probe: features of batch %d/%d, about %s left", b, len(batches),
                         format_duration(per * (len(batches) - b)))
            if idx is None:
                continue
            inputs, targets = self.task.collate([examples[i] for i in idx])
            feats = model.features(**to_device(inputs, self.device))
            mine.append((idx, feats.float().cpu().numpy(), self.labels_of(targets).float().cpu().numpy()))
        parts = [mine]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
        model.train(was)
        rows = [r for p in parts for r in p]
        order = np.argsort(np.concatenate([r[0] for r in rows]))
        return (np.concatenate([r[1] for r in rows])[order], np.concatenate([r[2] for r in rows])[order])

    # checkpoints -------------------------------------------------------------------------

    def gather_trainable(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (ZeRO-3 shards gathered)."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named}
        return {n: p.detach().cpu().clone() for n, p in named}

    def save_and_report(self, metrics: dict, val_out: tuple[np.ndarray, np.ndarray] | None) -> None:
        import ray.train
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix=f"ckpt-r{self.rank}-")
        try:
            if self.ds:  # every rank writes its own ZeRO shards; Ray merges the directories
                self.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
            state = self.gather_trainable()
            if self.rank == 0:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, TRAINABLE))
                if not self.ds:
                    torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                               os.path.join(tmp, "optim.pt"))
                with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
                    json.dump({"epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
                               "total_steps": self.total_steps, "world": self.world,
                               "first_loss": self.first_loss}, f)
                if val_out is not None:
                    np.save(os.path.join(tmp, "val_logits.npy"), val_out[0])
                    np.save(os.path.join(tmp, "val_labels.npy"), val_out[1])
                if self.task.save_weights:
                    self.task.save_weights(self.module, state, tmp)
                if self.probe is not None:  # the head's starting point, for evaluate's probe rows
                    self.probe.save(os.path.join(tmp, PROBE_HEAD))
            has_files = self.rank == 0 or self.ds
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self) -> bool:
        import ray.train
        from safetensors.torch import load_file

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            with open(os.path.join(d, TRAIN_STATE)) as f:
                st = json.load(f)
            if self.ds:
                self.engine.load_checkpoint(os.path.join(d, DS_DIR), tag=DS_TAG, load_module_strict=False)
            else:
                self.module.load_state_dict(load_file(os.path.join(d, TRAINABLE)), strict=False)
                opt = torch.load(os.path.join(d, "optim.pt"), map_location="cpu", weights_only=False)
                self.optimizer.load_state_dict(opt["optimizer"])
                self.scheduler.load_state_dict(opt["scheduler"])
        self.epoch, self.step, self.batches_done = st["epoch"], st["step"], st["batches_done"]
        self.first_loss = st.get("first_loss", float("nan"))
        self.resumed_from = self.step
        if self.batches_done >= self.steps_per_epoch * self.accum:  # saved at an epoch end
            self.epoch, self.batches_done = self.epoch + 1, 0
        if self.rank == 0:
            log.info("resumed from checkpoint at epoch %d step %d", self.epoch, self.step)
        return True

    # steps -------------------------------------------------------------------------------

    def maybe_fail(self) -> None:
        from ckd_ehr import storage

        if self.cfg.fail_at_step is None or self.step != self.cfg.fail_at_step or not self.marker:
            return
        if self.rank != (1 if self.world > 1 else 0) or storage.exists(self.marker):
            return
        storage.write_text(self.marker, f"failed once at step {self.step}\n")
        raise RuntimeError(f"injected failure at step {self.step} (cfg.fail_at_step)")

    @torch.no_grad()
    def validate(self) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
        import torch.distributed as dist

        if not self.val:
            return {"val_loss": float("nan")}, None
        was = self.module.training
        self.module.eval()
        bs = self.cfg.eval_batch_size or 2 * self.micro_bs
        self.tokens["val"] = [0, 0]
        mine: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        loss_sum, n = 0.0, 0
        progress = self.step / max(1, self.total_steps)
        for idx in eval_batches(self.val_len, bs, self.world, self.rank):
            # Ranks short of a batch repeat one and discard it: ZeRO-3 forwards are collective.
            use = idx if idx is not None else np.arange(min(1, len(self.val)))
            inputs, targets = self.task.collate([self.val[i] for i in use])
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            logits = self.forward(**inputs)
            if idx is None:
                continue
            self._count("val", inputs)
            loss_sum += float(self.task.loss_fn(logits, targets, progress)) * len(idx)
            n += len(idx)
            mine.append((idx, logits.float().cpu().numpy(), self.labels_of(targets).float().cpu().numpy()))
        parts: list = [(mine, loss_sum, n, *self.tokens["val"])]
        if self.world > 1:
            mine_part, parts = parts[0], [None] * self.world
            dist.all_gather_object(parts, mine_part)
        self.module.train(was)
        if self.ds:
            self.engine.train(was)
        rows = [r for p in parts for r in p[0]]
        total_n = sum(p[2] for p in parts)
        order = np.concatenate([r[0] for r in rows])
        logits = np.concatenate([r[1] for r in rows])[np.argsort(order)]
        labels = np.concatenate([r[2] for r in rows])[np.argsort(order)]
        metrics = {f"val_{k}": v for k, v in self.task.eval_fn(logits, labels).items()}
        metrics["val_loss"] = sum(p[1] for p in parts) / max(1, total_n)
        real, computed = sum(p[3] for p in parts), sum(p[4] for p in parts)
        metrics["val_padding_efficiency"] = padding_efficiency(real, computed)
        return metrics, (logits, labels)

    def _count(self, which: str, inputs: dict) -> None:
        real, computed = batch_tokens(inputs)
        self.tokens[which][0] += real
        self.tokens[which][1] += computed

    def run_stats(self) -> dict:
        """Measurements over all ranks (a collective: every rank calls it at the same step)."""
        import torch.distributed as dist

        vals = [float(self.tokens["train"][0]), float(self.tokens["train"][1])]
        peaks = [float(peak_rss_bytes()), float(self.build_peak_rss), self.build_local_fraction]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dev = self.device if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor(vals, dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            m = torch.tensor(peaks, dtype=torch.float64, device=dev)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            vals, peaks = t.tolist(), m.tolist()
        return {"train_padding_efficiency": padding_efficiency(int(vals[0]), int(vals[1])),
                "strategy": self.strategy,
                "zero_stage": int((self.ds_config.get("zero_optimization") or {}).get("stage", 0)) if self.ds else -1,
                "worker_peak_rss_mib": round(peaks[0] / 2**20, 1),
                "worker_build_peak_rss_mib": round(peaks[1] / 2**20, 1),
                "worker_start_rss_mib": round(self.start_peak_rss / 2**20, 1),
                "local_param_fraction": round(peaks[2], 4), **self.memory_estimate}

    def train_step(self, batch_idx: list[np.ndarray]) -> float:
        """One optimiser step over `accum` micro-batches; returns the mean micro-batch loss."""
        import contextlib

        progress = self.step / max(1, self.total_steps)
        losses = []
        for i, idx in enumerate(batch_idx):
            inputs, targets = self.task.collate([self.train[j] for j in idx])
            self._count("train", inputs)
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            if self.ds:
                loss = self.task.loss_fn(self.engine(**inputs), targets, progress)
                self.engine.backward(loss)  # DeepSpeed scales by 1/accum itself
                self.engine.step()          # steps optimiser + schedule at the accumulation boundary
            else:
                last = i == len(batch_idx) - 1
                sync = contextlib.nullcontext() if (last or self.world == 1) else self.forward.no_sync()
                with sync:
                    loss = self.task.loss_fn(self.forward(**inputs), targets, progress)
                    (loss / len(batch_idx)).backward()
            losses.append(float(loss.detach()))
        if not self.ds:
            params = [p for p in self.module.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(np.mean(losses))

    def run(self) -> dict:
        cfg = self.cfg
        self.restore()
        start, seen, last_loss = time.time(), 0, float("nan")
        metrics: dict = {}
        if self.probe is not None and self.step == 0 and self.resumed_from < 0:
            # The probe is the first point of the training path: validated and reported as step
            # 0, so checkpoint selection keeps it when fine-tuning does not beat it on validation.
            metrics = {"step": 0, "epoch": 0.0, "train_loss": float("nan"), "train_loss_first": float("nan"),
                       "resumed_from_step": self.resumed_from, "lr": 0.0, "samples_per_s": 0.0,
                       **self.probe_metrics, **self.run_stats()}
            val, out = self.validate()
            metrics.update(val)
            if self.rank == 0:
                log.info("validation of the probe (step 0): %s",
                         {k: round(v, 4) for k, v in val.items() if isinstance(v, float)})
            self.save_and_report(metrics, out)
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            batches = length_grouped_batches(self.train_len, self.micro_bs, cfg.seed, self.epoch, self.world,
                                             self.rank)[: self.steps_per_epoch * self.accum]
            while self.batches_done < len(batches) and self.step < self.total_steps:
                group = batches[self.batches_done: self.batches_done + self.accum]
                last_loss = self.train_step(group)
                if self.step == 1:
                    self.first_loss = last_loss
                self.batches_done += len(group)
                seen += sum(len(b) for b in group) * self.world
                epoch_end = self.batches_done >= len(batches)
                done = self.step >= self.total_steps
                metrics = {"step": self.step, "epoch": self.epoch + self.batches_done / len(batches),
                           "train_loss": last_loss, "train_loss_first": self.first_loss,
                           "resumed_from_step": self.resumed_from, "lr": self.scheduler.get_last_lr()[0],
                           "samples_per_s": seen / max(1e-9, time.time() - start), **self.probe_metrics}
                if self.rank == 0 and (self.step % 10 == 0 or epoch_end or done or self.step == 1):
                    per_step = (time.time() - start) / max(1, self.step - max(0, self.resumed_from))
                    log.info("step %d/%d epoch %.2f loss %.4f (%.1f s/step, about %s left)", self.step,
                             self.total_steps, metrics["epoch"], last_loss, per_step,
                             format_duration(per_step * (self.total_steps - self.step)))
                if epoch_end or done or (cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0):
                    metrics.update(self.run_stats())
                    if self.rank == 0:
                        log.info("step %d: train padding efficiency %.3f (real / computed tokens), worker peak RSS "
                                 "%.0f MiB", self.step, metrics["train_padding_efficiency"],
                                 metrics["worker_peak_rss_mib"])
                if epoch_end or done:
                    val, out = self.validate()
                    metrics.update(val)
                    if self.rank == 0:
                        log.info("validation at step %d: %s", self.step,
                                 {k: round(v, 4) for k, v in val.items() if isinstance(v, float)})
                    self.save_and_report(metrics, out)
                elif cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                    # NaN score: Ray ranks it below every validated checkpoint, without an error log.
                    self.save_and_report({**metrics, cfg.best_metric: float("nan")}, None)
                self.maybe_fail()
            if self.batches_done >= len(batches):
                self.epoch, self.batches_done = self.epoch + 1, 0
        return metrics


def _train_loop_per_worker(config: dict) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _Worker(config["cfg"], config["task"], config.get("marker")).run()


# --- the driver ---------------------------------------------------------------------------

def fit(cfg, task: TrainTask, storage_path: str, name: str = "train", callbacks: list | None = None) -> TrainResult:
    """Train with Ray Train (see the module docstring). `cfg` is a TrainerConfig (or subclass);
    `storage_path` a local directory or URI; reusing (storage_path, name) resumes that run.
    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback when a Tune trial runs this."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckd_ehr import storage

    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    mode = "min" if cfg.best_metric == "val_loss" else "max"
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": cfg, "task": task, "marker": storage.join(storage_path, name, FAIL_MARKER)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep,
                                               checkpoint_score_attribute=cfg.best_metric,
                                               checkpoint_score_order=mode)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if _finite(m.get(cfg.best_metric))]
    if scored:
        pick = max if mode == "max" else min
        best, best_metrics = pick(scored, key=lambda cm: cm[1][cfg.best_metric])
    else:
        best, best_metrics = result.checkpoint, dict(result.metrics or {})
    history = [dict(m) for _, m in (result.best_checkpoints or [])]
    return TrainResult(best_checkpoint=best, best_metrics=dict(best_metrics), latest_checkpoint=result.checkpoint,
                       metrics=dict(result.metrics or {}), path=str(result.path), history=history)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
