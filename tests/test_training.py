"""The plain pieces of ckd_ehr.training (no Ray): batching, schedule, metrics, DeepSpeed config."""
from __future__ import annotations

import numpy as np
import pytest

from ckd_ehr.config import TrainerConfig
from ckd_ehr.training import (cosine_with_warmup, deepspeed_config, eval_batches, length_grouped_batches,
                              multilabel_metrics)


def test_length_grouped_batches_split_evenly_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=203)
    world, bs = 2, 4
    per_rank = [length_grouped_batches(lengths, bs, seed=1, epoch=0, world=world, rank=r) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == (203 // bs + 1) // world
    seen = np.concatenate([b for r in per_rank for b in r])
    assert len(seen) == len(set(seen.tolist()))            # no sample twice across ranks
    assert len(seen) >= 203 - bs * world                   # at most one batch per rank dropped
    # Grouping: padding waste inside batches is far below that of random batches.
    waste = np.mean([lengths[b].max() - lengths[b].mean() for b in per_rank[0]])
    random = np.mean([lengths[b].max() - lengths[b].mean() for b in np.array_split(rng.permutation(203), 50)])
    assert waste < 0.2 * random
    # Deterministic per (seed, epoch); another epoch reshuffles.
    again = length_grouped_batches(lengths, bs, seed=1, epoch=0, world=world, rank=0)
    other = length_grouped_batches(lengths, bs, seed=1, epoch=1, world=world, rank=0)
    assert all((a == b).all() for a, b in zip(again, per_rank[0]))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(other, per_rank[0]))


def test_eval_batches_cover_everything_once_with_equal_counts():
    lengths = list(range(9))              # 3 batches of 3 over 2 ranks
    parts = [eval_batches(lengths, 3, world=2, rank=r) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    got = sorted(i for p in parts for b in p if b is not None for i in b.tolist())
    assert got == lengths
    assert parts[1][-1] is None                               # the short rank pads with a no-op batch


def test_cosine_with_warmup():
    fn = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert fn(0) < fn(5) < fn(9) <= 1.0
    assert fn(10) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.5)
    assert fn(100) == pytest.approx(0.0, abs=1e-9)
    assert all(fn(s) >= fn(s + 1) for s in range(10, 100))


def test_multilabel_metrics_against_sklearn():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    labels = (rng.random((60, 25)) < 0.3).astype(int)
    labels[:, 3] = 0                                          # one class only: skipped
    logits = rng.normal(size=(60, 25)) + 2 * labels
    m = multilabel_metrics(logits, labels)
    probs = 1 / (1 + np.exp(-logits))
    keep = [j for j in range(25) if j != 3]
    assert m["n_auroc_labels"] == 24
    assert m["macro_auroc"] == pytest.approx(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in keep]))
    # Macro-F1 as the evaluate stage reports it: every phenotype, scikit-learn's zero_division=0.
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs >= 0.5, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(((probs >= 0.5) == labels).mean())
    assert 0.7 < m["macro_auroc"] < 1.0
    perfect = multilabel_metrics(np.where(labels == 1, 5.0, -5.0), labels)
    assert perfect["macro_auroc"] == pytest.approx(1.0)
    assert perfect["macro_f1"] == pytest.approx(24 / 25)    # the all-absent phenotype scores 0


def test_deepspeed_config_filled_from_trainer_config():
    cfg = TrainerConfig(strategy="deepspeed", batch_size=4, grad_accum=2,
                        deepspeed={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    ds = deepspeed_config(cfg, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] is False                     # CPU workers train in float32
    assert cfg.deepspeed["bf16"]["enabled"] is True            # the config itself is not modified
    given = TrainerConfig(strategy="deepspeed", use_gpu=True, deepspeed={"gradient_accumulation_steps": 8,
                                                                         "bf16": {"enabled": True}})
    ds = deepspeed_config(given, world=1)
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 8 * given.batch_size
    assert ds["bf16"]["enabled"] is True


def test_subset_indices_is_a_seeded_sample_in_file_order():
    from ckd_ehr.training import subset_indices

    keep = subset_indices(100, 10, seed=3)
    assert len(keep) == 10 and (np.diff(keep) > 0).all()
    assert (keep == subset_indices(100, 10, seed=3)).all()
    assert not (keep == subset_indices(100, 10, seed=4)).all()
    assert (subset_indices(5, 10, seed=0) == np.arange(5)).all()
    assert (subset_indices(5, None, seed=0) == np.arange(5)).all()
