"""Linear probes: a logistic-regression head on frozen, pooled features.

One fit, two uses:
- the `head_init: probe` recipe of both trainers (linear probe, then fine-tune): before the
  first step, the head is set to the probe fitted on the frozen model's features of the
  training samples, so fine-tuning starts from what the frozen model already separates
  instead of from a random head that the backbone's updates must first catch up with;
- `evaluate`'s probe rows: that same probe (saved in the artifact as `PROBE_HEAD`) applied to
  the frozen model's features of the test samples, the reference a fine-tuned model must beat.

The fit standardises features (training mean and deviation), fits one scikit-learn
LogisticRegression per phenotype for each C of a grid, keeps the C with the best validation
macro AUROC (as the logistic-regression baseline does), and folds the standardisation back
into one linear map on the raw features, so it loads into the models' own `nn.Linear` heads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ckd_ehr.evaluation.baselines import fit_one_vs_rest, macro_auroc

log = logging.getLogger(__name__)

PROBE_C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
"""Inverse regularisation strengths tried on validation (on standardised features). Dense
384-576-dimensional features of a few hundred samples want strong regularisation: on the
demo cohort 1,500 MiniLM samples chose 0.003 and 320 samples chose 0.003, the old grid's
edge, so the grid now reaches two steps below it."""


@dataclass
class LinearProbe:
    weight: np.ndarray
    """[num_labels, hidden] on raw (unstandardised) features."""
    bias: np.ndarray
    """[num_labels]."""
    c_value: float
    """The chosen inverse regularisation strength."""
    val_macro_auroc: float
    """Validation macro AUROC of the chosen C."""
    train_samples: int

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias

    def probs(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(features)))

    def tensors(self) -> dict:
        import torch

        return {"weight": torch.as_tensor(self.weight, dtype=torch.float32),
                "bias": torch.as_tensor(self.bias, dtype=torch.float32),
                "c_value": torch.tensor([self.c_value], dtype=torch.float64),
                "val_macro_auroc": torch.tensor([self.val_macro_auroc], dtype=torch.float64),
                "train_samples": torch.tensor([self.train_samples], dtype=torch.int64)}

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors(), path)

    @classmethod
    def load(cls, path: str) -> "LinearProbe":
        from safetensors.torch import load_file

        t = load_file(path)
        return cls(weight=t["weight"].numpy(), bias=t["bias"].numpy(), c_value=float(t["c_value"][0]),
                   val_macro_auroc=float(t["val_macro_auroc"][0]), train_samples=int(t["train_samples"][0]))


def load_linear(linear, probe: LinearProbe) -> None:
    """Copy a probe's weight [K, H] and bias [K] into an nn.Linear (keeping its dtype and device)."""
    import torch

    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(probe.weight, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(probe.bias, dtype=linear.bias.dtype))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              c_grid=PROBE_C_GRID, seed: int = 0) -> LinearProbe:
    """The probe of module doc. A phenotype with one class in training gets weight 0 and the
    logit of its (clipped) training rate as bias."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_val = np.asarray(x_val, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)  # 0/1 labels, or a distillation target in [0, 1]
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0) + 1e-6
    z_train, z_val = (x_train - mu) / sd, (x_val - mu) / sd
    best = None
    for c_value in c_grid:
        models = fit_one_vs_rest(z_train, y_train, c_value, seed)
        w = np.zeros((y_train.shape[1], x_train.shape[1]))
        b = np.zeros(y_train.shape[1])
        for j, m in enumerate(models):
            if isinstance(m, float):
                rate = min(max(m, 1e-4), 1 - 1e-4)
                b[j] = np.log(rate / (1 - rate))
            else:
                w[j], b[j] = m.coef_[0], m.intercept_[0]
        score = macro_auroc(y_val, z_val @ w.T + b) if len(y_val) else float("nan")
        if best is None or (score > best[0]) or np.isnan(best[0]):
            best = (score, c_value, w, b)
    score, c_value, w, b = best
    # w . (x - mu) / sd + b  ==  (w / sd) . x + (b - (w / sd) . mu)
    weight = w / sd
    bias = b - weight @ mu
    log.info("linear probe: %d training samples, %d features, C=%s, validation macro AUROC %.4f",
             len(x_train), x_train.shape[1], c_value, score)
    return LinearProbe(weight=weight.astype(np.float32), bias=bias.astype(np.float32), c_value=float(c_value),
                       val_macro_auroc=float(score), train_samples=len(x_train))
