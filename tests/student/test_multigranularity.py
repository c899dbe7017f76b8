"""Multi-granularity distillation (docs/method.md): units found again in rendered text, both
tokenizers mapped onto them, the teacher's targets and their storage, the student's unit
outputs and the two KL terms. The Ray Train run with all three terms is the shared tiny run
(its ckd_ehr student, tests/helpers/tiny_run.py), checked at the end."""
from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest
import torch

from ckd_ehr.config import PipelineConfig, TextConfig, build
from ckd_ehr.contracts import ContractError
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.modeling.losses import DistillLoss, label_attention_kl, relation_kl
from ckd_ehr.modeling.units import restrict, token_units, unit_attention, unit_relations, unit_vectors
from ckd_ehr.text import render_input, text_units

ITEMS = ["Heparin", "Sodium Chloride 0.9%  Flush", "Diabetes, uncomplicated", "Acute kidney failure, unspecified",
         "Insulin", "Aspirin; low dose", "CHF.", "Furosemide"]


def _random_visit(rng: random.Random):
    names = phenotype_names()
    dx, rx, px = (rng.sample(ITEMS, rng.randint(0, k)) for k in (5, 5, 3))
    eff = {names[k]: rng.sample(ITEMS, rng.randint(1, 3)) for k in sorted(rng.sample(range(25), rng.randint(0, 4)))}
    return dx, rx, px, eff


def test_text_units_read_every_item_back_whatever_the_budgets():
    rng = random.Random(0)
    names = phenotype_names()
    for _ in range(500):
        dx, rx, px, eff = _random_visit(rng)
        cfg = TextConfig(instruction=rng.choice(["none", "short", "paper"]), clauses=rng.choice(["paper", "short"]),
                         render=rng.choice(["paper", "compact"]),
                         max_chars_diagnoses=rng.randint(1, 80), max_chars_drugs=rng.randint(1, 80),
                         max_chars_efficacy=rng.randint(1, 300))
        r = render_input(dx, rx, px, efficacy=eff, cfg=cfg)
        units = text_units(r.text, dx, rx, px)
        by_kind = {"d": dx, "m": rx, "p": px}
        for key, start, end in units:
            if key[0] in by_kind:
                assert r.text[start:end] == by_kind[key[0]][int(key[1:])]
            else:
                assert r.text[start:end].endswith((";", ".")) and names[int(key[1:])] in r.text[start:end]
        kept = {"d": len(dx) - r.dropped["diagnoses"], "m": len(rx) - r.dropped["drugs"],
                "p": len(px) - r.dropped["procedures"], "c": len([d for d in eff.values() if d]) - r.dropped["efficacy"]}
        assert {k: sum(u[0][0] == k for u in units) for k in kept} == kept
        assert [u[1] for u in units] == sorted(u[1] for u in units)      # text order, no overlap
    # the compact rendering: the same items and clauses in fewer characters
    dx, rx, px, eff = ["Shock w exac", "Anemia NOS"], ["Heparin"], [], {names[3]: ["Furosemide"], names[9]: ["Insulin"]}
    paper, compact = (render_input(dx, rx, px, efficacy=eff, cfg=TextConfig(render=r)).text for r in ("paper", "compact"))
    assert len(compact) < len(paper) - 60
    assert [compact[a:b] for k, a, b in text_units(compact, dx, rx, px) if k[0] != "c"] == dx + rx
    assert all(f"{names[k]}: {', '.join(d)}" in compact for k, d in ((3, ["Furosemide"]), (9, ["Insulin"])))
    # a text rendered from other lists is an error, not a silent misalignment
    text = render_input(["Heparin"], [], []).text
    with pytest.raises(ValueError, match="matches none of its items"):
        text_units(text, ["Insulin"], [], [])


def _visit_text():
    eff = {phenotype_names()[3]: ["Furosemide", "Heparin"], phenotype_names()[9]: ["Insulin"]}
    dx, rx, px = ["Diabetes, uncomplicated", "Acute kidney failure, unspecified"], ["Heparin", "Insulin"], ["Dialysis"]
    return render_input(dx, rx, px, efficacy=eff, cfg=TextConfig(clauses="short")).text, (dx, rx, px)


def _covered(text, spans, offsets, units):
    """Every non-space character of each unit covered by one of the unit's own tokens."""
    for u, (start, end) in enumerate(spans):
        chars = {i for t, (a, b) in enumerate(offsets) if units[t] == u for i in range(a, b)}
        assert all(i in chars for i in range(start, end) if not text[i].isspace()), (text[start:end], u)


