"""Linear probe (ckd_ehr.modeling.probe) and the student's windowed encoding: plain pieces, no Ray."""
import numpy as np
import torch

from ckd_ehr.metrics import macro_auroc
from ckd_ehr.modeling.probe import LinearProbe, fit_probe


SCALE = np.random.default_rng(99).uniform(0.1, 50, size=40)   # badly scaled features, shared by every split
OFFSET = np.random.default_rng(98).normal(size=40) * 10


def _features(n, seed, signal=2.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 25)) < 0.3).astype(np.int8)
    x = rng.normal(size=(n, 40)) * SCALE + OFFSET
    x[:, :25] += signal * y * SCALE[:25]  # one informative feature per label
    return x.astype(np.float32), y


def test_probe_finds_signal_and_folds_standardisation(tmp_path):
    xt, yt = _features(400, 0)
    xv, yv = _features(150, 1)
    xs, ys = _features(300, 2)
    probe = fit_probe(xt, yt, xv, yv)
    assert probe.val_macro_auroc > 0.85
    assert macro_auroc(ys, probe.probs(xs)) > 0.85
    # the same probe on features without signal is at chance: the fit cannot invent it
    xn, yn = _features(300, 3, signal=0.0)
    assert abs(macro_auroc(yn, probe.probs(xn)) - 0.5) < 0.08
    # loaded into an nn.Linear on raw features it gives the same logits
    lin = torch.nn.Linear(40, 25)
    from ckd_ehr.modeling.probe import load_linear

    load_linear(lin, probe)
    np.testing.assert_allclose(lin(torch.as_tensor(xs)).detach().numpy(), probe.logits(xs), rtol=1e-3, atol=1e-3)
    probe.save(str(tmp_path / "p.safetensors"))
    back = LinearProbe.load(str(tmp_path / "p.safetensors"))
    assert back.c_value == probe.c_value and back.train_samples == 400
    np.testing.assert_allclose(back.weight, probe.weight)


