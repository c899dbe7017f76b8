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


# --- the loop in this process (no Ray): LocalReporter, resume, fail injection, a generative loss ---

VOCAB, N_MARKERS = 24, 5


class _BagOfTokens:
    """Factory of a tiny classifier (embedding, masked sum, linear head over the 25 phenotypes)."""

    def __call__(self):
        import torch
        from torch import nn

        from ckd_ehr.phenotypes import NUM_PHENOTYPES

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(VOCAB, 32)
                self.head = nn.Linear(32, NUM_PHENOTYPES)

            def features(self, input_ids, attention_mask):   # what head_init `probe` fits on
                m = attention_mask.unsqueeze(-1).float()
                return (self.emb(input_ids) * m).sum(1)

            def forward(self, input_ids, attention_mask):
                return self.head(self.features(input_ids, attention_mask))

            def load_probe(self, probe):
                from ckd_ehr.modeling.probe import load_linear

                load_linear(self.head, probe)

        torch.manual_seed(0)
        return Model()


def _collate(batch):
    import torch

    width = max(e["length"] for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):
        ids[r, : e["length"]] = torch.as_tensor(e["input_ids"])
        mask[r, : e["length"]] = 1
    return {"input_ids": ids, "attention_mask": mask}, torch.as_tensor(np.stack([e["labels"] for e in batch]))


def _marker_examples(n: int, seed: int) -> list[dict]:
    """Phenotype j present iff token 1 + j appears (filler tokens above the markers)."""
    from ckd_ehr.phenotypes import NUM_PHENOTYPES

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        present = rng.random(N_MARKERS) < 0.4
        ids = list(rng.integers(1 + N_MARKERS, VOCAB, size=rng.integers(3, 10))) + \
            [1 + j for j in range(N_MARKERS) if present[j]]
        labels = np.zeros(NUM_PHENOTYPES, dtype=np.float32)
        labels[:N_MARKERS] = present
        out.append({"input_ids": rng.permutation(ids), "length": len(ids), "labels": labels})
    return out


def _bce(logits, labels, progress):
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def test_loop_in_process_learns_checkpoints_fails_once_and_resumes(tmp_path):
    import os

    from ckd_ehr.training import (FAIL_MARKER, TRAINABLE, LocalReporter, TrainLoop, TrainTask, WorkerContext)

    train, val = _marker_examples(160, 0), _marker_examples(48, 1)
    task = TrainTask(build_model=_BagOfTokens(), load_data=lambda: (train, val), collate=_collate, loss_fn=_bce)
    # 160 / 16 = 10 steps an epoch, 3 epochs; validated checkpoints at 10, 20, 30; dies at step 13
    cfg = TrainerConfig(num_workers=1, epochs=3, batch_size=16, lr=3e-2, warmup_ratio=0.0, max_length=16,
                        strategy="ddp", fail_at_step=13, best_metric="val_macro_auroc")
    marker = str(tmp_path / FAIL_MARKER)
    first = LocalReporter(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="injected failure at step 13"):
        TrainLoop(cfg, task, WorkerContext(), first, fail_marker=marker).run()
    assert [r["step"] for r in first.reports] == [10] and os.path.exists(marker)

    again = LocalReporter(str(tmp_path / "run"))            # same directory: resumes from step 10
    last = TrainLoop(cfg, task, WorkerContext(), again, fail_marker=marker).run()
    assert [r["step"] for r in again.reports] == [20, 30]
    assert last["resumed_from_step"] == 10 and last["step"] == 30 and last["strategy"] == "ddp"
    assert last["train_loss"] < 0.5 * last["train_loss_first"], last
    assert 0.3 < last["train_padding_efficiency"] <= 1.0 and 0.3 < last["val_padding_efficiency"] <= 1.0
    best_dir, best = again.best("val_macro_auroc")
    assert best["val_macro_auroc"] >= 0.9 and best["val_n_auroc_labels"] == N_MARKERS, best
    for name in (TRAINABLE, "train_state.json", "optim.pt", "val_logits.npy", "val_labels.npy"):
        assert os.path.exists(os.path.join(best_dir, name)), name
    # validation rows come back in load_data's order, whatever the length sorting did
    np.testing.assert_array_equal(np.load(os.path.join(best_dir, "val_labels.npy")),
                                  np.stack([e["labels"] for e in val]))