def test_both_tokenizers_map_onto_the_same_units(decoder_tokenizer_dir, tiny_bert_dir):
    from transformers import AutoTokenizer

    from ckd_ehr.modeling.prompts import encode_texts, encode_texts_with_offsets

    text, (dx, rx, px) = _visit_text()
    spans = [(a, b) for _, a, b in text_units(text, dx, rx, px)]
    teacher_tok = AutoTokenizer.from_pretrained(decoder_tokenizer_dir)
    for kind in ("short", "none"):
        ids, offsets = encode_texts_with_offsets([text], teacher_tok, 1024, True, kind)
        assert ids == encode_texts([text], teacher_tok, 1024, True, kind)
        _covered(text, spans, offsets[0], token_units(offsets[0], spans))
        # the template's and the instruction's tokens belong to no unit
        assert (token_units(offsets[0], spans) == -1).sum() > 5
    # over-long: the prompt is rebuilt from its parts, the offsets follow the text's head
    ids, offsets = encode_texts_with_offsets([text], teacher_tok, 40, True, "short")
    assert ids == encode_texts([text], teacher_tok, 40, True, "short") and len(ids[0]) == 40
    kept = token_units(offsets[0], spans)
    assert 0 in kept and len(spans) - 1 not in kept       # the first items survive, the last clause is cut
    student_tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = student_tok([text], return_offsets_mapping=True)
    units = token_units(enc["offset_mapping"][0], spans)
    _covered(text, spans, enc["offset_mapping"][0], units)
    assert units[0] == -1 and units[-1] == -1                              # [CLS], [SEP]


