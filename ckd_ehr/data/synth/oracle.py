"""The latent oracle of the synthetic cohort: the generator's exact probability of each
next-visit phenotype given the latent state of visit i, in closed form from the dynamics of
`synth_model` (no sampling).

For phenotype j of cluster set C(j), given visit i's true state s_j, planted drugs given n_j,
flare f_j and the patient's propensities:

    onset_j  = min(0.95, onset_scale_j * prevalence_j * propensity_cluster(j))
    event_j  = 1 - prod over clusters c holding j of (1 - min(1, rate_c * event_scale * propensity_c) * member_cj)
    keep_j   = s_j * persistence_j * planted_effect^n_j * (1 - confounding if f_j)
    true_j   = 1 - (1 - onset_j)(1 - event_j)(1 - keep_j)
    label_j  = true_j (1 - label_noise) + (1 - true_j) label_noise

"Without drug information" replaces planted_effect^n_j by its expectation over the drugs a
present phenotype gets: (1 - g + g * planted_effect)^k, g = P(a planted drug is given | present);
the flare stays known (it is latent state, not drug information).

Written by `synth` beside the tables as RUN/raw/latent_oracle.parquet, keyed by the admission
ids of the pair (hadm_id, next_hadm_id); `evaluate` scores it as the `latent_oracle` row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.config import SynthConfig
from ckd_ehr.contracts import VECTOR25, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names, phenotypes
from ckd_ehr.data.synth.model import (CLUSTER_EVENTS, CLUSTER_OF, CLUSTERS, CONSTANTS, PREVALENCE, Cohort, GeneratorConstants,
                          persistence_per_phenotype)

ORACLE_FILE = "latent_oracle.parquet"
ORACLE_SCHEMA = pa.schema([
    ("hadm_id", pa.int64()),
    ("next_hadm_id", pa.int64()),
    ("probs", VECTOR25),            # given the full latent state of visit i, drugs included
    ("probs_no_drugs", VECTOR25),   # the same, averaged over the planted drugs a visit gets
])


def _event_probability(propensity: np.ndarray, c: GeneratorConstants) -> np.ndarray:
    """(P, 25) chance that some cluster event adds each phenotype at a visit after the first."""
    none = np.ones((len(propensity), NUM_PHENOTYPES))
    for ci, name in enumerate(CLUSTERS):
        rate, members = CLUSTER_EVENTS[name]
        fired = np.minimum(1.0, rate * c.event_scale * propensity[:, ci])
        for j, q in members.items():
            none[:, j] *= 1.0 - fired * q
    return 1.0 - none


def next_visit_probabilities(cohort: Cohort, cfg: SynthConfig, first: np.ndarray, drugs: bool = True,
                             c: GeneratorConstants = CONSTANTS) -> np.ndarray:
    """(P, 25) P(phenotype recorded at the admission after `first`) given the latent state of
    `first`, from the generator's dynamics (see the module docstring)."""
    kinds = np.array([p.kind == "chronic" for p in phenotypes()])
    prop = cohort.propensity[cohort.adm_patient[first]]
    onset_scale = np.where(kinds, c.chronic_onset_scale, c.acute_onset_scale)
    onset = np.minimum(0.95, onset_scale * PREVALENCE * prop[:, CLUSTER_OF])
    event = _event_probability(prop, c)
    persistence = persistence_per_phenotype(cfg, c)
    state = cohort.true_state[first]
    flare = np.where(cohort.flare[first], 1.0 - cfg.confounding, 1.0)
    if drugs:
        effect = cfg.planted_effect ** cohort.planted_given[first].sum(axis=2)
    else:
        g = min(1.0, cfg.planted_rate + c.off_indication_rate)
        effect = np.full(state.shape, (1.0 - g + g * cfg.planted_effect) ** cfg.drugs_per_phenotype)
    keep = state * persistence * effect * flare
    true = 1.0 - (1.0 - onset) * (1.0 - event) * (1.0 - keep)
    return true * (1.0 - cfg.label_noise) + (1.0 - true) * cfg.label_noise


def oracle_table(cohort: Cohort, cfg: SynthConfig, first: np.ndarray, second: np.ndarray) -> pa.Table:
    probs = next_visit_probabilities(cohort, cfg, first, drugs=True).astype(np.float32)
    no_drugs = next_visit_probabilities(cohort, cfg, first, drugs=False).astype(np.float32)
    flat = pa.FixedSizeListArray.from_arrays
    return pa.table({
        "hadm_id": pa.array(cohort.hadm_id[first], pa.int64()),
        "next_hadm_id": pa.array(cohort.hadm_id[second], pa.int64()),
        "probs": flat(pa.array(probs.ravel(), pa.float32()), NUM_PHENOTYPES).cast(VECTOR25),
        "probs_no_drugs": flat(pa.array(no_drugs.ravel(), pa.float32()), NUM_PHENOTYPES).cast(VECTOR25),
    }, schema=ORACLE_SCHEMA)


def planted_effects(cohort: Cohort, cfg: SynthConfig, first: np.ndarray, probs: np.ndarray) -> list[dict]:
    """For every planted (phenotype, drug): the rate at which the phenotype is gone at the next
    visit among the cohort's pairs with the phenotype recorded at visit i, given the drug and
    not. Computed from the generator's noise-free dynamics: the mean over those pairs of the
    latent oracle's P(phenotype not recorded at visit i+1) (no outcome sampling noise; the
    pairs themselves are this cohort's, so the population is its visit-pair distribution)."""
    names = phenotype_names()
    drug_names = [d.name for d in cohort.drugs]
    recorded = cohort.recorded_state[first]
    given_any = np.zeros((len(first), len(cohort.drugs)), dtype=bool)
    # (pair, drug) given at visit i
    pos = np.searchsorted(first, cohort.rx_pair_adm)
    hit = (pos < len(first)) & (first[np.minimum(pos, len(first) - 1)] == cohort.rx_pair_adm)
    given_any[pos[hit], cohort.rx_pair_drug[hit]] = True
    out = []
    for j in range(NUM_PHENOTYPES):
        present = recorded[:, j]
        gone = 1.0 - probs[:, j]
        for d in cohort.planted_ids[j]:
            g, ng = present & given_any[:, d], present & ~given_any[:, d]
            out.append({"phenotype": names[j], "drug": drug_names[d],
                        "rate_given": float(gone[g].mean()) if g.any() else None,
                        "rate_not_given": float(gone[ng].mean()) if ng.any() else None,
                        "n_given": int(g.sum()), "n_not_given": int(ng.sum())})
    return out


def oracle_probabilities(layout: RunLayout, samples) -> tuple | None:
    """(samples matched to the oracle, probs (M, 25)) for a split's samples (a DataFrame with
    hadm_id and next_hadm_id), or None when the run has no latent oracle (not synthetic)."""
    path = storage.join(layout.raw_dir, ORACLE_FILE)
    if samples is None or not storage.exists(path):
        return None
    oracle = storage.read_parquet(path, columns=["hadm_id", "next_hadm_id", "probs"]).to_pandas()
    oracle = oracle.rename(columns={"probs": "oracle_probs"})
    joined = samples.merge(oracle, on=["hadm_id", "next_hadm_id"], how="inner")
    if not len(joined):
        return None
    joined = joined.sort_values("sample_id", kind="stable").reset_index(drop=True)
    return joined, np.asarray(joined["oracle_probs"].tolist(), dtype=np.float64)
