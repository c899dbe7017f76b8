"""Finished study runs written by hand (predictions, soft labels, manifests, metrics) for the
study's summary tests and the README's study command."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import PREDICTIONS, SOFT_LABELS, RunLayout


CODE = {"commit": "a" * 40, "dirty": False, "ckd_ehr_sha256": "1" * 64}


def seed_run(rng, layout: RunLayout, latent, y, subjects, rows, seed, code=CODE):
    ids = [f"s{i:04d}" for i in range(len(y))]
    for row, noise in rows.items():
        p = 1 / (1 + np.exp(-(latent + noise * rng.normal(size=latent.shape))))
        storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64),
                                        "labels": y.tolist(), "probs": p.astype(np.float32).tolist()},
                                       schema=PREDICTIONS), layout.predictions(row))
    logits = latent + rng.normal(size=latent.shape)
    storage.write_parquet(pa.table({"sample_id": ids, "logits": logits.astype(np.float32).tolist(),
                                    "probs": (1 / (1 + np.exp(-logits))).astype(np.float32).tolist(),
                                    "teacher_id": ["t"] * len(ids)}, schema=SOFT_LABELS), layout.soft_labels("test"))
    storage.write_parquet(pa.table({"sample_id": ids, "subject_id": subjects.astype(np.int64), "labels": y.tolist()}),
                          layout.augmented("test"))
    storage.write_json(layout.manifest, {"stages": {   # prepare/eadf: the base run's, not the seed's
        "prepare": {"seconds": 5.0, "code": code}, "eadf": {"seconds": 20.0, "code": code},
        "teacher": {"seconds": 100.0 + seed, "code": code}, "student": {"seconds": 200.0, "code": code}}})
    models = {r: {"kept_step": 12 * seed, "modes": {"fixed": {"metrics": {"accuracy": 0.8 + 0.02 * seed, "macro_f1": 0.1}},
                                                   "tuned": {"metrics": {"macro_f1": 0.4}}}} for r in rows}
    storage.write_json(layout.metrics, {"baselines": {"copy_forward": {
        "role": "floor", "modes": {"fixed": {"metrics": {"macro_auroc": 0.6}, "intervals": {"macro_auroc": [0.55, 0.65]}}}}},
        "models": models})


def cohort(rng, patients=80, k=25):
    per = rng.integers(1, 4, patients)
    subjects = np.repeat(np.arange(patients), per)
    latent = rng.normal(size=(len(subjects), k)) * 1.5 + rng.normal(size=(patients, 1))[subjects]
    y = (latent + rng.normal(size=latent.shape) > 1.5).astype(np.int8)
    return latent, y, subjects


def write_two_cohort_study(tmp_path):
    """Finished runs: cohort synth_0 (seeds 0 and 1, a control row at seed 0 only) and cohort
    synth_5 (seed 0), with a study config naming them."""
    rng = np.random.default_rng(3)
    root = RunLayout(str(tmp_path / "study"))
    rows = {"hard_plain": 2.0, "ckd_ehr": 0.5}
    latent, y, subjects = cohort(rng)
    for seed in (0, 1):
        seed_run(rng, RunLayout(root.study_seed(seed)), latent, y, subjects,
                  {**rows, **({"hard_names": 1.0} if seed == 0 else {})}, seed)
    latent, y, subjects = cohort(rng, patients=90)
    second = RunLayout(root.study_cohort(5))
    seed_run(rng, RunLayout(second.study_seed(0)), latent, y, subjects, rows, 0)
    for base in (RunLayout(root.study_base), RunLayout(second.study_base)):
        storage.write_json(base.manifest, {"stages": {"prepare": {"seconds": 5.0, "code": CODE},
                                                      "eadf": {"seconds": 20.0, "code": CODE}}})
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text(f"run_dir: {root.root}\nstudy:\n  seeds: [0, 1]\n  more_cohorts: [5]\n"
                        "  rows: [hard_plain, ckd_ehr]\n  first_seed_rows: [hard_names]\n"
                        "  contrasts: [[ckd_ehr, hard_plain], [teacher, hard_plain], [hard_names, hard_plain]]\n"
                        "  bootstrap: 200\n")
    return root, cfg_file
