"""Linear probes: a logistic-regression head on frozen, pooled features.

One fit, two uses:
- the `head_init: probe` recipe of both trainers (linear probe, then fine-tune): before the
  first step, the head is set to the probe fitted on the frozen model's features of the
  training samples, so fine-tuning starts from what the frozen model already separates
  instead of from a random head that the backbone's updates must first catch up with;
- `evaluate`'s probe rows: that same probe (saved in the artifact as `PROBE_HEAD`) applied to
  the frozen model's features of the test samples, the reference a fine-tuned model must beat.

The fit standardises features (training mean and deviation), fits an L2 logistic regression
per phenotype (logistic_fit: scikit-learn's objective, all phenotypes in one L-BFGS) for each C
of a grid, keeps the C with the best macro AUROC in a 5-fold cross-validation on the training
rows (validation stays untouched: it judges the probe against the fine-tuned checkpoints), and
folds the standardisation back into one linear map on the raw features, so it loads into the
models' own `nn.Linear` heads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ckd_ehr.metrics import macro_auroc

log = logging.getLogger(__name__)

PROBE_C_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
PROBE_FOLDS = 5
"""Folds of the cross-validation that picks C on the training rows."""
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
    cv_macro_auroc: float = float("nan")
    """Held-out macro AUROC of the chosen C in the cross-validation on training rows."""

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias

    def probs(self, features: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(features)))

    def tensors(self) -> dict:
        # not at module level: torch, loaded only when this runs
        import torch

        return {"weight": torch.as_tensor(self.weight, dtype=torch.float32),
                "bias": torch.as_tensor(self.bias, dtype=torch.float32),
                "c_value": torch.tensor([self.c_value], dtype=torch.float64),
                "val_macro_auroc": torch.tensor([self.val_macro_auroc], dtype=torch.float64),
                "train_samples": torch.tensor([self.train_samples], dtype=torch.int64),
                "cv_macro_auroc": torch.tensor([self.cv_macro_auroc], dtype=torch.float64)}

    def save(self, path: str) -> None:
        # not at module level: safetensors, loaded only when this runs
        from safetensors.torch import save_file

        save_file(self.tensors(), path)

    @classmethod
    def load(cls, path: str) -> "LinearProbe":
        # not at module level: safetensors, loaded only when this runs
        from safetensors.torch import load_file

        t = load_file(path)
        return cls(weight=t["weight"].numpy(), bias=t["bias"].numpy(), c_value=float(t["c_value"][0]),
                   val_macro_auroc=float(t["val_macro_auroc"][0]), train_samples=int(t["train_samples"][0]),
                   cv_macro_auroc=float(t["cv_macro_auroc"][0]) if "cv_macro_auroc" in t else float("nan"))


def load_linear(linear, probe: LinearProbe) -> None:
    """Copy a probe's weight [K, H] and bias [K] into an nn.Linear (keeping its dtype and device)."""
    # not at module level: torch, loaded only when this runs
    import torch

    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(probe.weight, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(probe.bias, dtype=linear.bias.dtype))