def test_loop_validates_evals_per_epoch_times_and_early_stopping_counts_them(tmp_path):
    """evals_per_epoch 2: validated checkpoints at half and whole epochs; patience counts
    validations, so a run whose best is step 5 stops two validations later (step 15)."""
    from ckd_ehr.training import LocalReporter, TrainLoop, TrainTask, WorkerContext

    train, val = _marker_examples(160, 0), _marker_examples(48, 1)
    task = TrainTask(build_model=_BagOfTokens(), load_data=lambda: (train, val), collate=_collate, loss_fn=_bce)
    cfg = TrainerConfig(num_workers=1, epochs=2, batch_size=16, lr=3e-2, warmup_ratio=0.0, max_length=16,
                        strategy="ddp", best_metric="val_macro_auroc", evals_per_epoch=2, autocast="off")
    rep = LocalReporter(str(tmp_path / "halves"))
    TrainLoop(cfg, task, WorkerContext(), rep).run()
    assert [r["step"] for r in rep.reports] == [5, 10, 15, 20]
    assert [r["epoch"] for r in rep.reports] == [0.5, 1.0, 1.5, 2.0]
    # min_delta 1: nothing after the first validation counts as better
    stop = LocalReporter(str(tmp_path / "stop"))
    last = TrainLoop(cfg.model_copy(update={"early_stopping_patience": 2, "early_stopping_min_delta": 1.0}),
                     task, WorkerContext(), stop).run()
    assert [r["step"] for r in stop.reports] == [5, 10, 15] and last["stopped_early"]


class _ModeRecordingBag(_BagOfTokens):
    """_BagOfTokens built in eval mode (as from_pretrained leaves a model) that records, per
    forward, whether it ran in training mode and with gradients."""

    def __call__(self):
        import torch

        model = super().__call__().eval()
        model.modes = []
        inner = model.forward

        def forward(input_ids, attention_mask):
            model.modes.append((model.training, torch.is_grad_enabled()))
            return inner(input_ids, attention_mask)

        model.forward = forward
        return model


@pytest.mark.parametrize("head_init", ["random", "probe"])
def test_loop_trains_in_training_mode_and_validates_in_eval_mode(tmp_path, head_init):
    """Dropout is on for the optimiser steps and off for validation, whatever mode the model
    was built in (the probe fit also puts it in eval mode)."""
    from ckd_ehr.training import LocalReporter, TrainLoop, TrainTask, WorkerContext

    train, val = _marker_examples(32, 0), _marker_examples(16, 1)
    task = TrainTask(build_model=_ModeRecordingBag(), load_data=lambda: (train, val), collate=_collate, loss_fn=_bce)
    # autocast off: `auto` would time four more training-mode passes at start-up (counted below)
    cfg = TrainerConfig(num_workers=1, epochs=1, batch_size=16, lr=1e-2, warmup_ratio=0.0, max_length=16,
                        strategy="ddp", head_init=head_init, best_metric="val_loss", autocast="off")
    loop = TrainLoop(cfg, task, WorkerContext(), LocalReporter(str(tmp_path / "run")))
    loop.run()
    modes = loop.engine.module.modes
    assert modes.count((True, True)) == 2                         # 32 / 16: two training steps
    assert all(not training for training, grad in modes if not grad)   # every no-grad pass in eval mode
    assert all(training for training, grad in modes if grad)


