"""The observable ceiling of the synthetic cohort: the best predictor of the next visit from
what visit i SHOWS (codes, drugs, procedures), estimated by a flexible model fitted on many
independent synthetic patients from the same generator knobs.

The model ("logistic regression with interactions", one per phenotype, scikit-learn lbfgs):
visit i's items are summarised into counts that carry everything the generator makes
depend on them (codes of each phenotype, cluster marker codes, linked procedures, planted /
indicated / decoy drugs of each phenotype), and for phenotype j these are crossed with "j is
recorded at visit i" (drugs and procedures act through the present phenotype). Any fitted
model only bounds the true observable ceiling from below; the stored file's `form_check`
holds a HistGradientBoosting fit on the same features and pairs beside it (`ckd-ehr bench
ceiling --check-only`): a check that the functional form is not what limits the ceiling.

`ckd-ehr bench ceiling` fits it once per set of knobs on >= 200,000 patients (pairs taken
straight from the model, no tables written) and keeps the coefficients and held-out macro
AUROC (with and without drug features) in ckd_ehr/resources/ceilings/<key>.json, the key a
hash of every generator knob except patients, seed and form. `synth` records the figures in
ground_truth.json and `evaluate` applies the model to the run's test pairs, when a result for
the run's knobs exists.
"""
from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ckd_ehr import storage
from ckd_ehr.data.synth import catalog as cat
from ckd_ehr.config import SynthConfig, config_hash
from ckd_ehr.contracts import RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES, code_to_phenotype_table
from ckd_ehr.data.synth.model import CLUSTER_OF, CLUSTERS, constants_dict
from ckd_ehr.phenotypes import phenotype_names

log = logging.getLogger(__name__)

CEILING_DIR = "ceilings"
PER_ADMISSION_KNOBS = ("patients", "seed", "form")
MODEL = "logistic regression with interactions (per phenotype, lbfgs, C=1) on count summaries of visit i"


def knobs(params: dict) -> dict:
    """The generator knobs a ceiling depends on: ground_truth.json's params (or SynthConfig
    fields plus constants) minus cohort size, seed and file form."""
    return {k: v for k, v in params.items() if k not in PER_ADMISSION_KNOBS}


def knob_params(cfg: SynthConfig) -> dict:
    return json.loads(json.dumps({**cfg.model_dump(mode="json"), **constants_dict()}, default=str))


def ceiling_key(params: dict) -> str:
    return config_hash(knobs(params))


def _resource_dir() -> Path:
    return Path(str(resources.files("ckd_ehr"))) / "resources" / CEILING_DIR


def read_ceiling(params: dict) -> dict | None:
    path = _resource_dir() / f"{ceiling_key(params)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_ceiling(result: dict) -> str:
    path = _resource_dir() / f"{result['key']}.json"
    storage.write_json(str(path), result)
    return str(path)


# --- features ------------------------------------------------------------------------------

def summary_names(drugs: bool) -> list[str]:
    names = [f"dx_codes_{j}" for j in range(NUM_PHENOTYPES)] + [f"marker_{c}" for c in CLUSTERS]
    names += [f"px_linked_{j}" for j in range(NUM_PHENOTYPES)]
    if drugs:
        names += [f"rx_{role}_{j}" for role in ("planted", "indicated", "decoy") for j in range(NUM_PHENOTYPES)]
    return names


def projection(items: list[tuple[str, str]], roles: dict[str, dict[int, list[str]]], drugs: bool) -> sp.csr_matrix:
    """(items, summaries) 0/1 matrix: which summary count each named item adds to. items are
    ("dx", code), ("px", code) or ("rx", drug name); roles {"planted"|"indicated"|"decoy":
    {phenotype index: [drug names]}}."""
    names = summary_names(drugs)
    col = {n: i for i, n in enumerate(names)}
    table = code_to_phenotype_table()
    marker = {code: ci for ci, c in enumerate(CLUSTERS) for code in cat.CLUSTER_MARKERS[c]}
    linked = {}
    for j, codes in cat.PHENOTYPE_PROCEDURES.items():
        for code in codes:
            linked.setdefault(code, []).append(j)
    drug_role = {}
    for role, per in roles.items():
        for j, ds in per.items():
            for d in ds:
                drug_role.setdefault(d, []).append(f"rx_{role}_{j}")
    r, c = [], []
    for i, (kind, name) in enumerate(items):
        targets = []
        if kind == "dx":
            targets = [f"dx_codes_{j}" for j in table.get(name, ())]
            if name in marker:
                targets.append(f"marker_{CLUSTERS[marker[name]]}")
        elif kind == "px":
            targets = [f"px_linked_{j}" for j in linked.get(name, ())]
        elif kind == "rx" and drugs:
            targets = drug_role.get(name, [])
        for t in targets:
            r.append(i)
            c.append(col[t])
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(items), len(names)))


