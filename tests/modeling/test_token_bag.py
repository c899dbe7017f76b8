"""The student's token bag (ckd_ehr.modeling.token_bag, `student.token_bag`): the batched bag is
the per-row one, it splits at the knowledge lead, the probe fits it and loads into the model
exactly, cached training reads it beside the states, and a saved student keeps it."""
import numpy as np
import pytest
import torch

from ckd_ehr.modeling.token_bag import TokenBag, bag_columns, lead_position, multi_hot

BAG = TokenBag(lead=(7, 8), vocab_size=300)


def _rows():
    g = np.random.default_rng(0)
    rows = [g.integers(10, 300, size=n).tolist() for n in (37, 20, 33, 5, 12)]
    rows[0][10:12] = [7, 8]          # the lead, once
    rows[2][3:5] = [7, 8]
    rows[2][20:22] = [7, 8]          # twice: the first one splits
    rows[3][3:5] = [7, 8]            # at the row's end
    rows[4][11] = 7                  # half a lead: no split
    return rows


def test_batched_bag_is_the_rows_bag_split_at_the_first_lead():
    from ckd_ehr.modeling.collate import pad_batch

    rows = _rows()
    assert [lead_position(r, BAG.lead) for r in rows] == [10, 20, 3, 3, 12]
    batch = pad_batch(rows, 0)
    got = multi_hot(batch["input_ids"], batch["attention_mask"], torch.tensor(BAG.lead), BAG.vocab_size)
    assert got.shape == (5, 600) and set(got.unique().tolist()) <= {0.0, 1.0}
    for i, r in enumerate(rows):
        want = bag_columns(r, BAG)
        assert np.array_equal(np.flatnonzero(got[i].numpy()), want), i
    # the segments: a wordpiece after the lead lands in the second half
    assert 300 + rows[0][20] in bag_columns(rows[0], BAG) and rows[0][0] in bag_columns(rows[0], BAG)
    assert all(c < 300 for c in bag_columns(rows[1], BAG))   # no lead: one segment


def test_knowledge_lead_is_what_opens_the_clauses():
    from ckd_ehr.config import TextConfig
    from ckd_ehr.text import knowledge_lead, render_input

    for cfg in (TextConfig(render="compact"), TextConfig(), TextConfig(clauses="short")):
        text = render_input(["Sepsis"], ["Heparin"], [], {"Septicemia (except in labor)": ["Zanfloxil"]}, cfg).text
        lead = knowledge_lead(cfg)
        assert lead and lead in text and text.index(lead) > text.index("Heparin"), (cfg, text)
        assert lead not in render_input(["Sepsis"], ["Heparin"], [], None, cfg).text


def test_probe_with_bag_finds_a_token_and_loads_into_the_student_exactly(windowed_bert):
    """Label 0 is 'token 50 after the lead, 51 before it' (else the other way round): the probe's
    bag weights find it (validation AUROC near 1, far above the pooled features alone), and the student with the probe loaded gives
    the probe's logits on [features, bag]."""
    from ckd_ehr.modeling.collate import pad_batch
    from ckd_ehr.modeling.probe import fit_probe, fit_probe_with_bag
    from ckd_ehr.student.model import build_student

    g = np.random.default_rng(1)
    rows, y = [], []
    for _ in range(240):
        r = g.integers(60, 300, size=14).tolist() + [7, 8] + g.integers(60, 300, size=4).tolist()
        pos = g.random() < 0.4
        # every row holds 50 and 51 once: the label is which one comes after the lead
        r[int(g.integers(17, 20))] = 50 if pos else 51
        r[int(g.integers(0, 13))] = 51 if pos else 50
        rows.append(r)
        y.append(np.r_[float(pos), (g.random(24) < 0.3).astype(float)])
    y = np.array(y)
    model = build_student(windowed_bert, token_bag=BAG).eval()
    batch = pad_batch(rows, 0)
    with torch.no_grad():
        feats = model.features(**batch).numpy()
    plain = fit_probe(feats[:160], y[:160], feats[160:], y[160:])
    probe = fit_probe_with_bag(feats[:160], feats[160:], rows[:160], rows[160:], BAG, y[:160], y[160:])
    assert probe.weight.shape == (25, 32 + 600)
    from sklearn.metrics import roc_auc_score

    bag = multi_hot(batch["input_ids"], batch["attention_mask"], torch.tensor(BAG.lead), 300).numpy()
    logits = probe.logits(np.hstack([feats, bag]))
    with_bag = roc_auc_score(y[160:, 0], logits[160:, 0])
    assert with_bag > 0.95 and with_bag > roc_auc_score(y[160:, 0], plain.logits(feats[160:])[:, 0]) + 0.1
    model.load_probe(probe)
    with torch.no_grad():
        got = model(**batch).double().numpy()
    np.testing.assert_allclose(got, logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="probe of 32 features"):
        model.load_probe(plain)


def test_cached_student_with_bag_reads_the_ids_and_a_saved_one_keeps_the_bag(windowed_bert, tmp_path):
    from ckd_ehr.modeling.collate import pad_batch
    from ckd_ehr.modeling.frozen import compute_bottom, pad_cached
    from ckd_ehr.student.model import build_student, load_student_model, save_student

    rows = _rows()
    batch = pad_batch(rows, 0)
    model = build_student(windowed_bert, token_bag=BAG).eval()
    with torch.no_grad():
        model.bag_head.weight.copy_(torch.randn_like(model.bag_head.weight))
    want = model(**batch)
    model.freeze_below(1)
    states = compute_bottom(model, rows, 2, torch.float32, torch.device("cpu"))
    cached = pad_cached(states, batch["input_ids"].shape[1])
    torch.testing.assert_close(model(**batch, cached=cached), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the token ids"):
        model(attention_mask=batch["attention_mask"], cached=cached)
    save_student(model, tmp_path / "s")
    loaded = load_student_model(tmp_path / "s")
    assert loaded.token_bag == BAG
    torch.testing.assert_close(loaded(**batch), want, rtol=0, atol=1e-5)


def test_token_bag_refuses_label_attention_pooling():
    from pydantic import ValidationError

    from ckd_ehr.config import StudentConfig

    with pytest.raises(ValidationError, match="token_bag"):
        StudentConfig(token_bag=True, pooling="label_attention")