def test_loop_in_process_probe_is_step_zero(tmp_path):
    """head_init probe: the probe is fitted on the frozen features, validated and reported as
    step 0 with its head saved, so best-checkpoint selection can keep it."""
    import os

    from ckd_ehr.contracts import PROBE_HEAD
    from ckd_ehr.training import LocalReporter, TrainLoop, TrainTask, WorkerContext

    train, val = _marker_examples(160, 0), _marker_examples(48, 1)
    task = TrainTask(build_model=_BagOfTokens(), load_data=lambda: (train, val), collate=_collate, loss_fn=_bce)
    cfg = TrainerConfig(num_workers=1, epochs=1, batch_size=16, lr=1e-3, warmup_ratio=0.0, max_length=16,
                        strategy="ddp", head_init="probe", best_metric="val_macro_auroc")
    rep = LocalReporter(str(tmp_path / "probe"))
    TrainLoop(cfg, task, WorkerContext(), rep).run()
    assert [r["step"] for r in rep.reports] == [0, 10]
    zero = rep.reports[0]
    # the loop's own validation of the probe-headed model reproduces the probe's validation AUROC
    assert zero["probe_val_macro_auroc"] >= 0.9, zero
    assert abs(zero["val_macro_auroc"] - zero["probe_val_macro_auroc"]) < 1e-3, zero
    assert os.path.exists(os.path.join(rep.checkpoints[0][0], PROBE_HEAD))
    # max_steps 0: the probe is the model, no step is taken (a demo's probe-only variant)
    only = LocalReporter(str(tmp_path / "probe_only"))
    loop = TrainLoop(cfg.model_copy(update={"max_steps": 0, "train_top_layers": 1}), task, WorkerContext(), only)
    assert loop.total_steps == 0 and not loop.frozen   # nothing to train: nothing cached
    loop.run()
    assert [r["step"] for r in only.reports] == [0] and only.reports[0]["probe_val_macro_auroc"] >= 0.9


def test_kept_checkpoint_best_or_last():
    """`best` keeps the probe (step 0) when fine-tuning scored lower on validation, and skips an
    unvalidated (NaN) step checkpoint; `last` keeps the end of training whatever it scored (the
    multi-granularity study's fixed-length recipe); a misspelt choice is an error."""
    from ckd_ehr.training import kept_checkpoint

    scored = [("ckpt_0", {"step": 0, "val_macro_auroc": 0.75}), ("ckpt_8", {"step": 8, "val_macro_auroc": float("nan")}),
              ("ckpt_48", {"step": 48, "val_macro_auroc": 0.74})]
    assert kept_checkpoint(scored, scored[-1], "val_macro_auroc")[0] == "ckpt_0"
    assert kept_checkpoint(scored, scored[-1], "val_macro_auroc", "last") == scored[-1]
    assert kept_checkpoint(scored, scored[-1], "val_loss", "best")[0] == "ckpt_48"   # no val_loss: the latest
    with pytest.raises(ValueError, match="'latest'"):
        kept_checkpoint(scored, scored[-1], "val_macro_auroc", "latest")


class _CountingBagOfTokens(_BagOfTokens):
    """_BagOfTokens whose features() calls are counted in a file (the loop builds its own model)."""

    def __init__(self, counter):
        self.counter = counter

    def __call__(self):
        model = super().__call__()
        plain, counter = model.features, self.counter

        def features(input_ids, attention_mask):
            counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else "1")
            return plain(input_ids, attention_mask)

        model.features = features
        return model


