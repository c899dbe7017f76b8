"""Soft labels from the synthetic generator's latent oracle, for the study's `oracle_distill`
control (does distillation help when the teacher is as good as it gets?).

The oracle's next-visit probabilities (RUN/raw/latent_oracle.parquet, keyed by the pair's
admissions) are written in the SOFT_LABELS schema, logits = logit(p) with p clipped to
[1e-6, 1 - 1e-6], teacher_id `latent_oracle`, to RUN/soft_labels/oracle/{split}.parquet, in the
order of the split's EADF samples: the student reads them exactly as it reads a teacher's.
No model runs: the student stage writes them when a variant asks and they are missing.
"""
from __future__ import annotations

import logging

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import SPLITS, ContractError, RunLayout
from ckd_ehr.data.synth.oracle import ORACLE_FILE, oracle_probabilities

log = logging.getLogger(__name__)

ORACLE_ID = "latent_oracle"


def write_oracle_soft_labels(layout: RunLayout, splits=("train", "val")) -> dict[str, int]:
    """Write the oracle's soft labels for `splits`; {split: rows}. ContractError when the run has
    no latent oracle (not synthetic) or an EADF sample has no oracle row."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.soft_labels.scoring import soft_label_table

    out = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        samples = storage.read_parquet(layout.augmented(split),
                                       columns=["sample_id", "hadm_id", "next_hadm_id"]).to_pandas()
        matched = oracle_probabilities(layout, samples)
        if matched is None:
            raise ContractError(f"{storage.join(layout.raw_dir, ORACLE_FILE)}: no latent oracle for this run "
                                f"(only a synthetic cohort has one), needed by the oracle_distill variant")
        joined, probs = matched
        if len(joined) != len(samples):
            raise ContractError(f"{storage.join(layout.raw_dir, ORACLE_FILE)}: {len(samples) - len(joined)} of "
                                f"{len(samples)} samples of {layout.augmented(split)} have no oracle row")
        order = {sid: i for i, sid in enumerate(joined["sample_id"])}
        p = np.clip(probs[[order[s] for s in samples["sample_id"]]], 1e-6, 1 - 1e-6)
        table = soft_label_table(samples["sample_id"].tolist(), np.log(p / (1 - p)), ORACLE_ID)
        storage.write_parquet(table, layout.soft_labels(split, "oracle"))
        out[split] = table.num_rows
        log.info("oracle soft labels %s: %d rows -> %s", split, table.num_rows, layout.soft_labels(split, "oracle"))
    return out
