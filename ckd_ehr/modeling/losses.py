"""The losses of both models, side by side: the teacher's multi-label BCE and the student's
distillation loss with the schedules of its weights. Each is a picklable callable
(logits, targets, progress 0..1) -> scalar, as the training loop calls it.

Teacher (`BCELoss`): BCEWithLogits over the 25 phenotypes, optional per-phenotype pos_weight.

Student (`DistillLoss`):

    loss = alpha(t) * BCEWithLogits(logits, hard) + beta(t) * soft

The hard term may carry a per-phenotype `pos_weight` (negatives / positives on the training
labels, `distill.class_balanced`): it scales the positives' loss only, so each phenotype's
positives and negatives weigh the same in total. It applies to every variant that asks for it,
the hard-only variants included, and never to the validation loss (unweighted for all).

`soft` is the paper's BCE(sigmoid(logits), teacher_probs) or, with `bce_temperature`,
BCE(sigmoid(logits / T), sigmoid(teacher_logits / T)) * T^2 (the T^2 keeps the soft
gradient's scale independent of T, as in Hinton et al.). BCE against a probability
target is computed with BCEWithLogits, which is the same function of the logits but
does not lose precision where sigmoid saturates (torch's BCE clamps log at -100).

Multi-granularity terms (docs/method.md), each 0 when the student's distributions equal the
teacher's and positive otherwise, added on training batches that carry unit targets:

    + beta_label * label_attention_kl + beta_relation * relation_kl
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ckd_ehr.config import DistillConfig


def multilabel_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCEWithLogits over batch and labels, in float32 (whatever the model's dtype)."""
    pw = None if pos_weight is None else pos_weight.to(logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)


class BCELoss:
    """The teacher's loss: multi-label BCE, optional per-phenotype pos_weight
    (`balanced_pos_weight`, the same class balancing as the student's hard term). Picklable."""

    def __init__(self, pos_weight: np.ndarray | None = None):
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        return multilabel_bce(logits, labels, self.pos_weight)


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


def balanced_pos_weight(labels: np.ndarray, cap: float = 100.0) -> np.ndarray:
    """negatives / positives per phenotype on the training labels [N, 25], clipped to
    [1/cap, cap] (a phenotype with no positives gets `cap`): BCE's pos_weight that balances."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = labels.sum(0)
    neg = labels.shape[0] - pos
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1.0), cap)
    return np.clip(ratio, 1.0 / cap, cap).astype(np.float32)


def distill_loss(
    logits: torch.Tensor,
    hard: torch.Tensor,
    weights: LossWeights,
    teacher_probs: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    soft_loss: str = "bce",
    temperature: float = 2.0,
    pos_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (mean over batch and labels) and its parts for logging.

    pos_weight [25] weighs the positives of the hard term per phenotype only: the teacher's
    probabilities already carry its view of rare classes.
    """
    hard = hard.to(logits.dtype)
    hard_term = F.binary_cross_entropy_with_logits(logits, hard, pos_weight=pos_weight, reduction="mean")
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


