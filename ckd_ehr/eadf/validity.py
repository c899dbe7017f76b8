"""How well the listed EADF drugs match a synthetic cohort's ground truth.

`listing_validity(table, truth, cfg)` on an EFFICACY table (efficacy ranking):
- precision: listed and planted / listed (a listed drug is one with a rank);
- recall: listed planted pairs / planted pairs (overall);
- powered recall: the same among the planted pairs that the test can find at this cohort's
  size: "enough support" (both arms >= min_support pairs) and, from the TRUE rates of the
  pair, power >= POWER_TARGET (the power rule below);
- decoys listed (ground_truth `decoy_drugs`, no effect but given in episodes likelier to
  resolve), and ward drugs listed.

The power rule, fixed before any figure was looked at: one-sided score test of two
proportions (eadf_inference.power_one_sided) at the true rates (rate_given, rate_not_given),
on the pair's effective arm sizes in this cohort (n / design effect), at the level
alpha* = fdr * (planted pairs tested) / (pairs tested): Benjamini-Hochberg's threshold when
the discoveries are exactly the tested planted pairs. Powered when power >= 0.8.

The true rates come from ground_truth.json `planted_effects` when present; else, for the
generator of this repository before it recorded them, from `true_effects_by_simulation`:
the generator's own dynamics (synth_model.simulate with the cohort's recorded parameters,
a separate seed and SIMULATION_PATIENTS patients), rates over every consecutive-admission
pair of the simulated cohort with the phenotype recorded at visit i.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

from ckd_ehr.config import EADFConfig
from ckd_ehr.eadf.inference import power_one_sided
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.config import SynthConfig
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.data.synth.model import simulate

POWER_TARGET = 0.8
SIMULATION_PATIENTS = 60_000
SIMULATION_SEED = 987_654_321  # never a benchmark seed


def _pairs(mapping: Mapping[str, list[str]] | None) -> set[tuple[str, str]]:
    return {(p, d) for p, drugs in (mapping or {}).items() for d in drugs}


def true_effects_from_truth(truth: dict) -> dict[tuple[str, str], tuple[float, float]] | None:
    """(phenotype, drug) -> (rate_given, rate_not_given) from ground_truth.json `planted_effects`."""
    effects = truth.get("planted_effects")
    if effects is None:
        return None
    return {(e["phenotype"], e["drug"]): (float(e["rate_given"]), float(e["rate_not_given"])) for e in effects}


def true_effects_by_simulation(params: dict, patients: int = SIMULATION_PATIENTS,
                               seed: int = SIMULATION_SEED) -> dict[tuple[str, str], tuple[float, float]]:
    """Fallback for a ground truth without `planted_effects`: the rates of every planted pair
    on a large cohort simulated by the same generator with the same parameters (another seed).

    Pairs are consecutive admissions of one patient; "resolved" is recorded at visit i and not
    at visit i+1, as the samples count it; "given" is the planted drug prescribed at visit i.
    Monte Carlo error at 60,000 patients: about 0.01 on each rate.
    """

    fields = {k: v for k, v in params.items() if k in SynthConfig.model_fields}
    cohort = simulate(SynthConfig(**{**fields, "patients": patients, "seed": seed}))
    names = phenotype_names()
    adm = cohort.adm_patient
    i = np.flatnonzero(adm[:-1] == adm[1:])  # visit i has a next visit of the same patient
    rec = cohort.recorded_state
    present, resolved = rec[i], rec[i] & ~rec[i + 1]
    out = {}
    for p in range(len(names)):
        for d in cohort.planted_ids[p]:
            given_adm = np.zeros(len(rec), dtype=bool)
            given_adm[cohort.rx_pair_adm[cohort.rx_pair_drug == d]] = True
            g = given_adm[i] & present[:, p]
            ng = present[:, p] & ~given_adm[i]
            out[(names[p], cohort.drugs[d].name)] = (float(resolved[g, p].mean()) if g.any() else float("nan"),
                                                     float(resolved[ng, p].mean()) if ng.any() else float("nan"))
    return out


def listing_validity(table: pa.Table, truth: dict, cfg: EADFConfig,
                     true_effects: Mapping[tuple[str, str], tuple[float, float]] | None = None) -> dict:
    """Precision, recall, powered recall and decoys of the listed drugs of an EFFICACY table."""
    planted = _pairs(truth.get("planted"))
    decoys = _pairs(truth.get("decoy_drugs"))
    ward = set(truth.get("ward_drugs") or [])
    if true_effects is None:
        true_effects = true_effects_from_truth(truth)
    rows = table.select(["phenotype", "drug", "rank", "n_given", "n_not_given", "p_value",
                         "design_effect_given", "design_effect_not_given", "effect"]).to_pylist()
    listed = {(r["phenotype"], r["drug"]) for r in rows if r["rank"] is not None}
    tested = [r for r in rows if r["p_value"] is not None]
    planted_tested = [r for r in tested if (r["phenotype"], r["drug"]) in planted]
    out = {
        "listed": len(listed),
        "listed_per_phenotype": len(listed) / NUM_PHENOTYPES,
        "listed_planted": len(listed & planted),
        "precision": len(listed & planted) / len(listed) if listed else None,
        "planted_pairs": len(planted),
        "recall": len(listed & planted) / len(planted) if planted else None,
        "tested_pairs": len(tested),
        "planted_tested": len(planted_tested),
        "decoys_listed": len(listed & decoys) if decoys else None,
        "decoy_mean_effect": (float(np.mean([r["effect"] for r in rows if (r["phenotype"], r["drug"]) in decoys
                                             and r["effect"] is not None] or [np.nan])) if decoys else None),
        "ward_listed": sum(d in ward for _, d in listed),
        "powered_pairs": None, "recall_powered": None, "power_source": None,
    }
    if true_effects is None or not tested:
        return out
    alpha = cfg.fdr * max(len(planted_tested), 1) / len(tested)
    powered = []
    for r in planted_tested:
        rates = true_effects.get((r["phenotype"], r["drug"]))
        if rates is None or not all(np.isfinite(rates)):
            continue
        power = power_one_sided(rates[0], r["n_given"] / r["design_effect_given"], rates[1],
                                r["n_not_given"] / r["design_effect_not_given"], alpha)
        if float(power) >= POWER_TARGET:
            powered.append((r["phenotype"], r["drug"]))
    out.update({"alpha_star": alpha, "powered_pairs": len(powered),
                "recall_powered": len(set(powered) & listed) / len(powered) if powered else None,
                "power_source": "planted_effects" if truth.get("planted_effects") is not None else "simulation"})
    return out
