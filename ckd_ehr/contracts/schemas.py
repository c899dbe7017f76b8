"""Every parquet schema passed between stages, the conversion of their vector columns, and the
check that names the file, the column and the type when a table does not match."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ckd_ehr.phenotypes import NUM_PHENOTYPES

MULTI_HOT = pa.list_(pa.int8(), NUM_PHENOTYPES)
VECTOR25 = pa.list_(pa.float32(), NUM_PHENOTYPES)
STRINGS = pa.list_(pa.string())

VISITS = pa.schema([
    ("subject_id", pa.int64()),
    ("hadm_id", pa.int64()),
    ("admittime", pa.timestamp("s")),
    ("dischtime", pa.timestamp("s")),
    ("gender", pa.string()),            # 'M' / 'F' / null
    ("age", pa.float32()),              # years at admission; null where unknown; >89 capped at 90
    ("diagnosis_codes", STRINGS),       # in seq_num order; ICD-9-CM normalised (no dots), ICD-10-CM (MIMIC-IV) dotted: I50.23
    ("diagnosis_titles", STRINGS),      # long_title per code (else short_title, else the code)
    ("diagnosis_short_titles", STRINGS),  # short_title (else long_title, else the code)
    ("procedure_codes", STRINGS),       # ICD-9-CM procedures (no dots) or ICD-10-PCS (7 characters)
    ("procedure_titles", STRINGS),      # short_title (the release uses short titles), else the code
    ("drugs", STRINGS),                 # PRESCRIPTIONS.drug, deduplicated, first-given order
    ("phenotypes", MULTI_HOT),          # the 25 phenotypes present in this admission
])

SAMPLES = pa.schema([
    ("sample_id", pa.string()),         # f"{subject_id}-{hadm_id}-{next_hadm_id}": stable
    ("subject_id", pa.int64()),
    ("hadm_id", pa.int64()),            # visit i
    ("next_hadm_id", pa.int64()),       # visit i+1
    ("split", pa.string()),             # train / val / test
    ("admittime", pa.timestamp("s")),
    ("diagnosis_codes", STRINGS),
    ("diagnosis_titles", STRINGS),
    ("diagnosis_short_titles", STRINGS),
    ("procedure_codes", STRINGS),       # ICD-9-CM procedures (no dots) or ICD-10-PCS (7 characters)
    ("procedure_titles", STRINGS),
    ("drugs", STRINGS),
    ("phenotypes_current", MULTI_HOT),  # phenotypes of visit i (EADF reads these)
    ("labels", MULTI_HOT),              # phenotypes of visit i+1: the target
    ("text_plain", pa.string()),        # rendered input of visit i, no efficacy clauses
])

AUGMENTED_SAMPLES = SAMPLES.append(pa.field("text_eadf", pa.string()))
CONTROL_TEXTS = ("text_names", "text_random")
"""Extra AUGMENTED_SAMPLES columns when `eadf.control_texts: true` (the study's controls, see
text.control_efficacy): clauses naming the present phenotypes without drugs, and clauses with as
many drugs drawn at random. Readers keep them when present (student.data.read_split)."""
AUGMENTED_WITH_CONTROLS = AUGMENTED_SAMPLES.append(pa.field("text_names", pa.string())).append(
    pa.field("text_random", pa.string()))

EFFICACY = pa.schema([
    ("phenotype_index", pa.int32()),
    ("phenotype", pa.string()),
    ("drug", pa.string()),
    ("n_given", pa.int64()),            # pairs with the phenotype at visit i that got the drug
    ("resolved_given", pa.int64()),     # ... of which the phenotype is gone at visit i+1
    ("n_not_given", pa.int64()),
    ("resolved_not_given", pa.int64()),
    ("rate_given", pa.float64()),
    ("rate_not_given", pa.float64()),
    ("effect", pa.float64()),           # rate_given - rate_not_given
    ("lower", pa.float64()),            # Newcombe interval of the effect
    ("upper", pa.float64()),
    ("risk_ratio", pa.float64()),
    ("score", pa.float64()),            # what the chosen ranking sorts by
    ("rank", pa.int32()),               # 1 = best within the phenotype; null = not eligible
    ("ranking", pa.string()),           # efficacy / frequency / risk_ratio
    # Inference (eadf_inference): effect/lower/upper above are the crude difference with
    # Newcombe's interval (adjust: none) or the Mantel-Haenszel difference with Sato's interval
    # (adjust: severity), both on effective counts (counts / design effect) when clustered.
    ("p_value", pa.float64()),          # one-sided CMH score test; null if below min_support
    ("q_value", pa.float64()),          # Benjamini-Hochberg over all tested pairs of the table
    ("design_effect_given", pa.float64()),      # per-patient clustering of each arm (1 = none)
    ("design_effect_not_given", pa.float64()),
    ("adjust", pa.string()),            # none / severity
])

SOFT_LABELS = pa.schema([
    ("sample_id", pa.string()),
    ("logits", VECTOR25),
    ("probs", VECTOR25),
    ("teacher_id", pa.string()),
])

UNIT_TARGETS = pa.schema([
    ("sample_id", pa.string()),
    ("units", STRINGS),                 # the teacher's units in text order (ckd_ehr.text.text_units keys: d0, m1, p0, c7)
    ("unit_attention", pa.list_(pa.float16())),  # [25 x W] row-major: per phenotype, its label attention summed per
                                        # unit, renormalised over the units; null unless the teacher pools by label attention
    ("unit_relation", pa.list_(pa.float16())),   # [W x W] row-major: row-softmax of the scaled dot products of the
                                        # units' mean hidden states (soft_labels.relation_layer); null when relation_layer is null
])
"""Multi-granularity distillation targets (docs/method.md), float16: the student restricts each
to the units its own text shows and renormalises (ckd_ehr.modeling.units.restrict)."""

PREDICTIONS = pa.schema([
    ("sample_id", pa.string()),
    ("subject_id", pa.int64()),
    ("labels", MULTI_HOT),
    ("probs", VECTOR25),
])


def to_matrix(values, dtype=np.float64) -> np.ndarray:
    """An N x K array from a 2-D array, a list of lists, a pandas Series of lists or a pyarrow
    list column (the fixed-size MULTI_HOT / VECTOR25 columns take a zero-copy path): the one
    conversion of the contract's vector columns for every stage."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        return values.astype(dtype, copy=False)
    if isinstance(values, (pa.ChunkedArray, pa.Array)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if pa.types.is_fixed_size_list(arr.type) and arr.null_count == 0:
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(len(arr), arr.type.list_size).astype(dtype, copy=False)
        values = arr.to_pylist()
    elif hasattr(values, "tolist"):          # pandas Series of lists / arrays
        values = values.tolist()
    if not len(values):
        return np.zeros((0, NUM_PHENOTYPES), dtype=dtype)
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"expected an N x K matrix, got shape {arr.shape}")
    return arr


class ContractError(ValueError):
    """A stage's input or output does not match its contract."""


def check_schema(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Check that `table` has every column of `schema` with a castable type; return it cast.

    Extra columns are dropped. The error names the file (`where`), the column and the type.
    """
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ContractError(f"{where}: missing column(s) {', '.join(missing)}")
    cols = []
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ContractError(f"{where}: column '{f.name}' has type {col.type}, expected {f.type}") from exc
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)
