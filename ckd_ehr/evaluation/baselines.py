"""Reference rows scored by `ckd-ehr evaluate` beside the models: the floor and what a plain
model gets from the same visit.

- `all_negative`: a score of 0 for every phenotype (AUROC 0.5; element-wise accuracy is what
  predicting nothing gets).
- `prevalence`: each phenotype's training prevalence as the score (AUROC 0.5: a constant ranks
  nothing; it calibrates).
- `copy_forward`: the phenotypes of visit i as the prediction for visit i+1.
- `logistic_regression`: scikit-learn LogisticRegression one-vs-rest (one per phenotype,
  lbfgs) on multi-hot current-visit diagnosis codes, drugs and procedures; vocabulary and
  fit on training patients only, C chosen on validation by macro AUROC.
- `logistic_regression_phenotypes`: the same, also given the 25 phenotypes present at visit i
  (what the EADF text names in its clauses): the floor for a model that reads EADF text.
- `gradient_boosting`: scikit-learn HistGradientBoosting one-vs-rest on the logistic
  regression's features (items seen at least GB_MIN_COUNT times in training), one of
  GB_SETTINGS chosen on validation: the floor a data scientist tries first.

Each returns probabilities for the validation and test samples, so evaluate tunes thresholds
on validation and scores on test exactly as for the models.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
import scipy.sparse as sp

from ckd_ehr.metrics import macro_auroc

log = logging.getLogger(__name__)

BASELINES = ("all_negative", "prevalence", "copy_forward", "logistic_regression", "logistic_regression_phenotypes",
             "gradient_boosting")
FEATURE_COLUMNS = ("diagnosis_codes", "drugs", "procedure_codes")
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
"""Inverse regularisation strengths tried on validation (wide enough that the choice is
interior on the synthetic cohorts at 2,000-10,000 patients)."""


class MultiHot:
    """Multi-hot encoding of list columns; the vocabulary comes from the rows it is fitted on
    (training), items unseen there are ignored."""

    def __init__(self, columns: Sequence[str] = FEATURE_COLUMNS):
        self.columns = tuple(columns)
        self.index: dict[tuple[str, str], int] = {}

    def fit(self, rows: dict[str, list]) -> "MultiHot":
        for col in self.columns:
            for items in rows[col]:
                for item in (() if items is None else items):
                    self.index.setdefault((col, item), len(self.index))
        return self

    def transform(self, rows: dict[str, list]) -> sp.csr_matrix:
        n = len(rows[self.columns[0]])
        r, c = [], []
        for col in self.columns:
            for i, items in enumerate(rows[col]):
                for item in set(() if items is None else items):
                    j = self.index.get((col, item))
                    if j is not None:
                        r.append(i)
                        c.append(j)
        data = np.ones(len(r), dtype=np.float64)
        return sp.csr_matrix((data, (r, c)), shape=(n, len(self.index)))


def fit_one_vs_rest(x_train, y_train: np.ndarray, c_value: float, seed: int = 0) -> list:
    """One LogisticRegression per phenotype; a phenotype with one class in training gets a
    constant (its training rate) instead. `y_train` may hold probabilities (a distillation
    target, ckd_ehr.modeling.losses.DistillLoss.probe_targets): each row then counts as a
    positive of weight t and a negative of weight 1 - t, which is BCE against t.

    lbfgs, not liblinear: liblinear penalises the intercept like any weight, so at the strong
    regularisation the probes choose (C=0.003) every intercept shrinks towards 0 and every
    probability towards 0.5 (mean predicted rate 0.39 for a phenotype of prevalence 0.17). The
    ranking barely changes, but a head initialised from such a probe starts fine-tuning at a
    loss near ln 2, and the first steps spend the backbone on shifting every logit down."""
    # not at module level: sklearn, loaded only when this runs
    from sklearn.linear_model import LogisticRegression

    y_train = np.asarray(y_train)
    soft = not np.isin(y_train, (0, 1)).all()
    if soft:
        x_twice = np.concatenate([x_train, x_train])
        y_twice = np.concatenate([np.ones(len(y_train)), np.zeros(len(y_train))])
    models = []
    for j in range(y_train.shape[1]):
        yj = y_train[:, j]
        if yj.min() == yj.max():
            models.append(float(yj.mean()))
            continue
        model = LogisticRegression(C=c_value, solver="lbfgs", max_iter=1000, random_state=seed)
        if soft:
            models.append(model.fit(x_twice, y_twice, sample_weight=np.concatenate([yj, 1.0 - yj])))
        else:
            models.append(model.fit(x_train, yj))
    return models


def predict_one_vs_rest(models: list, x) -> np.ndarray:
    out = np.empty((x.shape[0], len(models)))
    for j, m in enumerate(models):
        out[:, j] = m if isinstance(m, float) else m.predict_proba(x)[:, 1]
    return out


def logistic_regression(x_train, y_train, x_eval: dict, y_val: np.ndarray, c_grid=C_GRID,
                        seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Fit on training rows for each C, keep the C with the best validation macro AUROC;
    return ({name: probs} for x_eval (must include "val"), {"C": chosen, "val_macro_auroc": {C: value}})."""
    scores, best = {}, None
    for c_value in c_grid:
        models = fit_one_vs_rest(x_train, y_train, c_value, seed)
        scores[c_value] = macro_auroc(y_val, predict_one_vs_rest(models, x_eval["val"]))
        if best is None or scores[c_value] > scores[best[0]]:
            best = (c_value, models)
    chosen, models = best
    probs = {name: predict_one_vs_rest(models, x) for name, x in x_eval.items()}
    return probs, {"C": chosen, "val_macro_auroc": {str(k): v for k, v in scores.items()},
                   "model": "sklearn LogisticRegression(lbfgs) per phenotype",
                   "features": f"multi-hot {', '.join(FEATURE_COLUMNS)} of visit i (training vocabulary)"}