def test_unit_losses_are_zero_at_the_teacher_and_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    att = torch.softmax(torch.randn(3, 25, 6, generator=g), -1)
    rel = torch.softmax(torch.randn(3, 6, 6, generator=g), -1)
    probs, mask = torch.rand(3, 25, generator=g), torch.ones(3, 6, dtype=torch.bool)
    assert float(label_attention_kl(att, att, probs, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(relation_kl(rel, rel, mask)) == pytest.approx(0.0, abs=1e-6)
    other_att = torch.softmax(torch.randn(3, 25, 6, generator=g), -1)
    other_rel = torch.softmax(torch.randn(3, 6, 6, generator=g), -1)
    assert float(label_attention_kl(other_att, att, probs, mask)) > 0.01
    assert float(relation_kl(other_rel, rel, mask)) > 0.01
    # a phenotype the teacher deems absent weighs nothing; padded units are not rows
    assert float(label_attention_kl(other_att, att, torch.zeros(3, 25), mask)) == 0.0
    padded = mask.clone()
    padded[:, 4:] = False
    rel_pad = rel.clone()
    rel_pad[:, 4:] = 0
    assert float(relation_kl(other_rel * padded.unsqueeze(-1), rel_pad, padded)) > 0


def test_unit_pooling_and_restriction():
    units = torch.tensor([[-1, 0, 0, 1, -1, 2], [-1, 1, 0, -1, -1, -1]])
    attn = torch.softmax(torch.randn(2, 6, 4), dim=1)
    dist = unit_attention(attn, units, 3)
    assert torch.allclose(dist[0].sum(-1), torch.ones(4)) and dist[1, :, 2].abs().max() == 0
    hidden = torch.randn(2, 6, 8)
    vec, present = unit_vectors(hidden, units, 3)
    assert torch.allclose(vec[0, 0], hidden[0, 1:3].mean(0)) and present.tolist() == [[True] * 3, [True, True, False]]
    rel = unit_relations(vec, present)
    assert torch.allclose(rel[0].sum(-1), torch.ones(3)) and rel[1, 2].abs().max() == 0 and rel[1, :, 2].abs().max() == 0
    # restricting a softmax to a subset and renormalising is the softmax over the subset
    logits = np.random.default_rng(0).normal(size=(4, 4))
    full = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sub = restrict(full, ["a", "b", "c", "d"], ["d", "b"], square=True)
    direct = np.exp(logits[[3, 1]][:, [3, 1]])
    np.testing.assert_allclose(sub, direct / direct.sum(-1, keepdims=True), rtol=1e-5)


def test_teacher_targets_round_trip_and_train_the_student(tiny_qwen_dir, tiny_bert_dir, tmp_path):
    """The soft-label stage's scoring with unit targets on a tiny label-attention teacher, its
    table written and read back and checked, then aligned to a tiny student whose loss carries
    both unit terms and whose gradients reach its encoder and its auxiliary label attention."""
    from transformers import AutoTokenizer

    from ckd_ehr import storage
    from ckd_ehr.soft_labels.scoring import check_unit_targets, score_with_units, unit_inputs, unit_target_table
    from ckd_ehr.student.data import align_units, read_unit_targets
    from ckd_ehr.student.model import build_student
    from ckd_ehr.student.train import StudentCollate, examples
    from ckd_ehr.student.data import Encoded
    from ckd_ehr.teacher.model import MLAPH, TeacherModel, load_backbone

    rng = random.Random(1)
    visits = [_random_visit(rng) for _ in range(6)]
    cfg = TextConfig(titles="long", clauses="short")
    texts = [render_input(dx, rx, px, efficacy=eff, cfg=cfg).text for dx, rx, px, eff in visits]
    items = [(dx, rx, px) for dx, rx, px, _ in visits]
    torch.manual_seed(0)
    backbone = load_backbone(str(tiny_qwen_dir))
    teacher = TeacherModel(backbone, MLAPH(backbone.config.hidden_size, 25, "label_attention")).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    ids, maps, keys = unit_inputs(tok, texts, items, True, 1024, "none")
    out = score_with_units(teacher, tok, ids, maps, keys, sub_batch_size=4, relation_layer=-1)
    from ckd_ehr.soft_labels.scoring import score_ids
    logits, _ = score_ids(teacher, tok, ids, 4)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-4)   # one forward pass gives both
    sample_ids = [f"s{i}" for i in range(len(texts))]
    table = unit_target_table(sample_ids, keys, out["unit_attention"], out["unit_relation"])
    path = str(tmp_path / "units" / "train.parquet")
    storage.write_parquet(table, path)
    back = read_unit_targets(path, sample_ids[::-1])
    assert back.column("sample_id").to_pylist() == sample_ids[::-1]
    check_unit_targets(back, sample_ids, path, attention=True, relation=True)
    with pytest.raises(ContractError, match="no unit targets for 1 of"):
        read_unit_targets(path, sample_ids + ["nope"])
    broken = back.set_column(2, "unit_attention", pa.array([[0.5] * 3] * back.num_rows, pa.list_(pa.float16())))
    with pytest.raises(ContractError, match="malformed"):
        check_unit_targets(broken, sample_ids, path, attention=True, relation=True)

    samples = pa.table({"sample_id": sample_ids, "diagnosis_titles": [v[0] for v in visits],
                        "drugs": [v[1] for v in visits], "procedure_titles": [v[2] for v in visits]})
    stok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    aligned = align_units(samples, texts, stok, 512, cfg, read_unit_targets(path, sample_ids), True, True)
    assert aligned.stats["mean_units_common"] == pytest.approx(aligned.stats["mean_units_teacher"])  # same text
    enc_ids = stok(texts, truncation=True, max_length=512)["input_ids"]
    data = Encoded(input_ids=enc_ids, labels=np.zeros((6, 25), np.float32), sample_ids=sample_ids,
                   subject_ids=list(range(6)), teacher_probs=1 / (1 + np.exp(-out["logits"])),
                   teacher_logits=out["logits"], units=aligned)
    inputs, targets = StudentCollate(0)(examples(data, True, train=True))
    student = build_student(str(tiny_bert_dir), label_attention=True, relation_layer=-1)
    from ckd_ehr.config import DistillConfig

    loss_fn = DistillLoss(DistillConfig(), hard_only=False, unit_weights=(1.0, 1.0))
    loss, parts = loss_fn.parts(student(**inputs), targets)
    assert parts["loss_label_attention"] > 0 and parts["loss_relation"] > 0
    loss.backward()
    assert student.unit_queries.grad.abs().sum() > 0
    assert student.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # validation batches (no units) get logits, as before
    inputs.pop("token_units")
    assert student(**inputs).shape == (6, 25)


def test_config_asks_the_soft_label_stage_for_targets_and_checks_the_teacher():
    cfg = build(PipelineConfig, {"student": {"variants": ["ckd_ehr", "ckd_ehr_relation"]}})
    assert cfg.soft_labels.unit_targets
    assert cfg.student.distill.unit_weights("ckd_ehr") == (0.0, 0.0)
    assert cfg.student.distill.unit_weights("ckd_ehr_relation") == (0.0, 1.0)
    assert not build(PipelineConfig, {}).soft_labels.unit_targets
    with pytest.raises(ValueError, match="teacher.pooling: label_attention"):
        build(PipelineConfig, {"student": {"distill": {"label_attention": 0.5}}})
    cfg = build(PipelineConfig, {"teacher": {"pooling": "label_attention"},
                                 "student": {"distill": {"label_attention": 0.5}, "variants": ["ckd_ehr", "hard_eadf"]}})
    assert cfg.student.distill.unit_weights("ckd_ehr") == (0.5, 0.0)
    assert cfg.student.distill.unit_weights("hard_eadf") == (0.0, 0.0)


def test_tiny_run_trains_the_student_with_all_three_terms(tiny_run):
    """The shared run's ckd_ehr student distilled label attention, soft labels and relations on
    Ray Train from a label-attention teacher's stored targets, and kept its last step
    (student.keep_checkpoint: last), so the kept model carries the terms."""
    import json

    from safetensors.torch import load_file

    from ckd_ehr.contracts import SPLITS, RunLayout
    from ckd_ehr.soft_labels.scoring import check_unit_targets

    layout = RunLayout(str(tiny_run.run_dir))
    for split in SPLITS:
        table = pa.parquet.read_table(layout.unit_targets(split))
        ids = pa.parquet.read_table(layout.soft_labels(split)).column("sample_id").to_pylist()
        check_unit_targets(table, ids, split, attention=True, relation=True)
    meta = json.loads(open(layout.student_meta("ckd_ehr")).read())
    units = meta["fit"]["train"]["units"]
    assert units["mean_units_common"] > 3
    assert meta["metrics"]["kept_checkpoint"]["step"] == tiny_run.config["student"]["max_steps"]
    weights = sorted((tiny_run.run_dir / "student" / "ckd_ehr" / "train").rglob("trainable.safetensors"))
    assert weights and "unit_queries" in load_file(str(weights[-1]))


def test_label_attention_teacher_starts_at_its_probe(tiny_qwen_dir):
    """head_init probe for a label-attention MLAPH: zero queries (uniform attention = the mean
    pool the probe was fitted on), the probe's weights per label: the probe's logits exactly."""
    from ckd_ehr.modeling.collate import pad_batch
    from ckd_ehr.modeling.probe import LinearProbe
    from ckd_ehr.teacher.model import MLAPH, TeacherModel, load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(str(tiny_qwen_dir))
    h = backbone.config.hidden_size
    model = TeacherModel(backbone, MLAPH(h, 25, "label_attention")).eval()
    rng = np.random.default_rng(0)
    probe = LinearProbe(weight=rng.normal(size=(25, h)).astype(np.float32), bias=rng.normal(size=25).astype(np.float32),
                        c_value=1.0, val_macro_auroc=0.5, train_samples=10)
    model.load_probe(probe)
    batch = pad_batch([[5, 6, 7, 8], [9, 10]], 0)
    with torch.no_grad():
        feats = model.features(**batch).numpy()
        logits = model(**batch).numpy()
    np.testing.assert_allclose(logits, feats @ probe.weight.T + probe.bias, atol=1e-4)


def test_label_attention_queries_train_at_their_own_rate(tiny_qwen_dir, tiny_bert_dir):
    """teacher.query_lr / student.query_lr put the label-attention queries in a group of their own
    (the head's small rate left the probe-started queries at zero); every trainable parameter is
    in exactly one group, and without query_lr the queries stay with the head."""
    from ckd_ehr.student.model import build_student
    from ckd_ehr.student.train import StudentParamGroups
    from ckd_ehr.teacher.model import MLAPH, TeacherModel, load_backbone, param_groups

    backbone = load_backbone(str(tiny_qwen_dir))
    teacher = TeacherModel(backbone, MLAPH(backbone.config.hidden_size, 25, "label_attention"))
    student = build_student(str(tiny_bert_dir), label_attention=True)
    for model, groups_of in ((teacher, lambda q: param_groups(teacher, 1e-5, 1e-4, 0.0, q)),
                             (student, lambda q: StudentParamGroups(3e-5, None, 0.0, q)(student))):
        queries = model.head.queries if model is teacher else model.unit_queries
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        for query_lr, want in ((0.1, 0.1), (None, 1e-4 if model is teacher else 3e-5)):
            groups = groups_of(query_lr)
            ids = [id(p) for g in groups for p in g["params"]]
            assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
            (lr,) = [g["lr"] for g in groups if any(p is queries for p in g["params"])]
            assert lr == want


def test_label_attention_spread_tells_uniform_targets_from_specific_ones():
    """The soft-label stage's check on the label-level targets: 0 when every phenotype has the
    same distribution over the units (queries at zero), positive when they differ."""
    from ckd_ehr.contracts import UNIT_TARGETS
    from ckd_ehr.soft_labels.scoring import label_attention_spread

    rng = np.random.default_rng(0)
    same = np.tile(rng.dirichlet(np.ones(4)), (25, 1))
    differ = rng.dirichlet(np.ones(4), size=25)

    def table(att):
        return pa.table({"sample_id": ["a"], "units": [["d:x", "d:y", "m:z", "p:w"]],
                         "unit_attention": [att.astype(np.float16).ravel().tolist()], "unit_relation": [None]},
                        schema=UNIT_TARGETS)

    assert label_attention_spread(table(same)) == pytest.approx(0.0, abs=1e-6)
    assert label_attention_spread(table(differ)) > 0.1