def _kl_rows(target: torch.Tensor, pred: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(target || pred) along the last axis (0 * log 0 = 0; pred clamped away from 0)."""
    target, pred = target.float(), pred.float()
    return (torch.xlogy(target, target) - target * pred.clamp_min(eps).log()).sum(-1)


def label_attention_kl(student: torch.Tensor, teacher: torch.Tensor, teacher_probs: torch.Tensor,
                       unit_mask: torch.Tensor) -> torch.Tensor:
    """Label level: per sample and phenotype, KL from the teacher's attention over the units
    [B, K, W] to the student's, weighted by the teacher's probability of the phenotype [B, K]
    (attention for a phenotype the teacher deems absent carries little); samples without
    units weigh 0. Both distributions are over the same W units (ckd_ehr.modeling.units)."""
    kl = _kl_rows(teacher, student)                                     # [B, K]
    w = teacher_probs.float() * unit_mask.any(-1, keepdim=True).float()
    return (kl * w).sum() / w.sum().clamp_min(1e-8)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
    """Relation level: mean over the present units' rows of KL from the teacher's row of unit
    relations [B, W, W] to the student's."""
    rows = unit_mask.float()
    return (_kl_rows(teacher, student) * rows).sum() / rows.sum().clamp_min(1.0)


class DistillLoss:
    """The loss as the training loop calls it: (logits, targets, progress) -> scalar.

    Training batches say so (`targets["train"]` True, set by the student's collate); any
    other batch (validation) gets the plain, unweighted hard BCE, so val_loss means the same
    for every variant. Training batches of the hard-only variants carry no teacher outputs:
    their loss is the hard term, with `pos_weight` when given. Picklable.
    """

    def __init__(self, cfg: DistillConfig, hard_only: bool, pos_weight=None,
                 unit_weights: tuple[float, float] = (0.0, 0.0)):
        self.cfg, self.hard_only = cfg, hard_only
        self.pos_weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.beta_label, self.beta_relation = (0.0, 0.0) if hard_only else map(float, unit_weights)
        # The schedule's mean weights over the run, which probe_targets mixes by: fixed per loss.
        grid = [weights_at(p, cfg, hard_only) for p in np.linspace(0.0, 1.0, 101)]
        self.mean_weights = LossWeights(float(np.mean([w.alpha for w in grid])), float(np.mean([w.beta for w in grid])))

    def __call__(self, outputs, targets: dict, progress: float = 0.0) -> torch.Tensor:
        return self.parts(outputs, targets, progress)[0]

    def probe_targets(self, targets: dict) -> torch.Tensor:
        """What a linear head on frozen features is fitted to under head_init probe, so the
        probe solves this variant's objective, not the hard one: alpha * BCE(z, y) + beta *
        BCE(z, p) = (alpha + beta) * BCE(z, t) + const with t = (alpha y + beta p) / (alpha +
        beta), alpha and beta averaged over the run's schedule. Without it every distilled
        variant starts at its hard twin's probe, and a run that keeps step 0 compares nothing.
        `bce_temperature` uses the teacher's probabilities (its T = 1 case); the hard-only
        variants, and batches without teacher outputs, get the labels."""
        labels = targets["labels"].float()
        probs = targets.get("teacher_probs")
        alpha, beta = self.mean_weights.alpha, self.mean_weights.beta
        if self.hard_only or probs is None or alpha + beta <= 0:
            return labels
        return (alpha * labels + beta * probs.float()) / (alpha + beta)

    def parts(self, outputs, targets: dict, progress: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, its parts for logging). `outputs`: logits, or the student's dict on batches
        with unit targets (ckd_ehr.student.model.StudentModel.forward)."""
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs).float()
        if not targets.get("train", False):
            return multilabel_bce(logits, targets["labels"]), {}
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss, parts = distill_loss(logits, targets["labels"], weights_at(progress, self.cfg, self.hard_only),
                                   targets.get("teacher_probs"), targets.get("teacher_logits"), self.cfg.soft_loss,
                                   self.cfg.temperature, pw)
        if self.beta_label > 0 or self.beta_relation > 0:
            if not isinstance(outputs, dict) or "unit_mask" not in targets:
                raise ValueError("the unit terms need unit targets in the batch and the student's unit outputs")
            mask = targets["unit_mask"].to(logits.device)
            if self.beta_label > 0:
                term = label_attention_kl(outputs["unit_attention"], targets["unit_attention"].to(logits.device),
                                          targets["teacher_probs"].to(logits.device), mask)
                loss, parts["loss_label_attention"] = loss + self.beta_label * term, float(term.detach())
            if self.beta_relation > 0:
                term = relation_kl(outputs["unit_relation"], targets["unit_relation"].to(logits.device), mask)
                loss, parts["loss_relation"] = loss + self.beta_relation * term, float(term.detach())
        return loss, parts
