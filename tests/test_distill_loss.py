"""The distillation loss against hand computation, and every alpha schedule's values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckd_ehr.config import DistillConfig
from ckd_ehr.student.loss import DistillLoss, LossWeights, alpha_at, class_balanced_weights, distill_loss, weights_at


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


LOGITS = [[2.0, -1.0], [0.5, 0.0]]
HARD = [[1.0, 0.0], [0.0, 1.0]]
TEACHER_P = [[0.9, 0.2], [0.3, 0.6]]
TEACHER_Z = [[3.0, -2.0], [-1.0, 0.4]]


def _hand(alpha, beta, temperature=None, weights=None):
    """Element by element, straight from the formula."""
    hard = soft = 0.0
    for i in range(2):
        for j in range(2):
            z = LOGITS[i][j]
            w = 1.0 if weights is None else weights[j]
            hard += w * _bce(_sig(z), HARD[i][j])
            if temperature is None:
                soft += _bce(_sig(z), TEACHER_P[i][j])
            else:
                t = temperature
                soft += _bce(_sig(z / t), _sig(TEACHER_Z[i][j] / t)) * t * t
    return alpha * hard / 4 + beta * soft / 4


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_paper_loss_matches_hand_computation():
    loss, parts = distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.9, 0.1), teacher_probs=_t(TEACHER_P))
    assert loss.item() == pytest.approx(_hand(0.9, 0.1), rel=1e-5)
    assert set(parts) == {"loss_hard", "loss_soft"}


def test_temperature_loss_matches_hand_computation():
    loss, _ = distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.7, 0.3), teacher_logits=_t(TEACHER_Z),
                           soft_loss="bce_temperature", temperature=2.0)
    assert loss.item() == pytest.approx(_hand(0.7, 0.3, temperature=2.0), rel=1e-5)


def test_hard_only_ignores_teacher_and_class_weights_scale_hard_term():
    loss, parts = distill_loss(_t(LOGITS), _t(HARD), LossWeights(1.0, 0.0))
    assert loss.item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)
    assert "loss_soft" not in parts
    w = [3.0, 0.5]
    loss_w, _ = distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.9, 0.1), teacher_probs=_t(TEACHER_P),
                             class_weights=_t(w))
    assert loss_w.item() == pytest.approx(_hand(0.9, 0.1, weights=w), rel=1e-5)


def test_missing_teacher_input_is_an_error():
    with pytest.raises(ValueError, match="teacher_probs"):
        distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.9, 0.1))
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.9, 0.1), teacher_probs=_t(TEACHER_P),
                     soft_loss="bce_temperature")


def test_loss_gradient_flows_to_logits():
    z = _t(LOGITS).requires_grad_()
    loss, _ = distill_loss(z, _t(HARD), LossWeights(0.9, 0.1), teacher_probs=_t(TEACHER_P))
    loss.backward()
    # d/dz of mean BCE-with-logits = (sigmoid(z) - target) / n, mixed by the weights
    expect = [[(0.9 * (_sig(z0) - h) + 0.1 * (_sig(z0) - p)) / 4 for z0, h, p in zip(zr, hr, pr)]
              for zr, hr, pr in zip(LOGITS, HARD, TEACHER_P)]
    np.testing.assert_allclose(z.grad.numpy(), expect, rtol=1e-5)


def test_constant_schedule_and_beta_default():
    cfg = DistillConfig()
    assert [alpha_at(p, cfg) for p in (0.0, 0.5, 1.0)] == [0.9, 0.9, 0.9]
    w = weights_at(0.1, cfg)
    assert (w.alpha, w.beta) == pytest.approx((0.9, 0.1))
    assert weights_at(0.1, DistillConfig(beta=0.5)).beta == 0.5
    assert weights_at(0.1, cfg, hard_only=True) == LossWeights(1.0, 0.0)


def test_linear_schedule():
    cfg = DistillConfig(schedule="linear", alpha_start=0.5, alpha=0.9)
    assert alpha_at(0.0, cfg) == pytest.approx(0.5)
    assert alpha_at(0.5, cfg) == pytest.approx(0.7)
    assert alpha_at(1.0, cfg) == pytest.approx(0.9)
    assert alpha_at(3.0, cfg) == pytest.approx(0.9)  # past the end stays at the target


def test_cosine_schedule():
    cfg = DistillConfig(schedule="cosine", alpha_start=0.2, alpha=1.0)
    assert alpha_at(0.0, cfg) == pytest.approx(0.2)
    assert alpha_at(0.25, cfg) == pytest.approx(1.0 - 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert alpha_at(0.5, cfg) == pytest.approx(0.6)
    assert alpha_at(1.0, cfg) == pytest.approx(1.0)


def test_curriculum_schedule():
    cfg = DistillConfig(schedule="curriculum", alpha_start=0.3, alpha=0.9, curriculum_fraction=0.25)
    values = [alpha_at(s / 8, cfg) for s in range(8)]
    assert values == pytest.approx([0.3, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert weights_at(0.0, cfg).beta == pytest.approx(0.7)


def test_loss_object_uses_schedule_and_falls_back_to_hard_bce_without_teacher():
    cfg = DistillConfig(schedule="linear", alpha_start=0.5, alpha=0.9)
    targets = {"labels": _t(HARD), "teacher_probs": _t(TEACHER_P), "teacher_logits": _t(TEACHER_Z)}
    loss = DistillLoss(cfg, hard_only=False)
    assert loss(_t(LOGITS), targets, 0.5).item() == pytest.approx(_hand(0.7, 0.3), rel=1e-5)
    assert DistillLoss(cfg, hard_only=True)(_t(LOGITS), targets, 0.5).item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)
    assert loss(_t(LOGITS), {"labels": _t(HARD)}, 0.5).item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)


def test_class_balanced_weights_favour_rare_phenotypes():
    labels = np.zeros((10, 3))
    labels[:5, 0] = 1   # prevalence (5+1)/11
    labels[:1, 1] = 1   # (1+1)/11
    w = class_balanced_weights(labels)  # column 2 has none: (0+1)/11, the largest weight
    inv = np.array([11 / 6, 11 / 2, 11 / 1])
    np.testing.assert_allclose(w, inv / inv.mean(), rtol=1e-6)
    assert w.mean() == pytest.approx(1.0)