def design(summary: np.ndarray, j: int, drugs: bool) -> np.ndarray:
    """Features of phenotype j's model: every summary count, the squares of the marker counts,
    and j's own present-at-visit-i indicator crossed with j's drugs, procedures, extra codes
    and its cluster's markers."""
    k = NUM_PHENOTYPES
    present = (summary[:, j] > 0).astype(np.float64)
    marker = summary[:, k:k + len(CLUSTERS)]
    own_marker = marker[:, CLUSTER_OF[j]] if CLUSTER_OF[j] >= 0 else np.zeros(len(summary))
    cross = [present, (summary[:, j] > 1), summary[:, k + len(CLUSTERS) + j], own_marker, own_marker ** 2]
    if drugs:
        base = k + len(CLUSTERS) + k
        planted, indicated, decoy = (summary[:, base + r * k + j] for r in range(3))
        cross += [planted, planted ** 2, planted == 0, indicated, decoy]
    inter = np.column_stack([present * x for x in cross[1:]])
    return np.hstack([summary, marker ** 2, present[:, None], inter]).astype(np.float64)


def roles_from_truth(truth: dict) -> dict[str, dict[int, list[str]]]:

    index = {n: j for j, n in enumerate(phenotype_names())}
    return {role: {index[p]: list(ds) for p, ds in (truth.get(key) or {}).items()}
            for role, key in (("planted", "planted"), ("indicated", "indicated"), ("decoy", "decoy_drugs"))}


def samples_summary(df, truth: dict, drugs: bool) -> np.ndarray:
    """(N, summaries) for a DataFrame of samples (diagnosis_codes, procedure_codes, drugs)."""
    items: dict[tuple[str, str], int] = {}
    r, c = [], []
    for kind, column in (("dx", "diagnosis_codes"), ("px", "procedure_codes"), ("rx", "drugs")):
        for i, values in enumerate(df[column].tolist()):
            for v in set(values if values is not None else ()):
                r.append(i)
                c.append(items.setdefault((kind, v), len(items)))
    m = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(df), len(items)))
    return np.asarray((m @ projection(list(items), roles_from_truth(truth), drugs)).todense())


def cohort_items(cohort) -> list[tuple[str, str]]:
    """Names of the columns of synth_pairs.admission_features(cohort, drugs=True)."""
    n_px = int(cohort.px_code.max()) + 1 if len(cohort.px_code) else 0
    return ([("dx", code) for code in cohort.vocab.codes] + [("px", p[0]) for p in cat.PROCEDURES[:n_px]]
            + [("rx", d.name) for d in cohort.drugs])


# --- fit and apply ------------------------------------------------------------------------

def fit(summary: np.ndarray, labels: np.ndarray, drugs: bool) -> tuple[np.ndarray, np.ndarray]:
    """(coef (25, F), intercept (25,)) of phenotype-wise logistic regressions."""
    # not at module level: sklearn, loaded only when this runs
    from sklearn.linear_model import LogisticRegression

    coefs, intercepts = [], []
    for j in range(NUM_PHENOTYPES):
        x = design(summary, j, drugs)
        m = LogisticRegression(C=1.0, max_iter=2000).fit(x, labels[:, j])
        coefs.append(m.coef_[0])
        intercepts.append(m.intercept_[0])
    return np.array(coefs), np.array(intercepts)


def predict(summary: np.ndarray, coef, intercept, drugs: bool) -> np.ndarray:
    out = np.empty((len(summary), NUM_PHENOTYPES))
    for j in range(NUM_PHENOTYPES):
        z = design(summary, j, drugs) @ np.asarray(coef[j]) + intercept[j]
        out[:, j] = 1.0 / (1.0 + np.exp(-z))
    return out


def observable_ceiling_probabilities(layout: RunLayout, samples) -> tuple[np.ndarray | None, str | None]:
    """(probs for the samples, None) when the run is synthetic and a ceiling was computed for
    its knobs; else (None, why not)."""
    path = layout.ground_truth
    if not storage.exists(path):
        return None, None  # not a synthetic run: nothing to say
    truth = storage.read_json(path)
    result = read_ceiling(truth.get("params", {}))
    if result is None:
        return None, (f"no observable ceiling for this cohort's generator knobs (key "
                      f"{ceiling_key(truth.get('params', {}))}): run `ckd-ehr bench ceiling` with the same "
                      "data.synth settings to compute it")
    m = result["model_with_drugs"]
    return predict(samples_summary(samples, truth, True), m["coef"], m["intercept"], True), None
