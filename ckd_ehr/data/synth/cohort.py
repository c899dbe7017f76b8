"""`ckd-ehr synth`: a synthetic cohort in MIMIC-III table format, with a known ground truth.

`write_cohort(out_dir, cfg)` simulates a cohort (`synth_model`), writes the seven tables
ADMISSIONS, PATIENTS, DIAGNOSES_ICD, PROCEDURES_ICD, PRESCRIPTIONS, D_ICD_DIAGNOSES and
D_ICD_PROCEDURES (`synth_tables`) and, last, `ground_truth.json`:

    planted     {phenotype name: [drug, ...]}  drugs that truly lower next-visit presence
    ward_drugs  [drug, ...]                     given to most patients, no effect
    indicated   {phenotype name: [drug, ...]}  given for the phenotype, no effect
    params      every SynthConfig field and generator constant
    counts      {table: rows}
    planted_effects  [{phenotype, drug, rate_given, rate_not_given, n_given, n_not_given}]: per
                planted drug, the true rate at which its phenotype (recorded at visit i) is gone
                at visit i+1 among this cohort's pairs given the drug and not, from the
                generator's noise-free dynamics (mean of the latent oracle, synth_oracle)
    decoy_drugs {phenotype name: [drug, ...]}  no-effect drugs given preferentially in flares
                (`confounding` > 0; empty lists otherwise)
    ceilings    macro AUROC of the latent oracle (with / without drug information) on this
                cohort's pairs and of the observable ceiling when computed for these knobs

Beside the tables: latent_oracle.parquet (synth_oracle.ORACLE_SCHEMA), the oracle's
probabilities for every consecutive admission pair, keyed by (hadm_id, next_hadm_id).

Same seed, same bytes. The ground truth is written after the tables, so its presence
marks a complete cohort.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ckd_ehr.contracts import GROUND_TRUTH
from ckd_ehr.config import SynthConfig
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.storage import exists, join, makedirs, resolve, write_json, write_parquet
from ckd_ehr.data.synth.mimic4 import write_mimic4
from ckd_ehr.data.synth.model import constants_dict, simulate
from ckd_ehr.data.synth.oracle import ORACLE_FILE, next_visit_probabilities, oracle_table, planted_effects
from ckd_ehr.data.synth.tables import (TABLES, admissions_table, d_icd_diagnoses_table, d_icd_procedures_table,
                           diagnoses_table, file_name, patients_table, prescriptions_table,
                           procedures_table, write_table)
from ckd_ehr.metrics import auroc_per_label, macro_label_set

log = logging.getLogger("ckd_ehr.data.synth.cohort")


def write_cohort(out_dir: str, cfg: SynthConfig) -> dict[str, int]:
    """Generate the cohort described by `cfg` into `out_dir`; return rows per table."""
    if cfg.form == "mimic4":  # a layer over this generator: its MIMIC-III form, converted
        return write_mimic4(out_dir, cfg, write_cohort)
    start = time.perf_counter()
    makedirs(out_dir)
    _remove_other_form(out_dir, cfg.form)
    log.info("synth: simulating %d patients (mean %.2f admissions, seed %d)",
             cfg.patients, cfg.mean_admissions, cfg.seed)
    cohort = simulate(cfg)
    log.info("synth: simulated %d admissions in %.1fs", len(cohort.hadm_id), time.perf_counter() - start)
    builders = {
        "PATIENTS": lambda: patients_table(cohort),
        "ADMISSIONS": lambda: admissions_table(cohort, cfg.seed),
        "DIAGNOSES_ICD": lambda: diagnoses_table(cohort),
        "PROCEDURES_ICD": lambda: procedures_table(cohort),
        "PRESCRIPTIONS": lambda: prescriptions_table(cohort, cfg.seed),
        "D_ICD_DIAGNOSES": lambda: d_icd_diagnoses_table(cohort),
        "D_ICD_PROCEDURES": lambda: d_icd_procedures_table(cohort),
    }
    counts = {}
    for table in TABLES:
        counts[table] = write_table(builders[table](), out_dir, table, cfg.form)
    pat = cohort.adm_patient
    first = np.flatnonzero(pat[:-1] == pat[1:])
    oracle = oracle_table(cohort, cfg, first, first + 1)
    write_parquet(oracle, join(out_dir, ORACLE_FILE))
    truth = ground_truth(cohort, cfg, counts)
    truth.update(oracle_truth(cohort, cfg, first, truth))
    write_json(join(out_dir, GROUND_TRUTH), truth)
    log.info("synth: wrote %s to %s in %.1fs", ", ".join(f"{t} {n}" for t, n in counts.items()),
             out_dir, time.perf_counter() - start)
    return counts


def ground_truth(cohort, cfg: SynthConfig, counts: dict[str, int]) -> dict:
    names = phenotype_names()
    drug = [d.name for d in cohort.drugs]
    return {
        "planted": {names[p]: [drug[i] for i in cohort.planted_ids[p]] for p in range(len(names))},
        "ward_drugs": [drug[i] for i in cohort.ward_ids],
        "indicated": {names[p]: [drug[i] for i in ids] for p, ids in enumerate(cohort.indicated_ids)},
        "decoy_drugs": {names[p]: [drug[i] for i in ids] for p, ids in enumerate(cohort.decoy_ids)},
        "params": {**cfg.model_dump(mode="json"), **constants_dict()},
        "files": {t: file_name(t, cfg.form) for t in TABLES},
        "counts": counts,
    }


def oracle_truth(cohort, cfg: SynthConfig, first: np.ndarray, truth: dict) -> dict:
    """planted_effects and the ceilings' macro AUROC (see the module docstring)."""
    # not at module level: scipy, loaded only when this runs
    from ckd_ehr.data.synth.ceiling import read_ceiling

    probs = next_visit_probabilities(cohort, cfg, first, drugs=True)
    labels = cohort.recorded_state[first + 1]
    keep = macro_label_set(labels, 5)

    def macro(p):
        return float(np.mean(auroc_per_label(labels[:, keep], p[:, keep]))) if keep.any() else None

    ceilings = {
        "latent_oracle": {
            "macro_auroc_with_drugs": macro(probs),
            "macro_auroc_without_drugs": macro(next_visit_probabilities(cohort, cfg, first, drugs=False)),
            "on": f"all {len(first)} consecutive admission pairs of this cohort, phenotypes with >= 5 positives",
        },
    }
    stored = read_ceiling(truth["params"])
    if stored is not None:
        ceilings["observable_ceiling"] = {k: stored[k] for k in ("model", "patients", "macro_auroc", "key")}
    return {
        "planted_effects": planted_effects(cohort, cfg, first, probs),
        "ceilings": ceilings,
    }


def _remove_other_form(out_dir: str, form: str) -> None:
    """A reader that accepts both forms must not find a stale cohort of the other form."""
    other = "full" if form == "demo" else "demo"
    for table in TABLES:
        path = join(out_dir, file_name(table, other))
        if exists(path):
            fs, inner = resolve(path)
            fs.delete_file(inner)
            log.info("synth: removed stale %s", file_name(table, other))
