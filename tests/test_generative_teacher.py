"""The generative teacher's pieces (ckd_ehr.teacher.generative) on the tiny Qwen2: the prompt is
masked, the 25 cached likelihoods equal 25 full passes, the calibration round-trips."""
import numpy as np
import pytest
import torch

from ckd_ehr.data.phenotypes import NUM_PHENOTYPES
from ckd_ehr.teacher.generative import (IGNORE, AnswerVocabulary, ScoreCalibration, generative_example, lm_loss,
                                        phenotype_scores, phenotype_scores_uncached)


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
    cfg = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, head="generative", max_length=128)
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
