"""The training loop of one worker, in plain torch: it talks to Ray (or to nothing) only
through a `Reporter`, so it runs in-process in tests (`LocalReporter`) and on Ray Train
workers (ckd_ehr.training.ray_train.RayReporter) alike.

What a run does:
- load the task's data (cfg.max_train_samples / max_eval_samples applied), pick the engine
  (engines.make_engine: ddp, deepspeed, or `auto`), build the model where the engine wants it;
- head_init `probe`: fit ckd_ehr.modeling.probe's logistic regression on the frozen model's pooled
  features and load it into the head, then validate and report it as step 0, so best-checkpoint
  selection keeps it when fine-tuning does not beat it;
- length-grouped batches (the same global batch list on every rank, each rank takes batches
  rank::world), AdamW + linear warm-up (cfg.warmup_ratio) + cosine decay, grad clip 1.0;
- validation at every epoch end (and when cfg.max_steps stops training): val_loss, the task's
  eval_fn on the gathered validation scores, val_padding_efficiency; reported with a checkpoint;
- checkpoints every epoch and every cfg.checkpoint_every_steps steps (NaN score). Each holds
  `trainable.safetensors` (full trainable weights, whatever the engine), `train_state.json`
  (epoch, step, batches done), `val_logits.npy` + `val_labels.npy` when validated (rows in the
  order of load_data's validation examples), the engine's optimiser state (`optim.pt` or `ds/`),
  `probe_head` files under head_init probe, and what the task's save_weights writes;
- resume: the reporter's latest checkpoint restores weights, optimiser, schedule and the
  position inside the epoch;
- cfg.fail_at_step (debug): one worker raises once at that step; a marker file (path given by
  the caller, storage.py) makes it fail only once.

Reported metrics: step, epoch, train_loss, train_loss_first, resumed_from_step, lr,
samples_per_s, train_padding_efficiency, strategy, zero_stage, local_param_fraction,
worker_peak_rss_mib, worker_build_peak_rss_mib, worker_start_rss_mib (+ auto_estimate_gib,
auto_device_gib under `auto`, probe_* under head_init probe) and at validations val_loss +
`val_` + each key of eval_fn's result + val_padding_efficiency.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ckd_ehr import storage
from ckd_ehr.contracts import PROBE_HEAD
from ckd_ehr.modeling.feature_cache import FeatureCache
from ckd_ehr.modeling.frozen import pad_cached
from ckd_ehr.training.checkpoints import Reporter, finite
from ckd_ehr.training.batching import (batch_tokens, eval_batches, length_grouped_batches, padding_efficiency,
                                       subset_indices, to_device)
from ckd_ehr.training.engines import TRAINABLE, as_float, make_engine
from ckd_ehr.training.memory import local_param_fraction, peak_rss_bytes
from ckd_ehr.training.progress import format_duration
from ckd_ehr.training.task import TrainTask
from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, compute_bottom, layer_cache_key
from ckd_ehr.modeling.probe import fit_probe, fit_probe_with_bag

log = logging.getLogger("ckd_ehr.training")

TRAIN_STATE = "train_state.json"
FAIL_MARKER = "fail_injected.marker"


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker stands: its rank of `world`, workers on its node, its device."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class EvalPass:
    """One pass over eval batches, all ranks gathered: rows in input order (None when the pass
    kept none), mean loss per row, tokens."""

    loss: float
    real_tokens: int
    computed_tokens: int
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None


class TrainLoop:
    """One worker's training run; `run()` returns the last reported metrics."""

    def __init__(self, cfg, task: TrainTask, ctx: WorkerContext, reporter: Reporter,
                 fail_marker: str | None = None):
        self.cfg, self.task, self.ctx, self.reporter, self.marker = cfg, task, ctx, reporter, fail_marker
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        if not cfg.use_gpu:
            # round, not floor: a Tune trial's worker holds e.g. 0.99 of a CPU (see ckd_ehr.tune.run)
            torch.set_num_threads(max(1, round(cfg.cpus_per_worker)))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.start_peak_rss = peak_rss_bytes()
        self.engine, self.memory_estimate = make_engine(cfg, task, ctx)
        self.train_tokens = [0, 0]   # [real, computed] of this rank's training batches

        train, val = task.load_data()
        train, val = list(train), list(val)
        if cfg.max_train_samples and len(train) > cfg.max_train_samples:
            train = [train[i] for i in subset_indices(len(train), cfg.max_train_samples, cfg.seed)]
        if cfg.max_eval_samples:
            val = val[: cfg.max_eval_samples]
        self.train, self.val = train, val
        self.train_len = [int(e.get("length", 1)) for e in train]
        self.val_len = [int(e.get("length", 1)) for e in val]

        self.micro_bs, self.accum = self.engine.micro_batch, self.engine.accum
        n_batches = len(length_grouped_batches(self.train_len, self.micro_bs, cfg.seed, 0, self.world, self.rank))
        self.steps_per_epoch = n_batches // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(train)} training samples make no full optimiser step with batch {self.micro_bs}"
                             f" x accumulation {self.accum} x {self.world} workers")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self._build()

    def _build(self) -> None:
        cfg = self.cfg
        model = self.engine.create_model(self.task.build_model)
        self.build_local_fraction = local_param_fraction(model)
        self.build_peak_rss = peak_rss_bytes()
        if self.rank == 0:
            log.info("model built: this worker holds %.3f of its parameters' elements, peak RSS %.0f MiB",
                     self.build_local_fraction, self.build_peak_rss / 2**20)
        # no step to take (max_steps 0: the probe is the model): nothing to freeze or cache
        self.frozen = bool(cfg.train_top_layers) and self.total_steps > 0
        self.setup_metrics: dict = {}
        if self.frozen:
            if self.engine.zero3 or not hasattr(model, "freeze_below"):
                raise ValueError(f"train_top_layers needs an unpartitioned model (ddp, or DeepSpeed ZeRO-1/2) that "
                                 f"can run its top layers alone; {type(model).__name__} under "
                                 f"{self.engine.strategy} stage {self.engine.zero_stage} cannot")
            model.freeze_below(cfg.train_top_layers)
        self.engine.autocast = self._choose_autocast(model)
        if self.frozen:
            self._cache_frozen(model)
        self.probe_metrics: dict = {}
        self.probe = self._fit_probe(model) if cfg.head_init == "probe" else None
        groups = self.task.param_groups(model) if self.task.param_groups else \
            [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.engine.build(model, groups, cfg.lr, cfg.weight_decay, self.total_steps,
                          int(cfg.warmup_ratio * self.total_steps))
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.curve: list[dict] = []     # every validation: step, epoch, samples seen, best_metric, val_loss
        self.best_score, self.since_best, self.stopped_early = None, 0, False
        self.resumed_from = -1          # step of the checkpoint this attempt started from
        self.first_loss = float("nan")  # train loss of step 1, reported so callers can see it fall

    # the frozen part's cache and the autocast choice -----------------------------------------

    def _collate(self, examples: Sequence[dict]) -> tuple[dict, Any]:
        """The task's collate; under train_top_layers the rows' cached frozen-layer states are added
        (padded to the batch's width); the token ids stay for a model that reads them beside the
        states (a student's token bag), the others ignore them."""
        inputs, targets = self.task.collate(list(examples))
        if self.frozen and "cached" in examples[0]:
            inputs["cached"] = pad_cached([e["cached"] for e in examples], inputs["attention_mask"].shape[1])
        return inputs, targets

    def _cache_frozen(self, model: torch.nn.Module) -> None:
        """train_top_layers: the frozen part's states of every training and validation row, read
        from the task's frozen cache where it has them, computed once otherwise (and added)."""

        cfg, start = self.cfg, time.time()
        rows = self.train + self.val
        dtype = CACHE_DTYPES[cfg.frozen_cache_dtype]
        key = layer_cache_key(self.task.frozen_key or self.task.feature_key, cfg.train_top_layers,
                              cfg.frozen_cache_dtype)
        cache = LayerCache(self.task.frozen_cache, key, dtype) if self.task.frozen_cache else None
        states = cache.lookup([e["input_ids"] for e in rows]) if cache else [None] * len(rows)
        missing = [i for i, s in enumerate(states) if s is None]
        last = [time.time()]

        def progress(done, total):
            if self.rank == 0 and time.time() - last[0] > 30:
                last[0] = time.time()
                log.info("train_top_layers: frozen layers of %d/%d rows, %s", done, total,
                         format_duration(time.time() - start))

        if missing:
            model.to(self.device)
            computed = compute_bottom(model, [rows[i]["input_ids"] for i in missing],
                                      cfg.eval_batch_size or 2 * cfg.batch_size, dtype, self.device,
                                      self.engine.autocast, progress)
            for i, s in zip(missing, computed):
                states[i] = s
            if cache is not None and self.rank == 0:
                cache.add([rows[i]["input_ids"] for i in missing], computed)
        for e, s in zip(rows, states):
            e["cached"] = s
        gib = sum(s.numel() * s.element_size() for s in states) / 2**30
        self.setup_metrics.update(frozen_cache_s=round(time.time() - start, 1), frozen_rows_computed=len(missing),
                                  frozen_cache_gib=round(gib, 3))
        if self.rank == 0:
            log.info("train_top_layers %d: frozen-layer states of %d rows (%d computed, %d read from %s), %.2f GiB "
                     "%s, in %s", cfg.train_top_layers, len(rows), len(missing), len(rows) - len(missing),
                     self.task.frozen_cache, gib, cfg.frozen_cache_dtype, format_duration(time.time() - start))

    def _choose_autocast(self, model: torch.nn.Module) -> bool:
        """bf16 autocast on CPU: `on`/`off` as configured; `auto` times a training step (forward +
        backward of one median-length batch, no update) both ways and takes bf16 when it is at
        least 5% faster. Whether a CPU gains is a matter of measurement, not of its flags: AMX
        CPUs gain most, AVX512-BF16 CPUs without AMX some, others lose. Stated in the log."""
        cfg = self.cfg
        if cfg.use_gpu or cfg.autocast == "off" or not self.engine.supports_autocast:
            return False
        if cfg.autocast == "on":
            return True
        order = np.argsort(self.train_len, kind="stable")
        mid = len(order) // 2
        batch = [self.train[i] for i in order[max(0, mid - self.micro_bs // 2): mid + (self.micro_bs + 1) // 2]]
        inputs, targets = self.task.collate(batch)
        model.to(self.device)
        if self.frozen:
            inputs["cached"] = model.bottom(**to_device(inputs, self.device)).float()
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        was = model.training
        model.train(True)

        def step(on: bool) -> float:
            t = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on):
                outputs = model(**inputs)
            loss = self.task.loss(as_float(outputs), targets, 0.0)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        times = {False: [], True: []}
        for on in (False, True, False, True):
            times[on].append(step(on))
        model.train(was)
        fp32, bf16 = min(times[False]), min(times[True])
        chosen = bf16 < 0.95 * fp32
        self.setup_metrics.update(autocast_bf16=chosen, autocast_step_s_fp32=round(fp32, 3),
                                  autocast_step_s_bf16=round(bf16, 3))
        if self.rank == 0:
            log.info("autocast: bf16 %s (a training step of %d rows: %.2f s fp32, %.2f s bf16 autocast)",
                     "ON" if chosen else "off", len(batch), fp32, bf16)
        return chosen

    # linear probe, then fine-tune ---------------------------------------------------------

    def _fit_probe(self, model: torch.nn.Module):
        """head_init `probe`: fit ckd_ehr.modeling.probe's logistic regression on the frozen model's
        pooled features of every training and validation sample (all ranks' shares gathered,
        the same deterministic fit on each rank) and load it into the model's head."""

        if self.engine.zero3:
            raise ValueError("head_init: probe needs an unpartitioned model (ddp or DeepSpeed ZeRO-1/2), "
                             "not ZeRO-3")
        if not hasattr(model, "features") or not hasattr(model, "load_probe"):
            raise ValueError(f"head_init: probe: {type(model).__name__} has no features()/load_probe()")
        start = time.time()
        rows = self.train + self.val
        feats, found = self._cached_features(rows)
        missing = np.flatnonzero(~found)
        if len(missing):
            model.to(self.device)
            was = model.training
            model.eval()

            def batch_fn(inputs, targets, n):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.engine.autocast):
                    x = model.features(**inputs).float().cpu().numpy()
                return (x, np.zeros((len(x), 1), np.float32)), 0.0

            # Training and validation rows in separate passes: a batch collates rows of one kind
            # (a distilled student's training rows carry teacher probabilities, its validation rows not).
            parts = []
            for part in (missing[missing < len(self.train)], missing[missing >= len(self.train)]):
                sub = [rows[i] for i in part]
                if sub:
                    parts.append(self._over_eval_batches(sub, [int(e.get("length", 1)) for e in sub], batch_fn,
                                                         "head_init probe: features").scores)
            computed = np.concatenate(parts)
            model.train(was)
            if self.task.feature_cache and self.rank == 0:
                FeatureCache(self.task.feature_cache, self.task.feature_key).add(
                    [rows[i]["input_ids"] for i in missing], computed)
            feats = np.zeros((len(rows), computed.shape[1]), np.float32) if feats is None else feats
            feats[missing] = computed
        if self.rank == 0 and found.any():
            log.info("head_init probe: frozen features of %d of %d rows read from %s", int(found.sum()), len(rows),
                     self.task.feature_cache)
        train_x, val_x = feats[: len(self.train)], feats[len(self.train):]
        # Training rows: the task's probe targets (a distilled student's mix with the teacher);
        # validation: the labels, which the probe's C is chosen on.
        train_t = self._targets(self.train, self.task.probe_targets)
        val_y = self._targets(self.val, self.task.labels)
        bag = getattr(model, "token_bag", None)
        if bag is not None:   # the probe also fits the bag head: one logistic regression on both
            probe = fit_probe_with_bag(train_x, val_x, [e["input_ids"] for e in self.train],
                                       [e["input_ids"] for e in self.val], bag, train_t, val_y, self.cfg.seed)
        else:
            probe = fit_probe(train_x, train_t, val_x, val_y, seed=self.cfg.seed)
        model.load_probe(probe)
        self.probe_metrics = {"probe_val_macro_auroc": probe.val_macro_auroc, "probe_c": probe.c_value,
                              "probe_cv_macro_auroc": probe.cv_macro_auroc,
                              "probe_s": round(time.time() - start, 1)}
        if self.rank == 0:
            log.info("head_init probe: head set to the linear probe (C=%s, validation macro AUROC %.4f) in %.0f s",
                     probe.c_value, probe.val_macro_auroc, time.time() - start)
        return probe

    def _cached_features(self, rows: Sequence[dict]) -> tuple[np.ndarray | None, np.ndarray]:
        """task.feature_cache's features of `rows` (ckd_ehr.modeling.feature_cache: per row, keyed
        by task.feature_key and the row's token ids) and which rows it had."""
        if not self.task.feature_cache:
            return None, np.zeros(len(rows), dtype=bool)
        return FeatureCache(self.task.feature_cache, self.task.feature_key).lookup([e["input_ids"] for e in rows])

    def _targets(self, examples: Sequence[dict], target_fn: Callable) -> np.ndarray:
        """target_fn over the collated targets of `examples`, in order, without a forward pass."""
        out = [target_fn(self.task.collate(list(examples[i:i + 64]))[1]).float().cpu().numpy()
               for i in range(0, len(examples), 64)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    # validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def _over_eval_batches(self, examples: Sequence[dict], lengths: list[int], batch_fn: Callable, what: str,
                           forward_empty: Callable | None = None) -> "EvalPass":
        """One pass over this rank's eval batches of `examples` (sorted by length, rank-strided),
        all ranks gathered, rows back in input order. `batch_fn(inputs, targets, n_rows)` ->
        ((scores, labels) arrays or None, summed loss of the batch). `forward_empty(inputs)` runs
        on ranks short of a batch (a repeat of one, discarded) when forwards are collective
        (ZeRO-3 gathers parameters). Validation and the probe's features both use it."""

        bs = self.cfg.eval_batch_size or 2 * self.micro_bs
        batches = eval_batches(lengths, bs, self.world, self.rank)
        mine: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]] = []
        loss_sum, n, real, computed = 0.0, 0, 0, 0
        start, last = time.time(), time.time()
        for b, idx in enumerate(batches):
            if self.rank == 0 and time.time() - last > 30:
                last, per = time.time(), (time.time() - start) / b
                log.info("%s of batch %d/%d, about %s left", what, b, len(batches),
                         format_duration(per * (len(batches) - b)))
            if idx is None:
                if forward_empty is not None and len(examples):
                    inputs, _ = self._collate([examples[0]])
                    forward_empty(to_device(inputs, self.device))
                continue
            inputs, targets = self._collate([examples[i] for i in idx])
            r, c = batch_tokens(inputs)
            real, computed = real + r, computed + c
            rows, batch_loss = batch_fn(to_device(inputs, self.device), to_device(targets, self.device), len(idx))
            loss_sum, n = loss_sum + batch_loss, n + len(idx)
            if rows is not None:
                mine.append((idx, rows))
        parts: list = [(mine, loss_sum, n, real, computed)]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, (mine, loss_sum, n, real, computed))
        out = EvalPass(loss=sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts)),
                       real_tokens=sum(p[3] for p in parts), computed_tokens=sum(p[4] for p in parts))
        rows = [r for p in parts for r in p[0]]
        if rows:
            order = np.argsort(np.concatenate([r[0] for r in rows]))
            out.scores = np.concatenate([r[1][0] for r in rows])[order]
            out.labels = np.concatenate([r[1][1] for r in rows])[order]
        return out

    def validate(self) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
        """val_loss, `val_` + eval_fn's metrics and val_padding_efficiency over all ranks, and
        the gathered (scores, labels) in load_data's validation order (None without eval_fn)."""
        if not self.val:
            return {"val_loss": float("nan")}, None
        was = self.engine.module.training
        self.engine.module.eval()
        progress = self.step / max(1, self.total_steps)

        def loss_and_rows(inputs, targets, n):
            outputs = self.engine.forward(**inputs)
            rows = self.task.eval_rows(outputs, targets) if self.task.eval_fn else None
            return rows, float(self.task.loss(outputs, targets, progress)) * n

        res = self._over_eval_batches(self.val, self.val_len, loss_and_rows, "validation",
                                      forward_empty=lambda inputs: self.engine.forward(**inputs))
        self.engine.train(was)
        metrics = {}
        if res.scores is not None:
            metrics = {f"val_{k}": v for k, v in self.task.eval_fn(res.scores, res.labels).items()}
        metrics["val_loss"] = res.loss
        metrics["val_padding_efficiency"] = padding_efficiency(res.real_tokens, res.computed_tokens)
        return metrics, (None if res.scores is None else (res.scores, res.labels))

    def run_stats(self) -> dict:
        """Measurements over all ranks (a collective: every rank calls it at the same step)."""

        vals = [float(self.train_tokens[0]), float(self.train_tokens[1])]
        peaks = [float(peak_rss_bytes()), float(self.build_peak_rss), self.build_local_fraction]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dev = self.device if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor(vals, dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            m = torch.tensor(peaks, dtype=torch.float64, device=dev)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            vals, peaks = t.tolist(), m.tolist()
        return {"train_padding_efficiency": padding_efficiency(int(vals[0]), int(vals[1])),
                "strategy": self.engine.strategy, "zero_stage": self.engine.zero_stage,
                "worker_peak_rss_mib": round(peaks[0] / 2**20, 1),
                "worker_build_peak_rss_mib": round(peaks[1] / 2**20, 1),
                "worker_start_rss_mib": round(self.start_peak_rss / 2**20, 1),
                "local_param_fraction": round(peaks[2], 4), **self.memory_estimate}

    # checkpoints -------------------------------------------------------------------------

    def save_and_report(self, metrics: dict, val_out: tuple[np.ndarray, np.ndarray] | None) -> None:
        # not at module level: safetensors, loaded only when this runs
        from safetensors.torch import save_file

        tmp = tempfile.mkdtemp(prefix=f"ckpt-r{self.rank}-")
        try:
            self.engine.save(tmp, self.rank)
            state = self.engine.gather_trainable()
            if self.rank == 0:
                save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, TRAINABLE))
                with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
                    json.dump({"epoch": self.epoch, "step": self.step, "batches_done": self.batches_done,
                               "total_steps": self.total_steps, "world": self.world,
                               "first_loss": self.first_loss, "train_top_layers": self.cfg.train_top_layers,
                               "curve": self.curve, "best_score": self.best_score, "since_best": self.since_best,
                               "stopped_early": self.stopped_early}, f)
                if val_out is not None:
                    np.save(os.path.join(tmp, "val_logits.npy"), val_out[0])
                    np.save(os.path.join(tmp, "val_labels.npy"), val_out[1])
                if self.task.save_weights:
                    self.task.save_weights(self.engine.module, state, tmp)
                if self.probe is not None:  # the head's starting point, for evaluate's probe rows
                    self.probe.save(os.path.join(tmp, PROBE_HEAD))
            has_files = self.rank == 0 or self.engine.files_on_every_rank
            self.reporter.report(metrics, tmp if has_files else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self) -> bool:
        with self.reporter.latest_checkpoint() as d:
            if d is None:
                return False
            with open(os.path.join(d, TRAIN_STATE)) as f:
                st = json.load(f)
            self.engine.load(d)
        self.epoch, self.step, self.batches_done = st["epoch"], st["step"], st["batches_done"]
        self.first_loss = st.get("first_loss", float("nan"))
        self.curve, self.best_score = list(st.get("curve", [])), st.get("best_score")
        self.since_best, self.stopped_early = st.get("since_best", 0), st.get("stopped_early", False)
        self.resumed_from = self.step
        if self.batches_done >= self.steps_per_epoch * self.accum:  # saved at an epoch end
            self.epoch, self.batches_done = self.epoch + 1, 0
        if self.rank == 0:
            log.info("resumed from checkpoint at epoch %d step %d", self.epoch, self.step)
        return True

    # steps -------------------------------------------------------------------------------

    def maybe_fail(self) -> None:

        if self.cfg.fail_at_step is None or self.step != self.cfg.fail_at_step or not self.marker:
            return
        if self.rank != (1 if self.world > 1 else 0) or storage.exists(self.marker):
            return
        storage.write_text(self.marker, f"failed once at step {self.step}\n")
        raise RuntimeError(f"injected failure at step {self.step} (cfg.fail_at_step)")

    def train_step(self, batch_idx: list[np.ndarray]) -> float:
        """One optimiser step over `accum` micro-batches; returns the mean micro-batch loss."""
        progress = self.step / max(1, self.total_steps)
        micro = []
        for idx in batch_idx:
            inputs, targets = self._collate([self.train[j] for j in idx])
            real, computed = batch_tokens(inputs)
            self.train_tokens = [self.train_tokens[0] + real, self.train_tokens[1] + computed]
            micro.append((to_device(inputs, self.device), to_device(targets, self.device)))
        losses = self.engine.step(micro, lambda outputs, targets: self.task.loss(outputs, targets, progress))
        self.step += 1
        return float(np.mean(losses))

    def _on_validation(self, metrics: dict) -> None:
        """Add a validation to the learning curve (checkpointed with the run, so a resumed run
        keeps it) and apply early stopping: `early_stopping_patience` validations in a row without
        an improvement of more than `early_stopping_min_delta` on best_metric end training."""
        cfg = self.cfg
        score = metrics.get(cfg.best_metric)
        self.curve.append({"step": self.step, "epoch": round(float(metrics.get("epoch", 0.0)), 4),
                           "samples": self.step * self.micro_bs * self.accum * self.world,
                           cfg.best_metric: score, "val_loss": metrics.get("val_loss")})
        if not finite(score):
            return
        sign = -1.0 if cfg.best_metric == "val_loss" else 1.0
        if self.best_score is None or sign * (score - self.best_score) > cfg.early_stopping_min_delta:
            self.best_score, self.since_best = score, 0
        else:
            self.since_best += 1
        if cfg.early_stopping_patience and self.since_best >= cfg.early_stopping_patience and self.step > 0:
            self.stopped_early = True
            if self.rank == 0:
                log.info("early stopping at step %d: %s has not improved on %.4f for %d validations", self.step,
                         cfg.best_metric, self.best_score, self.since_best)
        metrics["stopped_early"] = self.stopped_early

    def _log_validation(self, val: dict) -> None:
        if self.rank == 0:
            log.info("validation at step %d: %s", self.step,
                     {k: round(v, 4) for k, v in val.items() if isinstance(v, float)})

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
                       **self.probe_metrics, **self.setup_metrics, **self.run_stats()}
            val, out = self.validate()
            metrics.update(val)
            self._log_validation(val)
            self._on_validation(metrics)
            self.save_and_report(metrics, out)
        # Optimiser steps in training mode (dropout as the model's config sets it): from_pretrained,
        # the student builder and the probe fit all leave the model in eval mode, and validate()
        # restores the mode it found, so without this every step ran with dropout off.
        self.engine.train(True)
        while self.epoch < cfg.epochs and self.step < self.total_steps and not self.stopped_early:
            batches = length_grouped_batches(self.train_len, self.micro_bs, cfg.seed, self.epoch, self.world,
                                             self.rank)[: self.steps_per_epoch * self.accum]
            while self.batches_done < len(batches) and self.step < self.total_steps and not self.stopped_early:
                group = batches[self.batches_done: self.batches_done + self.accum]
                last_loss = self.train_step(group)
                if self.step == 1:
                    self.first_loss = last_loss
                self.batches_done += len(group)
                seen += sum(len(b) for b in group) * self.world
                epoch_end = self.batches_done >= len(batches)
                # crossed one of the epoch's evals_per_epoch evenly spaced validation points
                part_end = (self.batches_done * cfg.evals_per_epoch // len(batches) >
                            (self.batches_done - len(group)) * cfg.evals_per_epoch // len(batches))
                done = self.step >= self.total_steps
                metrics = {"step": self.step, "epoch": self.epoch + self.batches_done / len(batches),
                           "train_loss": last_loss, "train_loss_first": self.first_loss,
                           "resumed_from_step": self.resumed_from, "lr": self.engine.lr(),
                           "samples_per_s": seen / max(1e-9, time.time() - start), **self.probe_metrics,
                           **self.setup_metrics}
                if self.rank == 0 and (self.step % 10 == 0 or epoch_end or done or self.step == 1):
                    per_step = (time.time() - start) / max(1, self.step - max(0, self.resumed_from))
                    log.info("step %d/%d epoch %.2f loss %.4f (%.1f s/step, about %s left)", self.step,
                             self.total_steps, metrics["epoch"], last_loss, per_step,
                             format_duration(per_step * (self.total_steps - self.step)))
                step_ckpt = bool(cfg.checkpoint_every_steps) and self.step % cfg.checkpoint_every_steps == 0
                step_eval = part_end or (bool(cfg.eval_every_steps) and self.step % cfg.eval_every_steps == 0)
                if epoch_end or done or step_ckpt or step_eval:
                    metrics.update(self.run_stats())
                    if self.rank == 0:
                        log.info("step %d: train padding efficiency %.3f (real / computed tokens), worker peak RSS "
                                 "%.0f MiB", self.step, metrics["train_padding_efficiency"],
                                 metrics["worker_peak_rss_mib"])
                if epoch_end or done or step_eval:
                    val, out = self.validate()
                    metrics.update(val)
                    self._log_validation(val)
                    self._on_validation(metrics)
                    self.save_and_report(metrics, out)
                elif step_ckpt:
                    # NaN score: ranked below every validated checkpoint, without an error log.
                    self.save_and_report({**metrics, cfg.best_metric: float("nan")}, None)
                self.maybe_fail()
            if self.batches_done >= len(batches):
                self.epoch, self.batches_done = self.epoch + 1, 0
        return metrics