GB_SETTINGS = ({"max_iter": 100, "learning_rate": 0.1, "max_depth": 3, "min_samples_leaf": 40},
               {"max_iter": 100, "learning_rate": 0.1, "max_leaf_nodes": 15, "min_samples_leaf": 20},
               {"max_iter": 60, "learning_rate": 0.1, "max_depth": 2, "min_samples_leaf": 40})
"""The settings tried on validation: shallow trees, 60-100 rounds; strong enough for a few
thousand training pairs (the demo cohort chose the first; a 200-round setting scored no better
and cost the most), few enough to fit in minutes on one core."""
GB_MIN_COUNT = 5
"""Items seen fewer times in training are left out of the boosting's features: a split on them
cannot generalise, and each feature costs histogram time."""


def gradient_boosting(x_train, y_train, x_eval: dict, y_val: np.ndarray, settings=GB_SETTINGS,
                      seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """HistGradientBoostingClassifier per phenotype for each setting, the setting with the best
    validation macro AUROC kept (a phenotype with one class in training: its rate); returns
    ({name: probs} for x_eval (must include "val"), details)."""
    # not at module level: sklearn, loaded only when this runs
    from sklearn.ensemble import HistGradientBoostingClassifier

    keep = np.flatnonzero(np.asarray((x_train > 0).sum(axis=0)).ravel() >= GB_MIN_COUNT)
    dense = {name: np.asarray(x[:, keep].todense() if sp.issparse(x) else x[:, keep], dtype=np.float32)
             for name, x in {"train": x_train, **x_eval}.items()}
    y_train = np.asarray(y_train)
    scores, best = {}, None
    for i, setting in enumerate(settings):
        preds = {name: np.empty((len(x), y_train.shape[1])) for name, x in dense.items() if name != "train"}
        for j in range(y_train.shape[1]):
            if y_train[:, j].min() == y_train[:, j].max():
                for p in preds.values():
                    p[:, j] = y_train[:, j].mean()
                continue
            model = HistGradientBoostingClassifier(**setting, random_state=seed).fit(dense["train"], y_train[:, j])
            for name, p in preds.items():
                p[:, j] = model.predict_proba(dense[name])[:, 1]
        scores[i] = macro_auroc(y_val, preds["val"])
        if best is None or scores[i] > scores[best[0]]:
            best = (i, preds)
    chosen, probs = best
    return probs, {"setting": settings[chosen], "val_macro_auroc": {json_key(s): scores[i] for i, s in enumerate(settings)},
                   "model": "sklearn HistGradientBoostingClassifier per phenotype",
                   "features": f"multi-hot {', '.join(FEATURE_COLUMNS)} of visit i seen >= {GB_MIN_COUNT} times "
                               f"in training ({len(keep)})"}


def json_key(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def baseline_probabilities(train: dict, val: dict, test: dict, seed: int = 0, c_grid=C_GRID
                           ) -> dict[str, tuple[dict[str, np.ndarray], dict]]:
    """{baseline: ({"val": probs, "test": probs}, details)}. Each split is a dict of columns:
    FEATURE_COLUMNS, "phenotypes_current" and "labels" (N x 25 arrays)."""
    y_train = np.asarray(train["labels"], dtype=np.int8)
    y_val = np.asarray(val["labels"], dtype=np.int8)
    splits = {"val": val, "test": test}
    k = y_train.shape[1]
    prev = y_train.mean(axis=0) if len(y_train) else np.zeros(k)
    out = {
        "all_negative": ({s: np.zeros((len(d["labels"]), k)) for s, d in splits.items()},
                         {"score": "0 for every phenotype"}),
        "prevalence": ({s: np.tile(prev, (len(d["labels"]), 1)) for s, d in splits.items()},
                       {"score": "training prevalence of each phenotype"}),
        "copy_forward": ({s: np.asarray(d["phenotypes_current"], dtype=np.float64) for s, d in splits.items()},
                         {"score": "the phenotypes of visit i (0/1)"}),
    }
    encoder = MultiHot().fit(train)
    x = {name: encoder.transform(d) for name, d in (("train", train), ("val", val), ("test", test))}
    probs, details = logistic_regression(x["train"], y_train, {"val": x["val"], "test": x["test"]}, y_val,
                                         c_grid, seed)
    details["n_features"] = len(encoder.index)
    log.info("logistic_regression: C=%g (validation macro AUROC %s), %d features", details["C"],
             details["val_macro_auroc"], len(encoder.index))
    out["logistic_regression"] = (probs, details)

    # the same items and the phenotypes present at visit i (what the EADF clauses name)
    xp = {name: sp.hstack([m, sp.csr_matrix(np.asarray(d["phenotypes_current"], dtype=np.float64))]).tocsr()
          for (name, m), d in zip(x.items(), (train, val, test))}
    probs, details = logistic_regression(xp["train"], y_train, {"val": xp["val"], "test": xp["test"]}, y_val,
                                         c_grid, seed)
    details.update(n_features=xp["train"].shape[1], features=details["features"] + " + the 25 phenotypes present")
    out["logistic_regression_phenotypes"] = (probs, details)

    start = time.time()
    probs, details = gradient_boosting(x["train"], y_train, {"val": x["val"], "test": x["test"]}, y_val, seed=seed)
    details["seconds"] = round(time.time() - start, 1)
    log.info("gradient_boosting: %s (validation macro AUROC %s) in %.0f s", json_key(details["setting"]),
             details["val_macro_auroc"], details["seconds"])
    out["gradient_boosting"] = (probs, details)
    return out
