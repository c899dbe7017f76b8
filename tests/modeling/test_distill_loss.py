"""The distillation loss against hand computation, and every alpha schedule's values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckd_ehr.config import DistillConfig
from ckd_ehr.modeling.losses import DistillLoss, LossWeights, alpha_at, balanced_pos_weight, distill_loss, weights_at


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _bce(p, y):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


LOGITS = [[2.0, -1.0], [0.5, 0.0]]
HARD = [[1.0, 0.0], [0.0, 1.0]]
TEACHER_P = [[0.9, 0.2], [0.3, 0.6]]
TEACHER_Z = [[3.0, -2.0], [-1.0, 0.4]]


def _hand(alpha, beta, temperature=None, pos_weight=None):
    """Element by element, straight from the formula (pos_weight multiplies positives' BCE)."""
    hard = soft = 0.0
    for i in range(2):
        for j in range(2):
            z = LOGITS[i][j]
            w = 1.0 if pos_weight is None or not HARD[i][j] else pos_weight[j]
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


def test_hard_only_ignores_teacher_and_pos_weight_scales_positives_of_hard_term():
    loss, parts = distill_loss(_t(LOGITS), _t(HARD), LossWeights(1.0, 0.0))
    assert loss.item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)
    assert "loss_soft" not in parts
    w = [3.0, 0.5]
    loss_w, _ = distill_loss(_t(LOGITS), _t(HARD), LossWeights(0.9, 0.1), teacher_probs=_t(TEACHER_P),
                             pos_weight=_t(w))
    assert loss_w.item() == pytest.approx(_hand(0.9, 0.1, pos_weight=w), rel=1e-5)


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


def test_loss_object_uses_schedule_and_falls_back_to_hard_bce_on_validation():
    cfg = DistillConfig(schedule="linear", alpha_start=0.5, alpha=0.9)
    targets = {"labels": _t(HARD), "teacher_probs": _t(TEACHER_P), "teacher_logits": _t(TEACHER_Z),
               "train": True}
    loss = DistillLoss(cfg, hard_only=False)
    assert loss(_t(LOGITS), targets, 0.5).item() == pytest.approx(_hand(0.7, 0.3), rel=1e-5)
    assert DistillLoss(cfg, hard_only=True)(_t(LOGITS), targets, 0.5).item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)
    assert loss(_t(LOGITS), {"labels": _t(HARD)}, 0.5).item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)


def test_balanced_pos_weight_is_negatives_over_positives():
    labels = np.zeros((10, 3))
    labels[:5, 0] = 1
    labels[:1, 1] = 1
    w = balanced_pos_weight(labels, cap=100.0)  # column 2 has no positive: the cap
    np.testing.assert_allclose(w, [5 / 5, 9 / 1, 100.0], rtol=1e-6)


def test_class_balanced_changes_hard_only_training_loss_but_not_validation_loss():
    """The (a)-(d) comparison is not confounded: a hard-only variant's training loss (no
    teacher outputs in its batches) changes with class balancing; validation loss does not."""
    cfg = DistillConfig(class_balanced=True)
    labels = np.array(HARD)
    pw = balanced_pos_weight(np.array([[1, 0], [0, 0], [0, 0], [0, 1]]))  # 3 and 3
    train = {"labels": _t(HARD), "train": True}
    plain, balanced = DistillLoss(cfg, hard_only=True), DistillLoss(cfg, hard_only=True, pos_weight=pw)
    assert plain(_t(LOGITS), train).item() == pytest.approx(_hand(1.0, 0.0), rel=1e-5)
    assert balanced(_t(LOGITS), train).item() == pytest.approx(_hand(1.0, 0.0, pos_weight=pw), rel=1e-5)
    assert balanced(_t(LOGITS), train).item() != pytest.approx(plain(_t(LOGITS), train).item(), rel=1e-3)
    val = {"labels": _t(labels)}
    assert balanced(_t(LOGITS), val).item() == pytest.approx(plain(_t(LOGITS), val).item(), rel=1e-7)
    # the distilling variants get the same balanced hard term
    full = {**train, "teacher_probs": _t(TEACHER_P), "teacher_logits": _t(TEACHER_Z)}
    assert DistillLoss(cfg, hard_only=False, pos_weight=pw)(_t(LOGITS), full).item() == pytest.approx(
        _hand(0.9, 0.1, pos_weight=pw), rel=1e-5)


def test_probe_target_is_the_minimiser_of_the_paper_loss():
    """head_init probe for a distilled variant fits the head to t = (a y + b p) / (a + b), a and b
    averaged over the schedule: for the `bce` loss the loss is (a + b) BCE(z, t) + const, so its
    gradient in the logits vanishes exactly at logit(t). Hard-only variants get the labels."""
    targets = {"labels": torch.tensor(HARD), "teacher_probs": torch.tensor(TEACHER_P), "train": True}
    cfg = DistillConfig(alpha=0.7)
    t = DistillLoss(cfg, hard_only=False).probe_targets(targets)
    torch.testing.assert_close(t, 0.7 * torch.tensor(HARD) + 0.3 * torch.tensor(TEACHER_P))
    z = torch.logit(t.clamp(1e-6, 1 - 1e-6)).requires_grad_(True)
    DistillLoss(cfg, hard_only=False)(z, targets).backward()
    assert z.grad.abs().max() < 1e-6
    torch.testing.assert_close(DistillLoss(cfg, hard_only=True).probe_targets(targets), torch.tensor(HARD))
    # A schedule: the run's mean weights (linear 0.5 -> 0.9: mean alpha 0.7, beta 0.3).
    sched = DistillLoss(DistillConfig(schedule="linear", alpha_start=0.5, alpha=0.9), hard_only=False)
    torch.testing.assert_close(sched.probe_targets(targets), t, atol=1e-5, rtol=0)
