"""Distillation loss and the schedules of its weights.

    loss = alpha(t) * BCEWithLogits(logits, hard) + beta(t) * soft

`soft` is the paper's BCE(sigmoid(logits), teacher_probs) or, with `bce_temperature`,
BCE(sigmoid(logits / T), sigmoid(teacher_logits / T)) * T^2 (the T^2 keeps the soft
gradient's scale independent of T, as in Hinton et al.). BCE against a probability
target is computed with BCEWithLogits, which is the same function of the logits but
does not lose precision where sigmoid saturates (torch's BCE clamps log at -100).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DistillConfig


@dataclass(frozen=True)
class LossWeights:
    alpha: float
    beta: float


def alpha_at(progress: float, cfg: DistillConfig) -> float:
    """alpha at `progress` = optimiser step / total steps, in [0, 1] (clamped).

    constant: cfg.alpha. linear / cosine: alpha_start at progress 0 -> cfg.alpha at 1.
    curriculum: alpha_start while progress < curriculum_fraction, then cfg.alpha.
    Progress rather than steps: the training loop knows its total, the loss need not.
    """
    if cfg.schedule == "constant":
        return float(cfg.alpha)
    progress = min(max(float(progress), 0.0), 1.0)
    a0, a1 = float(cfg.alpha_start), float(cfg.alpha)
    if cfg.schedule == "linear":
        return a0 + (a1 - a0) * progress
    if cfg.schedule == "cosine":
        return a1 + (a0 - a1) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "curriculum":
        return a0 if progress < cfg.curriculum_fraction else a1
    raise ValueError(f"unknown schedule '{cfg.schedule}'")


def weights_at(progress: float, cfg: DistillConfig, hard_only: bool = False) -> LossWeights:
    """(alpha, beta) at a point of training; beta None in the config means 1 - alpha.
    Hard-only variants: (1, 0)."""
    if hard_only:
        return LossWeights(1.0, 0.0)
    a = alpha_at(progress, cfg)
    b = (1.0 - a) if cfg.beta is None else float(cfg.beta)
    return LossWeights(a, b)


def class_balanced_weights(labels: np.ndarray, eps: float = 1.0) -> np.ndarray:
    """Per-phenotype weights from training prevalence: 1 / prevalence, normalised to mean 1.

    `eps` pseudo-positives keep a phenotype without positives finite (it gets the largest
    weight, as the rarest). labels: [N, 25] 0/1.
    """
    labels = np.asarray(labels, dtype=np.float64)
    prevalence = (labels.sum(0) + eps) / (labels.shape[0] + eps)
    w = 1.0 / prevalence
    return (w / w.mean()).astype(np.float32)


def distill_loss(
    logits: torch.Tensor,
    hard: torch.Tensor,
    weights: LossWeights,
    teacher_probs: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    soft_loss: str = "bce",
    temperature: float = 2.0,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (mean over batch and labels) and its parts for logging.

    class_weights [25] scale the hard term per phenotype only: the teacher's probabilities
    already carry its view of rare classes.
    """
    hard = hard.to(logits.dtype)
    hard_term = F.binary_cross_entropy_with_logits(logits, hard, weight=class_weights, reduction="mean")
    loss = weights.alpha * hard_term
    parts = {"loss_hard": float(hard_term.detach())}
    if weights.beta > 0:
        if soft_loss == "bce":
            if teacher_probs is None:
                raise ValueError("soft loss 'bce' needs teacher_probs")
            soft = F.binary_cross_entropy_with_logits(logits, teacher_probs.to(logits.dtype))
        elif soft_loss == "bce_temperature":
            if teacher_logits is None:
                raise ValueError("soft loss 'bce_temperature' needs teacher_logits")
            t = float(temperature)
            target = torch.sigmoid(teacher_logits.to(logits.dtype) / t)
            soft = F.binary_cross_entropy_with_logits(logits / t, target) * (t * t)
        else:
            raise ValueError(f"unknown soft loss '{soft_loss}'")
        loss = loss + weights.beta * soft
        parts["loss_soft"] = float(soft.detach())
    return loss, parts


class DistillLoss:
    """The loss as the training loop calls it: (logits, targets, progress) -> scalar.

    Targets without teacher outputs (validation: soft labels are read for training only)
    give the plain hard BCE, so val_loss means the same for every variant. Picklable.
    """

    def __init__(self, cfg: DistillConfig, hard_only: bool, class_weights=None):
        self.cfg, self.hard_only = cfg, hard_only
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, targets: dict, progress: float = 0.0) -> torch.Tensor:
        logits = logits.float()
        if "teacher_probs" not in targets:
            return F.binary_cross_entropy_with_logits(logits, targets["labels"].float())
        cw = None if self.class_weights is None else self.class_weights.to(logits.device)
        loss, _ = distill_loss(logits, targets["labels"], weights_at(progress, self.cfg, self.hard_only),
                               targets["teacher_probs"], targets["teacher_logits"], self.cfg.soft_loss,
                               self.cfg.temperature, cw)
        return loss
