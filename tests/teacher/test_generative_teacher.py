"""The generative teacher's pieces (ckd_ehr.teacher.generative) on the tiny Qwen2: the prompt is
masked, the 25 cached likelihoods equal 25 full passes, the calibration round-trips."""
import numpy as np
import pytest
import torch

from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.teacher.generative import (IGNORE, AnswerVocabulary, ScoreCalibration, answer_loss, generative_example,
                                        lm_loss, phenotype_scores, phenotype_scores_batch, phenotype_scores_uncached)


@pytest.fixture(scope="module")
def lm(tiny_qwen_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir)).eval(), AutoTokenizer.from_pretrained(str(tiny_qwen_dir))


def test_answer_is_built_from_fixed_pieces_and_only_it_is_learned(lm):
    model, tok = lm
    vocab = AnswerVocabulary.build(tok)
    labels = np.zeros(NUM_PHENOTYPES, dtype=int)
    labels[[2, 7]] = 1
    ans = vocab.answer(labels)
    assert ans == vocab.prefix + vocab.names[2] + vocab.separator + vocab.names[7] + vocab.eos
    assert vocab.answer(np.zeros(NUM_PHENOTYPES)) == vocab.prefix + vocab.none + vocab.eos
    orders = {tuple(vocab.answer(labels, np.random.default_rng(s))) for s in range(12)}
    assert len(orders) == 2                       # shuffled: either phenotype may come first
    ids, lab = generative_example([5, 6, 7], ans)
    assert lab[:3] == [IGNORE] * 3 and lab[3:] == ans and ids[3:] == ans
    # the loss is the mean next-token cross entropy over the answer's tokens only
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits
    logp = torch.log_softmax(logits[0].float(), -1)
    by_hand = -torch.stack([logp[t - 1, ids[t]] for t in range(3, len(ids))]).mean()
    assert torch.allclose(lm_loss(logits, torch.tensor([lab])), by_hand, atol=1e-5)
    # ... and the training forward, which projects only the answer positions onto the vocabulary,
    # gives the same loss on a right-padded batch of two prompts of different lengths
    ids2, lab2 = generative_example([9, 8, 7, 6, 5, 4, 3], vocab.answer(np.zeros(NUM_PHENOTYPES)))
    width = max(len(ids), len(ids2))
    batch = torch.tensor([r + [0] * (width - len(r)) for r in (ids, ids2)])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in (ids, ids2)])
    targets = torch.tensor([r + [IGNORE] * (width - len(r)) for r in (lab, lab2)])
    full = lm_loss(model(input_ids=batch, attention_mask=mask).logits, targets)
    assert torch.allclose(answer_loss(model, batch, mask, targets), full, atol=1e-5)


def test_cached_scores_equal_separate_full_passes(lm):
    model, tok = lm
    vocab = AnswerVocabulary.build(tok)
    prompt = tok("The patient-acquired disease is Sepsis. The patient had used the following medication: "
                 "Heparin.", add_special_tokens=False)["input_ids"]
    cached = phenotype_scores(model, prompt, vocab, pad_id=tok.pad_token_id or 0)
    full = phenotype_scores_uncached(model, prompt, vocab)
    assert cached.shape == (NUM_PHENOTYPES,)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    assert np.ptp(cached) > 0                      # not a constant: the names are told apart


def test_calibration_orders_and_round_trips():
    rng = np.random.default_rng(0)
    y = (rng.random((300, NUM_PHENOTYPES)) < 0.3).astype(int)
    y[:, 4] = 0
    scores = rng.normal(size=y.shape) + 1.5 * y - 3.0
    cal = ScoreCalibration.fit(scores, y)
    p = 1 / (1 + np.exp(-cal.logits(scores)))
    assert np.all(cal.slope[np.arange(NUM_PHENOTYPES) != 4] > 0)            # higher score, higher probability
    assert abs(p[:, 0].mean() - y[:, 0].mean()) < 0.03 and p[:, 4].max() < 0.01
    back = ScoreCalibration.from_json(cal.to_json())
    np.testing.assert_allclose(back.logits(scores), cal.logits(scores))


