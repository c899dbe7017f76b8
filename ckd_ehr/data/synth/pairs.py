"""Visit pairs straight from a simulated `Cohort`, without writing or reading tables.

What `prepare` would build from the written tables (consecutive admissions of a patient, the
split by patient, labels = the recorded phenotypes of visit i+1, multi-hot diagnosis codes,
procedures and drugs of visit i), as arrays: fast enough for the 200,000-patient ceiling
benchmark and for checking the generator's targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ckd_ehr.config.data import SplitConfig
from ckd_ehr.data.samples import assign_splits
from ckd_ehr.data.synth.model import Cohort


@dataclass
class CohortPairs:
    first: np.ndarray        # admission index of visit i
    second: np.ndarray       # admission index of visit i+1
    split: np.ndarray        # "train" / "val" / "test" per pair (by patient)
    labels: np.ndarray       # (P, 25) int8: recorded phenotypes of visit i+1


def cohort_pairs(cohort: Cohort, split_cfg: SplitConfig | None = None) -> CohortPairs:
    pat = cohort.adm_patient
    first = np.flatnonzero(pat[:-1] == pat[1:])
    second = first + 1
    subjects = cohort.subject_id[pat[first]]
    split = np.asarray(assign_splits(subjects.tolist(), split_cfg or SplitConfig()))
    return CohortPairs(first, second, split, cohort.recorded_state[second].astype(np.int8))


def admission_features(cohort: Cohort, drugs: bool = True) -> sp.csr_matrix:
    """(A, features) multi-hot: diagnosis codes, procedures and (optionally) drugs given."""
    a = len(cohort.hadm_id)
    n_dx = len(cohort.vocab.codes)
    n_px = int(cohort.px_code.max()) + 1 if len(cohort.px_code) else 0
    rows = [cohort.dx_adm, cohort.px_adm]
    cols = [cohort.dx_code, n_dx + cohort.px_code]
    width = n_dx + n_px
    if drugs:
        rows.append(cohort.rx_pair_adm)
        cols.append(width + cohort.rx_pair_drug)
        width += len(cohort.drugs)
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(a, width))
    m.data[:] = 1.0  # duplicates summed by the constructor: multi-hot, not counts
    return m
