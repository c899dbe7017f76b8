"""Training shared by the teacher and the student, in small files:

- batching.py: length-grouped training batches, eval batches, subset_indices, padding efficiency
- task.py:     TrainTask (what a model supplies: model factory, data, collate, its loss, metrics)
- engines.py:  DDPEngine and DeepSpeedEngine (same methods: create_model, build, step, save,
               load, gather_trainable), deepspeed_config, the LR schedule
- memory.py:   ModelSize, estimate_train_memory, choose_strategy (strategy `auto`), peak RSS
- loop.py:     TrainLoop, the plain-torch loop of one worker (validation, probe as step 0,
               checkpoints, resume, fail injection)
- checkpoints.py: the Reporter the loop talks to its host through (LocalReporter runs it
               in-process), and which checkpoint a stage keeps (pick_best, kept_checkpoint)
- ray_train.py: the only Ray Train code: fit, RayReporter, the per-worker function,
               ObjectStoreValue

    from ckd_ehr.training import TrainTask, fit
    result = fit(cfg.student, task, storage_path=..., name="run")
"""
from ckd_ehr.training.batching import (batch_tokens, eval_batches, length_grouped_batches, padding_efficiency,
                                       subset_indices, to_device)
from ckd_ehr.training.engines import (DS_DIR, DS_TAG, OPTIM, TRAINABLE, DDPEngine, DeepSpeedEngine,
                                      cosine_with_warmup, deepspeed_config, make_engine)
from ckd_ehr.training.checkpoints import LocalReporter, Reporter, kept_checkpoint, pick_best
from ckd_ehr.training.loop import FAIL_MARKER, TRAIN_STATE, TrainLoop, WorkerContext
from ckd_ehr.training.progress import format_duration
from ckd_ehr.training.memory import (DTYPE_BYTES, ModelSize, choose_strategy, device_memory_bytes, estimate_train_memory,
                                     local_param_fraction, peak_rss_bytes, return_freed_memory)
from ckd_ehr.training.ray_train import ObjectStoreValue, TrainResult, fit
from ckd_ehr.training.task import TrainTask, default_labels_of, multilabel_metrics

__all__ = [
    "DTYPE_BYTES",  # read by ckd_ehr.teacher.model.teacher_model_size
    "DDPEngine", "DS_DIR", "DS_TAG", "DeepSpeedEngine", "FAIL_MARKER", "LocalReporter", "ModelSize", "OPTIM",
    "ObjectStoreValue", "Reporter", "TRAINABLE", "TRAIN_STATE", "TrainLoop", "TrainResult", "TrainTask",
    "WorkerContext", "batch_tokens", "kept_checkpoint", "choose_strategy", "cosine_with_warmup", "deepspeed_config",
    "default_labels_of", "device_memory_bytes", "estimate_train_memory", "eval_batches", "fit", "format_duration",
    "length_grouped_batches", "local_param_fraction", "make_engine", "multilabel_metrics", "padding_efficiency",
    "peak_rss_bytes", "pick_best", "return_freed_memory", "subset_indices", "to_device",
]