def test_generative_teacher_scores_a_padded_batch_like_single_prompts(lm):
    from ckd_ehr.modeling.collate import pad_batch
    from ckd_ehr.teacher.generative import GenerativeTeacher

    model, tok = lm
    vocab = AnswerVocabulary.build(tok)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("Sepsis and heparin.", "A much longer visit with pneumonia, asthma and a fracture of the hip.")]
    teacher = GenerativeTeacher(model, vocab, pad_id=tok.pad_token_id or 0)
    batch = pad_batch(prompts, tok.pad_token_id or 0)
    out = teacher(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, NUM_PHENOTYPES)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(out[i].numpy(), phenotype_scores(model, p, vocab, tok.pad_token_id or 0), atol=1e-5)
        np.testing.assert_allclose(out[i].numpy(), phenotype_scores_uncached(model, p, vocab), rtol=1e-4, atol=1e-4)
    # the packed name pass (one row per prompt, 4D mask) equals 25 rows on the repeated cache,
    # with the SDPA kernel's boolean mask and the eager kernel's additive one
    repeated = phenotype_scores_batch(model, prompts, vocab, tok.pad_token_id or 0, packed=False)
    np.testing.assert_allclose(out.numpy(), repeated, atol=1e-5)
    impl = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        eager = phenotype_scores_batch(model, prompts, vocab, tok.pad_token_id or 0, packed=True)
    finally:
        model.set_attn_implementation(impl)
    np.testing.assert_allclose(eager, repeated, atol=1e-5)
    ids, lab = generative_example(prompts[0], vocab.answer(np.eye(NUM_PHENOTYPES, dtype=int)[3]))
    loss = teacher(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([lab]))
    assert loss.ndim == 0 and loss.item() > 0


def test_generative_artifact_round_trips(tiny_qwen_dir, tmp_path):
    """teacher.head: generative -> artifact with adapter/ and calibration.json (no head), `head`
    in teacher.json; load_teacher gives back a GenerativeTeacher scoring as before."""
    from transformers import AutoTokenizer

    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.modeling.collate import pad_batch
    from ckd_ehr.teacher.artifact import load_teacher, write_artifact, write_weights
    from ckd_ehr.teacher.generative import GenerativeTeacher
    from ckd_ehr.teacher.model import add_lora, load_backbone

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_qwen_dir))
    lm = add_lora(load_backbone(str(tiny_qwen_dir), lm_head=True), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)   # a trained-looking adapter, so the round trip is not trivially the base
    rng = np.random.default_rng(0)
    cal = ScoreCalibration(rng.uniform(0.5, 2, NUM_PHENOTYPES), rng.normal(size=NUM_PHENOTYPES))
    teacher = GenerativeTeacher(lm, AnswerVocabulary.build(tok), tok.pad_token_id or 0, cal)
    state = {k: v for k, v in teacher.named_parameters() if v.requires_grad}
    write_weights(teacher, state, tmp_path / "ckpt")
    cfg = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, head="generative", best_metric="val_loss",
                        max_length=128)
    meta = write_artifact(tmp_path / "ckpt", tok, cfg, {"val_loss": 1.0}, str(tmp_path / "art"), calibration=cal)
    assert meta["head"] == "generative"
    assert (tmp_path / "art" / "calibration.json").exists() and not (tmp_path / "art" / "head.safetensors").exists()
    loaded, _, meta2 = load_teacher(str(tmp_path / "art"))
    assert isinstance(loaded, GenerativeTeacher) and meta2["artifact_id"] == meta["artifact_id"]
    batch = pad_batch([tok("Sepsis and heparin.", add_special_tokens=False)["input_ids"]], tok.pad_token_id or 0)
    teacher.eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(batch["input_ids"], batch["attention_mask"]).numpy(),
                                   teacher(batch["input_ids"], batch["attention_mask"]).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="calibration"):
        write_artifact(tmp_path / "ckpt", tok, cfg, {}, str(tmp_path / "art2"))


