"""What a model supplies to training: the TrainTask. The loop and the engines know nothing of
teachers, students or phenotypes; the task owns the model, the data, the collate and the loss.

    task = TrainTask(
        build_model=lambda: MyModel(...),          # on each worker; CPU module, requires_grad set
        load_data=lambda: (train_examples, val_examples),   # on each worker (fetched from the object store)
        collate=my_collate,                        # list[example] -> (model kwargs dict, targets)
        loss_fn=my_loss,                           # (model outputs, targets, progress 0..1) -> scalar
        param_groups=None,                         # model -> AdamW groups (e.g. separate head lr)
        eval_fn=multilabel_metrics,                # (scores ndarray, labels ndarray) -> metrics; None: val_loss only
        labels_of=None,                            # targets -> labels tensor (default: targets or targets["labels"])
        save_weights=None,                         # (model, full trainable state dict, dir): extra files per checkpoint
        model_size=None,                           # () -> ModelSize, for strategy `auto` (estimated, no weights loaded)
    )

The loss sees whatever the model's forward returns, so a classification loss on logits and a
generative (language-model) loss on a causal LM's output both fit: a generative task sets
eval_fn None (its validation reports val_loss only) or passes the rows eval_fn scores through
`scores_of`. Everything in a TrainTask runs on the workers, so it must pickle (cloudpickle:
closures are fine). Examples are dicts; `example["length"]` (tokens) drives length grouping
when present. Each model builds its task in one function (ckd_ehr.teacher.train.teacher_task,
ckd_ehr.student.train.build_student_task), which its stage and Tune both call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ckd_ehr.training.memory import ModelSize
from ckd_ehr.metrics import all_scores, single_class_labels


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Validation metrics of logits: ckd_ehr.metrics.all_scores on the probabilities (the same
    definitions the evaluate stage reports, checked there against scikit-learn), plus
    `n_auroc_labels`, the phenotypes with both classes present (macro AUROC averages those)."""

    labels = np.asarray(labels).astype(int)
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    if not labels.size:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "micro_f1": float("nan"),
                "macro_auroc": float("nan"), "micro_auroc": float("nan"), "n_auroc_labels": 0}
    out = all_scores(labels, probs, threshold)
    out["n_auroc_labels"] = int((~single_class_labels(labels)).sum())
    return out


def default_labels_of(targets: Any) -> torch.Tensor:
    return targets["labels"] if isinstance(targets, dict) else targets


@dataclass
class TrainTask:
    """What a caller supplies to training; see the module docstring."""

    build_model: Callable[[], nn.Module]
    load_data: Callable[[], tuple[Sequence[dict], Sequence[dict]]]
    collate: Callable[[list[dict]], tuple[dict[str, torch.Tensor], Any]]
    loss_fn: Callable[[Any, Any, float], torch.Tensor]
    param_groups: Callable[[nn.Module], list[dict]] | None = None
    eval_fn: Callable[[np.ndarray, np.ndarray], dict] | None = multilabel_metrics
    labels_of: Callable[[Any], torch.Tensor] | None = None
    save_weights: Callable[[nn.Module, dict, str], None] | None = None
    model_size: Callable[[], ModelSize] | None = None
    scores_of: Callable[[Any], torch.Tensor] | None = None
    """Model outputs -> the per-row scores eval_fn reads (default: the outputs themselves, logits)."""
    feature_cache: str | None = None
    """Directory (local or URI) where head_init probe keeps the frozen model's pooled features of
    its training and validation rows, per row, keyed by `feature_key` and the row's token ids
    (ckd_ehr.modeling.feature_cache): runs that read the same rows with the same frozen model (a
    student's hard and distilled variants, Tune trials, a step-0 model scoring them later)
    compute them once. None: no cache."""
    feature_key: str = ""
    """What, besides the token ids, decides the features: the model and its pooling."""
    frozen_cache: str | None = None
    """Directory (local or URI) where train_top_layers keeps the frozen layers' states per row
    (ckd_ehr.modeling.frozen.LayerCache, keyed by `frozen_key`, the number of top layers and the
    dtype); None: computed in memory for this run only."""
    frozen_key: str = ""
    """What, besides the token ids, decides the frozen layers' states: the pretrained model (not
    the pooling or head, which come after them)."""
    probe_targets_of: Callable[[Any], torch.Tensor] | None = None
    """Training targets -> what head_init probe fits the head to (default: the labels); a
    distilled student's mix of labels and teacher probabilities."""

    def loss(self, outputs: Any, targets: Any, progress: float) -> torch.Tensor:
        """The training objective at `progress` (0..1 of the run) of one batch."""
        return self.loss_fn(outputs, targets, progress)

    def eval_rows(self, outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) of one validation batch, as float arrays, for eval_fn."""
        scores = self.scores_of(outputs) if self.scores_of else outputs
        labels = (self.labels_of or default_labels_of)(targets)
        return scores.float().cpu().numpy(), labels.float().cpu().numpy()

    def labels(self, targets: Any) -> torch.Tensor:
        return (self.labels_of or default_labels_of)(targets)

    def probe_targets(self, targets: Any) -> torch.Tensor:
        return self.probe_targets_of(targets) if self.probe_targets_of else self.labels(targets)
