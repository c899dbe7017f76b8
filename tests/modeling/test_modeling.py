"""Shared model pieces (ckd_ehr.modeling): padding, length-sorted prediction, pooling, losses.
Plain torch, no Ray, no pretrained weights: a few milliseconds each."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ckd_ehr.modeling.collate import length_sorted_batches, pad_batch, predict_sorted
from ckd_ehr.modeling.losses import BCELoss, DistillLoss
from ckd_ehr.modeling.pooling import label_attention_pool, pool

# A masked batch: row 0 has 3 real tokens, row 1 all 5, row 2 one; pads hold large garbage.
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def _hidden(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    return torch.where(MASK.bool().unsqueeze(-1), h, torch.full_like(h, 1e3))


class MaskedMeanModel(nn.Module):
    """Embedding, one self-attention layer and mean pooling over the mask: a real model whose
    outputs depend on every real token and (if the mask were ignored) on padding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        x, _ = self.attn(x, x, x, key_padding_mask=~attention_mask.bool())
        return self.out(pool(x, attention_mask, "mean"))


def test_pad_batch_right_pads_to_the_longest_row():
    b = pad_batch([[5, 6], [7], [1, 2, 3]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0], [1, 2, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]


def test_length_sorted_batches_longest_first_cover_every_row_once():
    lengths = [3, 9, 1, 9, 4, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert [list(b) for b in batches] == [[1, 3, 6], [4, 0, 5], [2]]   # ties keep input order
    assert length_sorted_batches([], 3) == []


def test_predict_sorted_matches_an_unsorted_pass_in_input_order():
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1, 50, size=n)) for n in (3, 11, 1, 7, 7, 2, 9)]
    model = MaskedMeanModel().train()
    pred = predict_sorted(model, ids, pad_token_id=0, batch_size=3, num_outputs=3)
    assert model.training                                # mode restored
    model.eval()
    with torch.no_grad():                                # input order, in batches of 3 padded to their longest
        ref = np.concatenate([model(**pad_batch(ids[s:s + 3], 0)).numpy() for s in range(0, len(ids), 3)])
        alone = np.concatenate([model(**pad_batch([x], 0)).numpy() for x in ids])
    np.testing.assert_allclose(pred.outputs, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pred.outputs, alone, rtol=0, atol=1e-6)
    assert np.abs(pred.outputs[0] - pred.outputs[1]).max() > 1e-3  # rows differ: order is tested
    # Sorted batches: rows (1, 6, 3) of lengths 11, 9, 7; (4, 0, 5): 7, 3, 2; (2): 1.
    assert pred.padded_length.tolist() == [7, 11, 1, 11, 7, 7, 11]
    assert pred.real_tokens == 40 and pred.computed_tokens == 3 * 11 + 3 * 7 + 1
    assert pred.padding_efficiency == pytest.approx(40 / 55)
    sig = predict_sorted(model, ids, 0, 3, 3, activation=torch.sigmoid)
    np.testing.assert_allclose(sig.outputs, 1 / (1 + np.exp(-pred.outputs)), atol=1e-6)
    assert predict_sorted(model, [], 0, 3, 3).outputs.shape == (0, 3)


def test_poolings_match_a_hand_computation_on_a_masked_batch():
    h, lengths = _hidden(), [3, 5, 1]
    last = pool(h, MASK, "last")
    mean = pool(h, MASK, "mean")
    cls = pool(h, MASK, "cls")
    for b, n in enumerate(lengths):
        assert torch.equal(last[b], h[b, n - 1])
        torch.testing.assert_close(mean[b], sum(h[b, t] for t in range(n)) / n)
        assert torch.equal(cls[b], h[b, 0])
    with pytest.raises(ValueError, match="label_attention"):
        pool(h, MASK, "label_attention")


def test_label_attention_matches_a_hand_computation_on_a_masked_batch():
    h = _hidden()
    queries = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = label_attention_pool(h, MASK, queries)
    assert got.shape == (3, 2, 4)
    for b, n in enumerate([3, 5, 1]):
        for k in range(2):
            scores = [math.exp(float(h[b, t] @ queries[k]) / 2.0) for t in range(n)]   # sqrt(H) = 2
            want = sum(s * h[b, t] for t, s in enumerate(scores)) / sum(scores)
            torch.testing.assert_close(got[b, k], want)


def test_teacher_bce_and_the_students_validation_loss_are_the_same_hand_bce():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 25), (torch.rand(4, 25) > 0.7).float()
    pw = np.linspace(0.5, 3.0, 25).astype(np.float32)
    p = torch.sigmoid(logits.double())
    hand = -(torch.as_tensor(pw, dtype=torch.float64) * labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(BCELoss(pw)(logits, labels).double(), hand, rtol=1e-5, atol=1e-6)
    from ckd_ehr.config import DistillConfig

    val = DistillLoss(DistillConfig(), hard_only=False, pos_weight=pw)(logits, {"labels": labels})
    assert torch.equal(val, BCELoss()(logits, labels))   # validation: unweighted, the teacher's BCE