def test_probe_features_are_computed_once_per_rows(tmp_path):
    """task.feature_cache (per row): a second run over the same rows with the same feature_key
    reads the frozen features instead of computing them, and fits the same probe; a subset of
    cached rows computes nothing, new rows compute only themselves, another key computes all.
    The cached run still fits its own targets (probe_targets)."""
    import numpy as np

    from ckd_ehr.training import LocalReporter, TrainLoop, TrainTask, WorkerContext

    train, val = _marker_examples(96, 0), _marker_examples(32, 1)
    cfg = TrainerConfig(num_workers=1, epochs=1, max_steps=1, batch_size=16, lr=1e-3, warmup_ratio=0.0,
                        max_length=16, strategy="ddp", head_init="probe", best_metric="val_macro_auroc",
                        autocast="off")   # `auto` times forwards at start-up: they would count below
    cache = str(tmp_path / "features")

    def run(name, rows, key="bag", probe_targets_of=None):
        counter = tmp_path / f"{name}.count"
        task = TrainTask(build_model=_CountingBagOfTokens(counter), load_data=lambda: (rows, val), collate=_collate,
                         loss_fn=_bce, feature_cache=cache, feature_key=key, probe_targets_of=probe_targets_of)
        loop = TrainLoop(cfg, task, WorkerContext(), LocalReporter(str(tmp_path / name)))
        return loop.probe, int(counter.read_text()) if counter.exists() else 0

    def cached_rows(key="bag"):
        from ckd_ehr.modeling.feature_cache import FeatureCache

        return int(FeatureCache(cache, key).lookup([e["input_ids"] for e in train + val + new])[1].sum())

    new = _marker_examples(40, 2)
    first, calls = run("first", train)
    assert calls > 0 and cached_rows() == len(train) + len(val)
    again, calls = run("again", train)
    assert calls == 0
    np.testing.assert_allclose(again.weight, first.weight, rtol=1e-6, atol=1e-7)
    _, calls = run("subset", train[:80])
    assert calls == 0
    _, calls = run("new_rows", train[:56] + new)
    assert calls > 0 and cached_rows() == len(train) + len(val) + len(new)
    _, calls = run("other_key", train, key="another model")
    assert calls > 0 and cached_rows("another model") == len(train) + len(val)
    # Same rows and key, other targets (a distilled variant): no forward, a different probe.
    soft, calls = run("soft", train, probe_targets_of=lambda t: 0.5 * t.float() + 0.25)
    assert calls == 0 and not np.allclose(soft.weight, first.weight)


class _TinyLM:
    """Factory of a tiny causal language model: next-token logits from the current token."""

    def __call__(self):
        import torch
        from torch import nn

        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(VOCAB, 16)
                self.out = nn.Linear(16, VOCAB)

            def forward(self, input_ids, attention_mask):
                return self.out(self.emb(input_ids))   # [B, T, V]

        torch.manual_seed(0)
        return LM()


def _lm_collate(batch):
    inputs, _ = _collate([{**e, "labels": np.zeros(1)} for e in batch])
    return inputs, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def _next_token_loss(logits, targets, progress):
    """Causal LM cross-entropy on the real (unpadded) next tokens."""
    import torch

    ids, mask = targets["input_ids"][:, 1:], targets["attention_mask"][:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][mask], ids[mask])


def test_loop_takes_a_generative_loss(tmp_path):
    """The task owns its loss: a language-model objective trains through the same loop and
    validation reports val_loss alone (eval_fn None)."""
    import math
    import os

    from ckd_ehr.training import LocalReporter, TrainLoop, TrainTask, WorkerContext

    rng = np.random.default_rng(0)

    def counting(n):  # sequences t, t+1, t+2, ... (mod VOCAB): the next token is learnable
        starts, lengths = rng.integers(0, VOCAB, n), rng.integers(4, 12, n)
        return [{"input_ids": (s + np.arange(k)) % VOCAB, "length": int(k)} for s, k in zip(starts, lengths)]

    task = TrainTask(build_model=_TinyLM(), load_data=lambda: (counting(128), counting(32)), collate=_lm_collate,
                     loss_fn=_next_token_loss, eval_fn=None)
    cfg = TrainerConfig(num_workers=1, epochs=3, batch_size=16, lr=5e-2, warmup_ratio=0.0, max_length=16,
                        strategy="ddp", best_metric="val_loss")
    rep = LocalReporter(str(tmp_path / "lm"))
    TrainLoop(cfg, task, WorkerContext(), rep).run()
    losses = [r["val_loss"] for r in rep.reports]
    assert losses[-1] < 0.25 * math.log(VOCAB) and losses[-1] < losses[0], losses   # uniform guess: log V
    assert not any(k.startswith("val_macro") for k in rep.reports[-1])
    best_dir, _ = rep.best("val_loss")
    assert not os.path.exists(os.path.join(best_dir, "val_logits.npy"))


def test_ray_train_is_imported_in_one_file_only():
    """ckd_ehr.training.ray_train is the only module that names ray.train, and importing the
    training package (loop, engines, tasks) imports no Ray at all."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "ckd_ehr"
    naming = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                    if re.search(r"\bray\.train\b|from ray import train\b", p.read_text()))
    assert naming == ["training/ray_train.py"], naming
    code = ("import sys, ckd_ehr.training\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root.parent).stdout.strip()
    assert out == "[]", out