def logistic_fit(z: np.ndarray, t: np.ndarray, c_value: float, init: tuple | None = None,
                 max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """One L2-penalised logistic regression per column of `t`, all columns at once: minimises
    C * sum(BCE(z w_j + b_j, t_j)) + |w_j|^2 / 2 for every j (scikit-learn's lbfgs objective,
    intercept not penalised); `t` holds 0/1 labels or probabilities (a distillation target).
    Full-batch L-BFGS over the [n, d] x [d, K] product: the 25 phenotypes of a
    probe cost one fit, which makes a cross-validated choice of C affordable. Returns (W [K, d], b [K])."""
    # not at module level: torch, loaded only when this runs
    import torch

    # The [n, d] x [d, K] products (nearly all of the time) in float32, 3x faster than float64 on
    # a CPU; the loss, the parameters and L-BFGS's history stay float64, so the line search
    # compares objectives at full precision (coefficients agree with float64 to ~1e-5).
    zt = torch.as_tensor(z, dtype=torch.float32)
    tt = torch.as_tensor(t, dtype=torch.float64)
    n, d = zt.shape
    w = torch.zeros((d, tt.shape[1]), dtype=torch.float64) if init is None else \
        torch.as_tensor(init[0].T.copy(), dtype=torch.float64)
    rate = tt.mean(0).clamp(1e-4, 1 - 1e-4)
    b = torch.log(rate / (1 - rate)) if init is None else torch.as_tensor(init[1].copy(), dtype=torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        # scaled by 1 / (C n): the same minimiser, better conditioned numbers for L-BFGS
        loss = torch.nn.functional.binary_cross_entropy_with_logits((zt @ w.float()).double() + b, tt, reduction="sum") / n + \
            (w * w).sum() / (2 * c_value * n)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().T.copy(), b.detach().numpy().copy()


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              c_grid=PROBE_C_GRID, seed: int = 0, folds: int = PROBE_FOLDS,
              standardize: np.ndarray | None = None) -> LinearProbe:
    """The probe of the module doc: C chosen by `folds`-fold cross-validation on the TRAINING
    rows (mean held-out macro AUROC against the fold's labels: rows whose target is a mix with
    teacher probabilities are scored against that target rounded to 0/1), refitted on all of
    them; `val_macro_auroc` is the refitted probe's on the validation rows, which tuned nothing,
    so checkpoint selection compares the probe and the fine-tuned steps on equal terms. A
    phenotype with one class in training gets weight 0 and the logit of its (clipped) rate.
    `standardize` (bool per column, default all): columns left False are fitted as they are (0/1
    indicators: standardising would weaken the penalty on the rarest)."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_val = np.asarray(x_val, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)  # 0/1 labels, or a distillation target in [0, 1]
    mu = x_train.mean(axis=0)
    sd = x_train.std(axis=0) + 1e-6
    if standardize is not None:
        keep = ~np.asarray(standardize, dtype=bool)
        mu[keep], sd[keep] = 0.0, 1.0
    z_train, z_val = (x_train - mu) / sd, (x_val - mu) / sd
    constant = y_train.min(axis=0) == y_train.max(axis=0)
    fold = _fold_ids(len(z_train), folds, seed)
    cv = {}
    inits: dict[int, tuple | None] = {k: None for k in range(folds)}
    for c_value in sorted(c_grid):   # strong to weak: each fit starts from the previous C's solution
        scores = []
        for k in range(folds):
            fit_rows, held = fold != k, fold == k
            inits[k] = logistic_fit(z_train[fit_rows], y_train[fit_rows], c_value, inits[k])
            w, b = inits[k]
            scores.append(macro_auroc(np.round(y_train[held]), z_train[held] @ w.T + b))
        cv[c_value] = float(np.nanmean(scores))
    c_value = max(sorted(c_grid), key=lambda c: (cv[c], -c))
    w, b = logistic_fit(z_train, y_train, c_value)
    rate = np.clip(y_train.mean(axis=0), 1e-4, 1 - 1e-4)
    w[constant], b[constant] = 0.0, np.log(rate / (1 - rate))[constant]
    score = macro_auroc(y_val, z_val @ w.T + b) if len(y_val) else float("nan")
    # w . (x - mu) / sd + b  ==  (w / sd) . x + (b - (w / sd) . mu)
    weight = w / sd
    bias = b - weight @ mu
    log.info("linear probe: %d training samples, %d features, C=%s by %d-fold cross-validation (held-out macro "
             "AUROC %s), validation macro AUROC %.4f", len(x_train), x_train.shape[1], c_value, folds,
             {c: round(v, 4) for c, v in cv.items()}, score)
    return LinearProbe(weight=weight.astype(np.float32), bias=bias.astype(np.float32), c_value=float(c_value),
                       val_macro_auroc=float(score), train_samples=len(x_train), cv_macro_auroc=cv[c_value])


def fit_probe_with_bag(x_train: np.ndarray, x_val: np.ndarray, ids_train, ids_val, bag, y_train: np.ndarray,
                       y_val: np.ndarray, seed: int = 0) -> LinearProbe:
    """fit_probe on the pooled features and a token bag (ckd_ehr.modeling.token_bag) together: the
    bag's columns that vary over the training rows join the features unstandardised; the probe's
    weight comes back over every column, [K, H + 2V] (zeros on the columns no training row varies)."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.modeling.token_bag import bag_columns

    def dense(per_row, columns):
        out = np.zeros((len(per_row), len(columns)), dtype=np.float32)
        for i, cols in enumerate(per_row):
            cols = cols[np.isin(cols, columns)]
            out[i, np.searchsorted(columns, cols)] = 1.0
        return out

    cols_train = [bag_columns(ids, bag) for ids in ids_train]
    cols_val = [bag_columns(ids, bag) for ids in ids_val]
    counts = np.bincount(np.concatenate(cols_train), minlength=bag.width) if cols_train else np.zeros(bag.width, int)
    used = np.flatnonzero((counts > 0) & (counts < len(ids_train)))
    b_train, b_val = dense(cols_train, used), dense(cols_val, used)
    hidden = x_train.shape[1]
    probe = fit_probe(np.hstack([x_train, b_train]), y_train, np.hstack([x_val, b_val]), y_val, seed=seed,
                      standardize=np.r_[np.ones(hidden, bool), np.zeros(len(used), bool)])
    weight = np.zeros((probe.weight.shape[0], hidden + bag.width), dtype=np.float32)
    weight[:, :hidden] = probe.weight[:, :hidden]
    weight[:, hidden + used] = probe.weight[:, hidden:]
    log.info("linear probe with token bag: %d of %d bag columns vary over the training rows", len(used), bag.width)
    return LinearProbe(weight=weight, bias=probe.bias, c_value=probe.c_value, val_macro_auroc=probe.val_macro_auroc,
                       train_samples=probe.train_samples, cv_macro_auroc=probe.cv_macro_auroc)
