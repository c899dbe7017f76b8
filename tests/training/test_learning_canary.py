"""Learning canary: the real training loop, with the real student and teacher tasks, learns a
task whose signal is obvious. If a change to batching, losses, pooling, engines or the Ray
Train wiring breaks learning, this fails in about a minute, long before a demo would show
"every model at chance" (which the demo's own data could also explain).

The student runs through Ray Train (`training.fit`: the wiring, data through the object store,
checkpoints and best-metric selection); the teachers run the same TrainLoop in this process
behind a LocalReporter, which is what each Ray Train worker runs. Why not all three through
Ray: each `fit` costs ~20 s of process start-up on 2 cores whatever it trains (measured: a
1-epoch and a 4-epoch canary fit both 25 s), and the wiring needs guarding once, not per model.

The task: each text names a random subset of K marker words; phenotype j is present iff
marker j is named. Labels beyond K are always absent (skipped by macro AUROC). A bag-of-words
model gets AUROC 1.0; a loop that learns anything at all passes 0.9 within a few dozen steps.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from helpers.local_training import fit_in_process

from ckd_ehr.phenotypes import NUM_PHENOTYPES

# Single-token words in both WordPiece (MiniLM) and SmolLM2's BPE, so each marker is one unit.
MARKERS = ["apple", "river", "orange", "window", "garden", "yellow"]
FILLER = ["the", "patient", "was", "seen", "and", "given", "care", "today", "with", "a", "visit", "note"]


def marker_task(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    present = rng.random((n, len(MARKERS))) < 0.4
    texts, labels = [], np.zeros((n, NUM_PHENOTYPES), dtype=np.int8)
    for i in range(n):
        words = list(rng.choice(FILLER, size=8)) + [m for m, p in zip(MARKERS, present[i]) if p]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels[i, : len(MARKERS)] = present[i]
    return texts, labels


def list_data(train: list[dict], val: list[dict]):
    """load_data for training.fit returning fixed example lists. Built from builtins so the Ray
    workers can unpickle it (a class defined in this test module is not importable there)."""
    return functools.partial(tuple, [train, val])


@pytest.fixture(scope="module")
def marker_splits():
    return marker_task(240, seed=0), marker_task(80, seed=1)


def test_student_learns_an_obvious_signal(ray_local, tiny_bert_dir, marker_splits, tmp_path):
    from transformers import AutoTokenizer

    from ckd_ehr.config import StudentConfig
    from ckd_ehr.student.train import examples, student_task
    from ckd_ehr.student.data import Encoded
    from ckd_ehr.training import fit

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    cfg = StudentConfig(model=str(tiny_bert_dir), num_workers=1, cpus_per_worker=1, epochs=4, batch_size=16,
                        lr=3e-3, warmup_ratio=0.0, max_length=64, best_metric="val_macro_auroc")
    splits = []
    for texts, labels in marker_splits:
        ids = [tok(t, truncation=True, max_length=64)["input_ids"] for t in texts]
        encoded = Encoded(input_ids=ids, labels=labels.astype(np.float32),
                          sample_ids=[str(i) for i in range(len(ids))], subject_ids=list(range(len(ids))))
        splits.append(examples(encoded, with_teacher=False))
    task = student_task(cfg, str(tiny_bert_dir), list_data(*splits), tok.pad_token_id, distill=False)
    result = fit(cfg, task, storage_path=str(tmp_path), name="canary-student")
    assert result.metrics["train_loss"] < result.metrics["train_loss_first"]
    assert result.kept_metrics["val_macro_auroc"] >= 0.9, result.kept_metrics


@pytest.mark.slow   # training, even in-process: the integration tier
@pytest.mark.xfail(strict=True, reason=(
    "found by this canary: the MLAPH projects raw pooled hidden states, which are far from centred "
    "(per-feature mean ~0.19, spread ~0.05 on the tiny Qwen2), and AdamW then learns the head slowly: "
    "0.68 val macro AUROC after 60 steps, while a logistic regression on the same frozen features "
    "reaches 0.99. Standardising the pooled features with batch norm brings the loop to 0.95, but its "
    "running statistics go stale when LoRA moves the features fast (tests/teacher/test_teacher.py at lr 1e-2), "
    "so the fix belongs with the demo issue's training recipes (e.g. statistics from one pass over "
    "the training data before training). The demo's recipe does that (head_init probe, tested below). "
    "Strict: once the random head learns, this fails and must go."))
def test_teacher_learns_an_obvious_signal(tiny_qwen_dir, marker_splits, tmp_path):
    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.teacher.data import Collate, make_examples, pad_id
    from ckd_ehr.teacher.train import BCELoss, BuildTeacher, TeacherParamGroups, load_tokenizer
    from ckd_ehr.training import TrainTask

    # Mean pooling: a 2-layer random decoder's last token sees too little of the text for a
    # canary; mean pooling over its true length is what the MLAPH offers for this case.
    tc = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, num_workers=1, cpus_per_worker=1, epochs=4,
                       batch_size=16, lr=3e-3, head_lr=3e-2, warmup_ratio=0.0, max_length=64, pooling="mean",
                       use_chat_template=False, best_metric="val_macro_auroc")
    tok = load_tokenizer(tc)
    (tr_texts, tr_labels), (va_texts, va_labels) = marker_splits
    train = make_examples(tr_texts, tr_labels, tok, tc.max_length, tc.use_chat_template)
    val = make_examples(va_texts, va_labels, tok, tc.max_length, tc.use_chat_template)
    task = TrainTask(build_model=BuildTeacher(tc), load_data=list_data(train, val), collate=Collate(pad_id(tok)),
                     loss_fn=BCELoss(), param_groups=TeacherParamGroups(tc))
    last, best, _ = fit_in_process(tc, task, tmp_path)
    assert last["train_loss"] < last["train_loss_first"]
    assert best["val_macro_auroc"] >= 0.9, best


@pytest.mark.slow
def test_teacher_with_probe_head_learns_an_obvious_signal(tiny_qwen_dir, marker_splits, tmp_path):
    """The demo's recipe (head_init: probe, linear probe then fine-tune) through the real loop:
    the head starts at the logistic regression on frozen pooled features, which this task
    separates; fine-tuning from there keeps it (the random-head loop above does not get there)."""
    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.contracts import PROBE_HEAD
    from ckd_ehr.teacher.data import Collate, make_examples, pad_id
    from ckd_ehr.teacher.train import BCELoss, BuildTeacher, TeacherParamGroups, load_tokenizer
    from ckd_ehr.training import TrainTask

    tc = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, num_workers=1, cpus_per_worker=1, epochs=1,
                       batch_size=16, lr=1e-3, head_lr=1e-3, warmup_ratio=0.0, max_length=64, pooling="mean",
                       use_chat_template=False, best_metric="val_macro_auroc", head_init="probe", strategy="ddp")
    tok = load_tokenizer(tc)
    (tr_texts, tr_labels), (va_texts, va_labels) = marker_splits
    train = make_examples(tr_texts, tr_labels, tok, tc.max_length, tc.use_chat_template, tc.instruction)
    val = make_examples(va_texts, va_labels, tok, tc.max_length, tc.use_chat_template, tc.instruction)
    task = TrainTask(build_model=BuildTeacher(tc), load_data=list_data(train, val), collate=Collate(pad_id(tok)),
                     loss_fn=BCELoss(), param_groups=TeacherParamGroups(tc))
    _, best, best_dir = fit_in_process(tc, task, tmp_path)
    assert best["probe_val_macro_auroc"] >= 0.9, best
    assert best["val_macro_auroc"] >= 0.9, best
    assert (Path(best_dir) / PROBE_HEAD).exists()