@pytest.mark.slow   # 36 optimiser steps of a causal LM: about 30 s on 2 cores, too long for the edit loop
def test_generative_teacher_task_learns_and_scores_from_its_artifact(tmp_path, tiny_qwen_dir):
    """teacher.head: generative, the teacher stage's own pieces run in-process (the training loop
    behind a LocalReporter: the same TrainTask Ray Train runs), then what train_teacher does after
    fit: the validation calibration, the artifact, and scoring from the loaded artifact. The LM
    loss falls and the calibrated scores put the learnable phenotypes above chance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckd_ehr.bench.toy_samples import write_toy_samples
    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.metrics import auroc_per_label
    from ckd_ehr.teacher.artifact import load_teacher, write_artifact
    from ckd_ehr.teacher.data import predict_logits
    from ckd_ehr.teacher.generative import GenerativeTeacher, fit_calibration
    from ckd_ehr.teacher.train import load_tokenizer, read_texts_and_labels, teacher_task
    from helpers.local_training import fit_in_process

    # The shared tiny Qwen2's random embeddings (std 0.02, tied to the LM head) cap its logits
    # below 1: no adapter could make an answer likely. Scaled up, the LM head can express one.
    scaled = tmp_path / "tiny_lm"
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir))
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(40.0)
    lm.save_pretrained(scaled)
    AutoTokenizer.from_pretrained(str(tiny_qwen_dir)).save_pretrained(scaled)
    layout = write_toy_samples(str(tmp_path / "run"), n_train=48, n_val=40)
    # autocast off: `auto` picks bf16 by timing a step, so the run (and the 0.59 below) would depend
    # on the machine's speed; bf16 rounding at lr 1e-2 on this tiny LM measured 0.53.
    tc = TeacherConfig(model=str(scaled), gguf_file=None, head="generative", best_metric="val_loss",
                       num_workers=1, epochs=6, batch_size=8, lr=1e-2, max_length=64, warmup_ratio=0.0,
                       instruction="none", autocast="off", lora={"rank": 8, "alpha": 16, "target_modules": [
                           "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    task = teacher_task(tc, layout.augmented("train"), layout.augmented("val"))
    last, best, best_dir = fit_in_process(tc, task, tmp_path / "train")
    assert last["train_loss"] < 0.6 * last["train_loss_first"], last
    assert not any(k.startswith("val_macro") for k in last)        # no head: val_loss only while training
    tok = load_tokenizer(tc)
    texts, labels = read_texts_and_labels(layout.augmented("val"), "text_eadf")
    cal, val_metrics = fit_calibration(tc, best_dir, tok, texts, labels)
    meta = write_artifact(best_dir, tok, tc, {**best, **val_metrics}, str(tmp_path / "art"), calibration=cal)
    assert meta["head"] == "generative" and np.isfinite(meta["metrics"]["val_macro_auroc"])
    model, tok2, _ = load_teacher(str(tmp_path / "art"))
    assert isinstance(model, GenerativeTeacher)
    probs = 1 / (1 + np.exp(-predict_logits(model, tok2, texts, max_length=64)))
    assert probs.shape == (len(texts), NUM_PHENOTYPES) and np.all((probs > 0) & (probs < 1))
    auc = auroc_per_label(labels, probs)[:4]   # toy_samples: phenotypes 0-3 follow a marker word
    # Seeded, so deterministic: 0.59 measured (a 2-layer, 32-wide LM learns the answer's words
    # more than their dependence on the prompt in 36 steps); scores that ignored the prompt or
    # mixed up the phenotypes' order would sit at 0.5.
    assert np.nanmean(auc) > 0.55, auc
