"""A small learnable sample set for benchmarks (and tests) when no EADF samples exist yet.

Each sample names a few diagnoses; the next-visit label of a phenotype is 1 exactly when its
marker word appears in the text (with a little label noise), so a model that reads the text
can learn it. Written in the AUGMENTED_SAMPLES columns the teacher reads.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names

MARKERS = ["sepsis", "pneumonia", "fracture", "asthma", "anemia", "stroke", "ulcer", "gout"]
FILLER = ["headache", "nausea", "rash", "fatigue", "dizziness", "insomnia", "backache", "cold"]


def toy_samples(n: int, seed: int = 0, n_labels: int = 4, noise: float = 0.05) -> tuple[list[str], np.ndarray]:
    """(texts, labels [n, 25]): label j < n_labels follows the word MARKERS[j]."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.zeros((n, NUM_PHENOTYPES), dtype=np.int8)
    for i in range(n):
        present = [j for j in range(n_labels) if rng.random() < 0.4]
        words = [MARKERS[j] for j in present] + list(rng.choice(FILLER, size=rng.integers(1, 4), replace=False))
        rng.shuffle(words)
        texts.append(f"The patient-acquired disease is {', '.join(words)}. "
                     f"The patient had used the following medication: {rng.choice(['aspirin', 'heparin', 'None'])}.")
        for j in present:
            labels[i, j] = 1
        flip = rng.random(n_labels) < noise
        labels[i, :n_labels] ^= flip.astype(np.int8)
    return texts, labels


def write_toy_samples(run_dir: str, n_train: int = 64, n_val: int = 32, seed: int = 0, **kw) -> RunLayout:
    """Write RUN/eadf/samples/{train,val}.parquet with sample_id, split, text_eadf, text_plain, labels."""
    layout = RunLayout(run_dir)
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        texts, labels = toy_samples(n, s, **kw)
        table = pa.table({
            "sample_id": [f"toy-{split}-{i}" for i in range(n)],
            "split": [split] * n,
            "text_plain": texts,
            "text_eadf": texts,
            "labels": pa.array(labels.tolist(), type=pa.list_(pa.int8(), NUM_PHENOTYPES)),
        })
        storage.write_parquet(table, layout.augmented(split))
    return layout


__all__ = ["toy_samples", "write_toy_samples", "MARKERS", "phenotype_names"]
