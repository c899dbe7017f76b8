"""Teacher model, prompts, poolings and artifact, in-process (no Ray): the tiny Qwen2 fixture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckd_ehr.config import TeacherConfig
from ckd_ehr.modeling.pooling import last_token_index
from ckd_ehr.teacher import build_prompts, load_teacher, predict_logits
from ckd_ehr.teacher.artifact import write_artifact, write_weights
from ckd_ehr.teacher.data import Collate, make_examples, pad_id
from ckd_ehr.teacher.model import MLAPH, build_teacher, param_groups, trainable_parameters
from ckd_ehr.bench.toy_samples import toy_samples
from ckd_ehr.teacher.train import BCELoss, balanced_pos_weight, load_tokenizer
from ckd_ehr.text import instruction


def _cfg(tiny_qwen_dir, **kw) -> TeacherConfig:
    base = dict(model=str(tiny_qwen_dir), gguf_file=None, max_length=64, lr=1e-2, head_lr=1e-2)
    base.update(kw)
    return TeacherConfig(**base)


def test_last_token_index_whatever_the_padding_side():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("pooling", ["last", "mean", "label_attention"])
def test_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    head = MLAPH(16, 25, pooling)
    h = torch.randn(1, 4, 16)
    alone = head(h, torch.ones(1, 4, dtype=torch.long))
    # Same tokens with 3 pad positions of garbage after them (right) and before them (left).
    right = torch.cat([h, torch.randn(1, 3, 16) * 100], 1)
    left = torch.cat([torch.randn(1, 3, 16) * 100, h], 1)
    got_r = head(right, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    got_l = head(left, torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))
    assert alone.shape == (1, 25)
    torch.testing.assert_close(got_r, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_l, alone, atol=1e-5, rtol=1e-5)


def test_prompt_ends_with_assistant_turn(tiny_qwen_dir):
    tok = load_tokenizer(_cfg(tiny_qwen_dir))
    chat = build_prompts(["The patient-acquired disease is gout."], tok, use_chat_template=True)[0]
    plain = build_prompts(["The patient-acquired disease is gout."], tok, use_chat_template=False)[0]
    assert instruction() in chat and "gout" in chat
    assert chat.rstrip().endswith("assistant")      # generation prompt: last token starts the answer
    assert plain == instruction() + "\nThe patient-acquired disease is gout."


def test_instruction_choice(tiny_qwen_dir):
    """`paper` (the release's, naming the phenotypes), `short`, `none`: the sample text is whole
    in each, and an over-long prompt without instruction loses only text, never an instruction."""
    from ckd_ehr.teacher import encode_texts
    from ckd_ehr.text import SHORT_INSTRUCTION

    tok = load_tokenizer(_cfg(tiny_qwen_dir))
    text = "The patient-acquired disease is gout."
    paper, short, none = (build_prompts([text], tok, False, kind)[0] for kind in ("paper", "short", "none"))
    assert paper == instruction("paper") + "\n" + text and short == SHORT_INSTRUCTION + "\n" + text and none == text
    ids = {k: encode_texts([text], tok, 4096, True, k)[0] for k in ("paper", "short", "none")}
    assert len(ids["none"]) < len(ids["short"]) < len(ids["paper"])
    assert "gout" in tok.decode(ids["none"]) and "Septicemia" not in tok.decode(ids["none"])
    with pytest.raises(ValueError, match="instruction must be one of"):
        instruction("long")


def test_only_lora_and_head_train(tiny_qwen_dir):
    cfg = _cfg(tiny_qwen_dir, pooling="label_attention")
    model = build_teacher(cfg, seed=0)
    trainable = trainable_parameters(model)
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    bb = model.backbone.config
    head_dim = bb.hidden_size // bb.num_attention_heads
    outs = {"q_proj": bb.num_attention_heads * head_dim, "k_proj": bb.num_key_value_heads * head_dim,
            "v_proj": bb.num_key_value_heads * head_dim}
    r = cfg.lora.rank
    lora = bb.num_hidden_layers * sum(r * (bb.hidden_size + o) for o in outs.values())
    head = 2 * 25 * bb.hidden_size + 25
    assert sum(p.numel() for p in trainable.values()) == lora + head
    total = sum(p.numel() for p in model.parameters())
    assert total > 10 * (lora + head)
    groups = param_groups(model, 1e-5, 1e-4)
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_predict_logits_order_and_padding(tiny_qwen_dir):
    cfg = _cfg(tiny_qwen_dir)
    model = build_teacher(cfg, seed=0)
    torch.nn.init.normal_(model.head.proj.weight, std=1.0)
    tok = load_tokenizer(cfg)
    texts, _ = toy_samples(7, seed=3)
    batched = predict_logits(model, tok, texts, batch_size=3, max_length=64)
    single = np.stack([predict_logits(model, tok, [t], max_length=64)[0] for t in texts])
    assert batched.shape == (7, 25)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    assert np.abs(batched[0] - batched[1]).max() > 1e-4   # different texts, different logits


def _train_in_process(cfg, steps: int = 12):
    """A few optimiser steps without Ray: returns (model, tokenizer, first loss, last loss)."""
    tok = load_tokenizer(cfg)
    texts, labels = toy_samples(32, seed=0)
    ex = make_examples(texts, labels, tok, cfg.max_length, cfg.use_chat_template)
    collate = Collate(pad_id(tok))
    model = build_teacher(cfg, seed=0)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.head_lr))
    loss_fn = BCELoss(balanced_pos_weight(labels) if cfg.pos_weight == "balanced" else None)
    inputs, y = collate(ex)   # the whole set as one batch: the loss is comparable step to step
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_fn(model(**inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model(**inputs), y))
    return model, tok, losses[0], final


@pytest.mark.parametrize("pooling", ["last", "mean", "label_attention"])
def test_every_pooling_trains(tiny_qwen_dir, pooling):
    cfg = _cfg(tiny_qwen_dir, pooling=pooling, pos_weight="balanced" if pooling == "mean" else "none")
    _, _, first, final = _train_in_process(cfg)
    assert final < 0.8 * first, (pooling, first, final)


@pytest.fixture(scope="module")
def trained_artifact(tiny_qwen_dir, tmp_path_factory):
    """A teacher trained a few steps in-process, its logits on 6 texts, and its artifact
    (written once; the round-trip test loads it merged and unmerged)."""
    tmp = tmp_path_factory.mktemp("teacher_artifact")
    cfg = _cfg(tiny_qwen_dir, pooling="last", gradient_checkpointing=True)
    model, tok, _, _ = _train_in_process(cfg, steps=4)
    # LoRA B starts at zero: after training it must not be, or the check below proves nothing.
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    texts, _ = toy_samples(6, seed=9)
    expected = predict_logits(model, tok, texts, max_length=64)
    state = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    write_weights(model, state, tmp / "ckpt")
    meta = write_artifact(tmp / "ckpt", tok, cfg, {"val_macro_f1": 0.5}, str(tmp / "artifact"))
    return tmp / "artifact", meta, texts, expected


@pytest.mark.parametrize("merge", [True, False])
def test_artifact_round_trip(trained_artifact, merge):
    artifact, meta, texts, expected = trained_artifact
    for name in ("adapter/adapter_config.json", "head.safetensors", "tokenizer/tokenizer_config.json", "teacher.json"):
        assert (artifact / name).exists(), name
    assert not any("base_layer" in p.name for p in (artifact / "adapter").iterdir())
    loaded, tok2, meta2 = load_teacher(str(artifact), merge_lora=merge)
    assert not loaded.training
    assert meta2["artifact_id"] == meta["artifact_id"] and len(meta2["artifact_id"]) == 12
    assert meta2["pooling"] == "last" and len(meta2["label_names"]) == 25
    got = predict_logits(loaded, tok2, texts, max_length=64)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_over_long_prompts_keep_text_and_turn_start(tiny_qwen_dir):
    from ckd_ehr.teacher import encode_texts

    tok = load_tokenizer(_cfg(tiny_qwen_dir))
    texts = ["The patient-acquired disease is gout.", "word " * 300]
    full = encode_texts(texts, tok, max_length=4096)
    short = encode_texts(texts, tok, max_length=64)
    assert full[0] == tok(build_prompts(texts[:1], tok, True), add_special_tokens=False)["input_ids"][0]
    assert all(len(x) <= 64 for x in short) and len(full[0]) > 64
    assert short[0][-5:] == full[0][-5:]                     # template end: the assistant turn start
    assert "gout" in tok.decode(short[0])                    # the sample's text survives ...
    assert len(tok.decode(short[0])) < len(tok.decode(full[0]))  # ... the instruction is what got cut


def test_num_layers_keeps_the_first_layers_everywhere(tiny_qwen_dir, tmp_path):
    """teacher.num_layers: the cut decoder returns (the final norm of) layer k's states, its
    artifact loads cut the same way (soft labels, probe rows), and an impossible cut is an error."""
    from ckd_ehr.teacher.model import load_backbone

    full = load_backbone(str(tiny_qwen_dir)).eval()
    cut = load_backbone(str(tiny_qwen_dir), num_layers=1).eval()
    assert len(full.layers) == 2 and len(cut.layers) == 1 and cut.config.num_hidden_layers == 1
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        states = full(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = cut(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, full.norm(states[1]))
        assert not torch.allclose(got, states[-1])
    with pytest.raises(ValueError, match="num_layers: 3 is not between 1 and the model's 2 layers"):
        load_backbone(str(tiny_qwen_dir), num_layers=3)
    with pytest.raises(ValueError, match="generative"):
        _cfg(tiny_qwen_dir, head="generative", head_init="random", best_metric="val_loss", num_layers=1)

    cfg = _cfg(tiny_qwen_dir, pooling="mean", num_layers=1)
    model, tok, _, _ = _train_in_process(cfg, steps=2)
    assert len(model.backbone.base_model.model.layers) == 1
    texts, _ = toy_samples(4, seed=3)
    expected = predict_logits(model, tok, texts, max_length=64)
    write_weights(model, {n: p.detach().clone() for n, p in trainable_parameters(model).items()}, tmp_path / "ckpt")
    write_artifact(tmp_path / "ckpt", tok, cfg, {"val_macro_auroc": 0.5}, str(tmp_path / "artifact"))
    loaded, tok2, meta = load_teacher(str(tmp_path / "artifact"))
    assert meta["config"]["num_layers"] == 1 and loaded.backbone.config.num_hidden_layers == 1
    np.testing.assert_allclose(predict_logits(loaded, tok2, texts, max_length=64), expected, atol=1e-4)
