"""The only Ray Train code: `fit` (a TorchTrainer around training.loop.TrainLoop), the
reporter that turns the loop's reports into ray.train.report calls, the per-worker function,
and `ObjectStoreValue` (data the driver puts in the object store once for every worker).

    result = fit(cfg.student, task, storage_path=layout.student_train(v), name="run")
    with result.kept_checkpoint.as_directory() as d: ...   # trainable.safetensors + the task's files

What fit adds to the loop (see training.loop for the loop itself):
- TorchTrainer with cfg.num_workers workers (gloo on CPU, NCCL on GPU), cfg.cpus_per_worker /
  gpus_per_worker each;
- Ray keeps cfg.num_checkpoints_to_keep checkpoints scored by cfg.best_metric (min for
  val_loss, else max); the best finite one is the result's kept_checkpoint (under
  cfg.keep_checkpoint `last` the latest one, training.loop.kept_checkpoint);
- resume: reusing (storage_path, name) resumes that run from its latest checkpoint; Ray
  restarts failed workers up to cfg.max_failures times;
- cfg.fail_at_step's marker file lives in the run's storage (FAIL_MARKER).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from ckd_ehr.ray_utils import CAPACITY_TIMEOUT_ENV
from ckd_ehr.training.checkpoints import kept_checkpoint
from ckd_ehr.training.loop import FAIL_MARKER, TRAIN_STATE, TrainLoop, WorkerContext
from ckd_ehr.training.task import TrainTask
from ckd_ehr import storage


@dataclass
class TrainResult:
    kept_checkpoint: Any
    """ray.train.Checkpoint the run keeps (training.loop.kept_checkpoint): the best on
    cfg.best_metric, or the latest under cfg.keep_checkpoint `last` (use .as_directory())."""
    kept_metrics: dict
    """Metrics reported with kept_checkpoint."""
    latest_checkpoint: Any
    metrics: dict
    """The last reported metrics."""
    path: str
    """The run's storage directory."""
    history: list[dict] = field(default_factory=list)
    """Metrics of every kept checkpoint."""
    curve: list[dict] = field(default_factory=list)
    """The learning curve: every validation of the run (step, epoch, samples seen, best_metric,
    val_loss), the probe's at step 0, from the last checkpoint's train_state.json."""

    @property
    def kept_checkpoint_path(self) -> str:
        return self.kept_checkpoint.path


class ObjectStoreValue:
    """A value the driver puts in Ray's object store once; `get()` on any worker fetches it
    (pickles as a reference, so a task holding it ships no data). The put happens at the first
    pickling, not at construction: a task built and trained in one process (a test, `bench
    train`) never starts Ray."""

    def __init__(self, value: Any):
        self._value, self._ref = value, None

    def __getstate__(self) -> dict:
        # not at module level: ray, loaded only when this runs
        import ray

        if self._ref is None:
            self._ref = ray.put(self._value)
        return {"_value": None, "_ref": self._ref}

    def get(self) -> Any:
        if self._ref is None or self._value is not None:
            return self._value
        # not at module level: ray, loaded only when this runs
        import ray

        return ray.get(self._ref)


class RayReporter:
    """training.loop.Reporter on a Ray Train worker."""

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        # not at module level: ray, loaded only when this runs
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        # not at module level: ray, loaded only when this runs
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir is not None else None)


def worker_context() -> WorkerContext:
    # not at module level: ray, loaded only when this runs
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return WorkerContext(rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                         local_world=ctx.get_local_world_size(), device=ray.train.torch.get_device())


def _train_loop_per_worker(config: dict) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return TrainLoop(config["cfg"], config["task"], worker_context(), RayReporter(), config.get("marker")).run()


class CapacityTimeoutError(RuntimeError):
    """The cluster did not give a training run its workers within ray.capacity_timeout_s."""


def _raise_waited_for_capacity(error: BaseException, cfg, resources: dict, timeout: str | None) -> None:
    # not at module level: ray, loaded only when this runs
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause = getattr(error, "controller_failure", None)
    if timeout and isinstance(cause, WorkerGroupStartupTimeoutError):
        raise CapacityTimeoutError(
            f"gave up after {float(timeout):g} s waiting for {cfg.num_workers} training worker(s) with "
            f"{resources} each (ray.capacity_timeout_s): the cluster did not provide them") from None


def fit(cfg, task: TrainTask, storage_path: str, name: str = "train", callbacks: list | None = None) -> TrainResult:
    """Train with Ray Train (see the module docstring). `cfg` is a TrainerConfig (or subclass);
    `storage_path` a local directory or URI; reusing (storage_path, name) resumes that run.
    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback when a Tune trial runs this.
    The result's kept_checkpoint is the one cfg.keep_checkpoint names (kept_checkpoint)."""
    # not at module level: ray, loaded only when this runs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer


    if not storage.is_uri(storage_path):
        storage_path = os.path.abspath(storage_path)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    mode = "min" if cfg.best_metric == "val_loss" else "max"
    capacity_timeout = os.environ.get(CAPACITY_TIMEOUT_ENV)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"cfg": cfg, "task": task, "marker": storage.join(storage_path, name, FAIL_MARKER)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            # with ray.capacity_timeout_s set (ray_utils.set_capacity_timeout) one wait for the
            # workers' resources is all a run gets; Ray's default retries it forever
            failure_config=FailureConfig(max_failures=cfg.max_failures,
                                         controller_failure_limit=0 if capacity_timeout else -1),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep,
                                               checkpoint_score_attribute=cfg.best_metric,
                                               checkpoint_score_order=mode)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        _raise_waited_for_capacity(exc, cfg, resources, capacity_timeout)
        raise
    if result.error:
        _raise_waited_for_capacity(result.error, cfg, resources, capacity_timeout)
        raise result.error
    kept = result.best_checkpoints or []
    best, best_metrics = kept_checkpoint(kept, (result.checkpoint, dict(result.metrics or {})), cfg.best_metric,
                                         cfg.keep_checkpoint)
    history = [dict(m) for _, m in kept]
    curve = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = os.path.join(d, TRAIN_STATE)
            if os.path.exists(state):
                with open(state) as f:
                    curve = json.load(f).get("curve", [])
    return TrainResult(kept_checkpoint=best, kept_metrics=dict(best_metrics), latest_checkpoint=result.checkpoint,
                       metrics=dict(result.metrics or {}), path=str(result.path), history=history, curve=curve)