def test_probe_is_calibrated_at_strong_regularisation():
    """At the C the demo's probes choose (0.003), the probe's mean predicted rate is each
    phenotype's training rate: the intercept is not shrunk with the weights (liblinear's
    penalised intercept gave 0.39 for a rate of 0.17, and fine-tuning from that head started
    at a loss near ln 2)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(320, 384)).astype(np.float32)
    w = rng.normal(size=(384, 25)) * 0.03
    y = (x @ w - 1.6 + rng.logistic(size=(320, 25)) > 0).astype(np.int8)
    probe = fit_probe(x, y, x[:80], y[:80], c_grid=(0.003,))
    rate, predicted = y.mean(0), probe.probs(x).mean(0)
    assert rate.mean() < 0.25
    np.testing.assert_allclose(predicted, rate, atol=0.02)


def test_probe_constant_label_gets_its_rate():
    xt, yt = _features(200, 0)
    yt[:, 3] = 0
    probe = fit_probe(xt, yt, *_features(80, 1))
    assert np.all(probe.weight[3] == 0) and probe.probs(xt)[:, 3].max() < 1e-3


def test_windowed_encoding_matches_one_pass_and_covers_long_inputs(tiny_bert_dir):
    from ckd_ehr.student.model import build_student, encode_in_windows

    model = build_student(str(tiny_bert_dir)).eval()
    window = model.window
    ids = torch.randint(5, 100, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        one = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(encode_in_windows(model.encoder, ids, mask, 64), one)  # fits: one pass
        # two windows of 20: each equals encoding that window alone
        two = encode_in_windows(model.encoder, ids, mask, 20)
        first = model.encoder(input_ids=ids[:, :20], attention_mask=mask[:, :20]).last_hidden_state
        second = model.encoder(input_ids=ids[:1, 20:], attention_mask=mask[:1, 20:]).last_hidden_state
        assert torch.allclose(two[:, :20], first, atol=1e-5) and torch.allclose(two[:1, 20:], second, atol=1e-5)
        # beyond the encoder's positions the model still runs, and the tail changes the output
        long = torch.randint(5, 100, (1, window + 30))
        m = torch.ones_like(long)
        a = model(long, m)
        long2 = long.clone()
        long2[0, -5:] = 7
        assert a.shape == (1, 25) and not torch.allclose(a, model(long2, m))


def test_teacher_at_step_zero_is_its_probe(tiny_qwen_dir):
    """evaluate's probe_teacher row reuses the teacher's soft labels when checkpoint selection
    kept step 0: that rests on a LoRA-wrapped backbone, before any update, computing exactly
    what the frozen backbone computes (peft starts B at zero)."""
    from ckd_ehr.teacher.model import MLAPH, TeacherModel, add_lora, load_backbone

    xt, yt = _features(120, 0)
    probe = fit_probe(np.random.default_rng(0).normal(size=(120, 32)).astype(np.float32), yt,
                      np.random.default_rng(1).normal(size=(60, 32)).astype(np.float32), _features(60, 1)[1])
    torch.manual_seed(0)
    frozen = TeacherModel(load_backbone(str(tiny_qwen_dir)), MLAPH(32, 25, "mean")).eval()
    frozen.load_probe(probe)
    wrapped = TeacherModel(add_lora(load_backbone(str(tiny_qwen_dir)), 4, 8.0, 0.0, ["q_proj", "v_proj"]),
                           MLAPH(32, 25, "mean")).eval()
    wrapped.load_probe(probe)
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    with torch.no_grad():
        a, b = frozen(ids, mask), wrapped(ids, mask)
    torch.testing.assert_close(a, b)
    # and the shortcut is not vacuous: one LoRA step later the outputs differ
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        assert not torch.allclose(frozen(ids, mask), wrapped(ids, mask))


def test_probe_fits_probability_targets():
    """A distillation target (probabilities, not 0/1) is fitted as BCE against it: with the
    teacher's own probabilities sigmoid(2 x0) as target and weak regularisation, the logistic
    regression recovers the teacher's weights; mixed with labels it lies between."""
    from ckd_ehr.evaluation.baselines import fit_one_vs_rest

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    teacher = 1.0 / (1.0 + np.exp(-2.0 * x[:, :1]))
    models = fit_one_vs_rest(x, teacher, c_value=1e4)
    np.testing.assert_allclose(models[0].coef_[0], [2.0, 0.0, 0.0], atol=0.02)
    labels = (rng.random((400, 1)) < teacher).astype(np.int8)
    hard = fit_one_vs_rest(x, labels, c_value=1e4)[0].coef_[0, 0]
    mixed = fit_one_vs_rest(x, 0.5 * labels + 0.5 * teacher, c_value=1e4)[0].coef_[0, 0]
    assert min(hard, 2.0) < mixed < max(hard, 2.0), (hard, mixed)


def test_probe_fit_is_scikit_learns_logistic_regression_and_picks_c_on_training_folds():
    """logistic_fit minimises scikit-learn's lbfgs objective (same coefficients), soft targets
    as sample-weighted rows; fit_probe chooses C on training folds, never on validation: a
    validation split whose labels are noise changes its reported score, not its choice."""
    from sklearn.linear_model import LogisticRegression

    from ckd_ehr.modeling.probe import logistic_fit

    xt, yt = _features(300, 0)
    z = ((xt - xt.mean(0)) / xt.std(0)).astype(np.float64)   # scikit-learn fits float32 input in float32
    w, b = logistic_fit(z, yt, 0.05)
    for j in (0, 7, 24):
        ref = LogisticRegression(C=0.05, solver="lbfgs", max_iter=5000, tol=1e-10).fit(z, yt[:, j])
        np.testing.assert_allclose(w[j], ref.coef_[0], atol=2e-4)
        np.testing.assert_allclose(b[j], ref.intercept_[0], atol=2e-4)
    soft = np.clip(yt * 0.8 + 0.1, 0, 1)
    ws, bs = logistic_fit(z, soft, 0.05)
    twice = np.concatenate([z, z])
    ref = LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(
        twice, np.r_[np.ones(300), np.zeros(300)], sample_weight=np.r_[soft[:, 3], 1 - soft[:, 3]])
    np.testing.assert_allclose(ws[3], ref.coef_[0], atol=2e-4)

    xv, yv = _features(150, 1)
    good = fit_probe(xt, yt, xv, yv)
    noise = fit_probe(xt, yt, xv, np.random.default_rng(4).permutation(yv))
    assert good.c_value == noise.c_value and good.cv_macro_auroc == noise.cv_macro_auroc > 0.85
    assert good.val_macro_auroc > 0.85 > 0.65 > noise.val_macro_auroc
