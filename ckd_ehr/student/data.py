"""Student inputs: samples joined with soft labels, fitted to max_length by section budget,
tokenised once on the driver (batching by length happens in ckd_ehr.training).

Fitting: a sample whose tokens exceed max_length is re-rendered from its structured fields
with smaller diagnosis / drug / procedure budgets (the efficacy budget untouched) until it
fits, so the efficacy clauses, rendered last, are never the part that is cut. Only a sample
whose efficacy clauses alone exceed max_length loses whole clauses (counted apart). Both
arms are fitted alike: a sample's budgets are the ones its EADF text needs, and its plain
text is rendered with the same budgets, so (a) and (b) show the same patient items and differ
by the clauses only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from ckd_ehr.config import TextConfig
from ckd_ehr.contracts import (AUGMENTED_SAMPLES, CONTROL_TEXTS, EFFICACY, SOFT_LABELS, ContractError, check_schema,
                               student_variant, to_matrix)
from ckd_ehr.eadf.stats import top_drugs
from ckd_ehr.phenotypes import phenotype_names
from ckd_ehr.storage import read_parquet
from ckd_ehr.text import CONTROL_KINDS, control_efficacy, diagnosis_title_column, efficacy_for, render_input
from ckd_ehr.contracts import UNIT_TARGETS
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.text import text_units

PLAIN, EADF = "text_plain", "text_eadf"


def variant_spec(variant: str) -> tuple[str, bool]:
    """(text column, distills?) of a student variant (contracts.STUDENT_VARIANT_TABLE)."""
    spec = student_variant(variant)
    return spec.text_column, spec.distills


def load_efficacy(path: str, top_k: int) -> tuple[pa.Table, dict[str, list[str]]]:
    """The efficacy table and phenotype name -> its top_k drugs (rank <= top_k, best first)."""
    table = check_schema(read_parquet(path), EFFICACY, path)
    names = phenotype_names()
    return table, {names[p]: d for p, d in top_drugs(table, top_k).items()}


def read_split(samples_path: str, soft_path: str | None, max_rows: int | None = None,
               seed: int = 0) -> tuple[pa.Table, pa.Table | None]:
    """AUGMENTED_SAMPLES rows (optionally a seeded subset, training.subset_indices) and their
    SOFT_LABELS rows in the same order; a missing soft label is an error naming the file and
    how many are missing."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.training import subset_indices

    raw = read_parquet(samples_path)
    samples = check_schema(raw, AUGMENTED_SAMPLES, samples_path)
    for column in CONTROL_TEXTS:  # the study's control texts, when EADF rendered them
        if column in raw.column_names:
            samples = samples.append_column(column, raw.column(column).cast(pa.string()))
    if max_rows is not None and samples.num_rows > max_rows:
        samples = samples.take(pa.array(subset_indices(samples.num_rows, max_rows, seed)))
    if soft_path is None:
        return samples, None
    soft = check_schema(read_parquet(soft_path), SOFT_LABELS, soft_path)
    index = {sid: i for i, sid in enumerate(soft.column("sample_id").to_pylist())}
    ids = samples.column("sample_id").to_pylist()
    missing = [s for s in ids if s not in index]
    if missing:
        raise ContractError(
            f"{soft_path}: no soft label for {len(missing)} of {len(ids)} samples of {samples_path} "
            f"(e.g. {missing[0]}); re-run `ckd-ehr soft-labels`")
    return samples, soft.take(pa.array([index[s] for s in ids], type=pa.int64()))


@dataclass
class FitStats:
    samples: int = 0
    """Samples fitted."""
    refit: int = 0
    """Samples re-rendered with smaller budgets so that they fit."""
    efficacy_reduced: int = 0
    """... of which the efficacy clauses alone were too long: whole clauses were dropped
    (last phenotypes in label order first), after the other sections were emptied."""
    truncated: int = 0
    """Samples that still did not fit (cut at the tail by the tokenizer); should stay 0."""
    rounds: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        n = max(1, self.samples)
        return {"samples": self.samples, "refit": self.refit, "efficacy_reduced": self.efficacy_reduced,
                "truncated": self.truncated, "max_rounds": max(self.rounds, default=0),
                "share_all_items_kept": round(1 - self.refit / n, 4),
                "share_all_clauses_kept": round(1 - (self.efficacy_reduced + self.truncated) / n, 4)}


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    # verbose=False: measuring an over-long text is the point here (fit_texts then fits it), not
    # the "sequence length is longer than the specified maximum" mistake transformers warns of.
    return [len(x) for x in tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]


def fit_text(tokenizer, max_length: int, text: str, diagnoses, drugs, procedures,
             efficacy: Mapping[str, Sequence[str]] | None, text_cfg: TextConfig,
             shrink: float = 0.7, max_rounds: int = 60) -> tuple[str, int, str, TextConfig]:
    """(text within max_length tokens, rounds of shrinking, status, the budgets used).

    status: `ok` (fits, maybe after shrinking the diagnosis / drug / procedure budgets),
    `efficacy_reduced` (those sections emptied and still too long: the efficacy budget
    shrinks too, dropping whole clauses), `truncated` (nothing left to shrink).
    """
    if _n_tokens(tokenizer, [text])[0] <= max_length:
        return text, 0, "ok", text_cfg
    cfg, new = text_cfg, text
    for r in range(1, max_rounds + 1):
        sections = min(cfg.max_chars_diagnoses, cfg.max_chars_drugs, cfg.max_chars_procedures)
        if sections > 1:  # first the three list sections, all by the same factor
            cfg = cfg.model_copy(update={
                k: max(1, int(getattr(cfg, k) * shrink))
                for k in ("max_chars_diagnoses", "max_chars_drugs", "max_chars_procedures")})
        elif efficacy and cfg.max_chars_efficacy > 1:  # then, only if needed, the clauses
            cfg = cfg.model_copy(update={"max_chars_efficacy": max(1, int(cfg.max_chars_efficacy * shrink))})
        else:
            break
        new = render_input(diagnoses, drugs, procedures, efficacy=efficacy or None, cfg=cfg).text
        if _n_tokens(tokenizer, [new])[0] <= max_length:
            return new, r, ("ok" if cfg.max_chars_efficacy == text_cfg.max_chars_efficacy else "efficacy_reduced"), cfg
    return new, max_rounds, "truncated", cfg


def fit_texts(samples: pa.Table, tokenizer, max_length: int, column: str,
              efficacy: Mapping[str, Sequence[str]], text_cfg: TextConfig,
              shrink: float = 0.7) -> tuple[list[str], FitStats]:
    """Texts of `column` fitted to max_length (see module doc: the budgets come from the
    sample's EADF text, for either column) and how many needed it."""
    if column not in samples.column_names:
        raise ContractError(f"the samples have no column '{column}' (a control text of the study): "
                            f"run `ckd-ehr eadf` with eadf.control_texts: true")
    texts = samples.column(column).to_pylist()
    eadf_texts = texts if column == EADF else samples.column(EADF).to_pylist()
    lengths = _n_tokens(tokenizer, eadf_texts)
    stats = FitStats(samples=len(texts))
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if not long:
        return texts, stats
    dx_col = diagnosis_title_column(text_cfg)
    dx, rx, px = (samples.column(c).to_pylist() for c in (dx_col, "drugs", "procedure_titles"))
    present = samples.column("phenotypes_current").to_pylist()
    ids = samples.column("sample_id").to_pylist()
    for i in long:
        eff = efficacy_for(present[i], efficacy)
        fitted, rounds, status, used = fit_text(tokenizer, max_length, eadf_texts[i], dx[i], rx[i], px[i], eff,
                                                text_cfg, shrink)
        if column == EADF:
            texts[i] = fitted
        else:  # the same budgets, this column's clauses (none for plain text)
            clauses = control_efficacy(CONTROL_KINDS[column], ids[i], eff, efficacy) if column in CONTROL_KINDS else None
            texts[i] = render_input(dx[i], rx[i], px[i], efficacy=clauses or None, cfg=used).text
        stats.refit += 1
        stats.efficacy_reduced += status == "efficacy_reduced"
        stats.truncated += status == "truncated"
        stats.rounds.append(rounds)
    return texts, stats


@dataclass
class UnitTargets:
    """Multi-granularity targets of one split, aligned to the student's own tokens: per row the
    unit of each student token (-1 none; an index into the units both models see), and the
    teacher's unit attention [25, W] / relations [W, W] restricted to those W units."""

    token_units: list[np.ndarray]
    unit_attention: list[np.ndarray] | None
    unit_relation: list[np.ndarray] | None
    stats: dict


@dataclass
class Encoded:
    """One split, tokenised: what the workers get (through the object store)."""

    input_ids: list[list[int]]
    labels: np.ndarray                  # [N, 25] float32 0/1
    sample_ids: list[str]
    subject_ids: list[int]
    teacher_probs: np.ndarray | None = None   # [N, 25]
    teacher_logits: np.ndarray | None = None  # [N, 25]
    units: UnitTargets | None = None          # training split of a variant with unit terms

    def __len__(self) -> int:
        return len(self.input_ids)


def read_unit_targets(path: str, sample_ids: Sequence[str]) -> pa.Table:
    """UNIT_TARGETS rows in the order of `sample_ids`; a missing row is an error naming the file."""

    try:
        table = check_schema(read_parquet(path), UNIT_TARGETS, path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no unit targets; the soft-label stage writes them with "
                                f"soft_labels.unit_targets: true (re-run `ckd-ehr soft-labels`)") from exc
    index = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    missing = [s for s in sample_ids if s not in index]
    if missing:
        raise ContractError(f"{path}: no unit targets for {len(missing)} of {len(sample_ids)} samples "
                            f"(e.g. {missing[0]}); re-run `ckd-ehr soft-labels`")
    return table.take(pa.array([index[s] for s in sample_ids], type=pa.int64()))


def align_units(samples: pa.Table, texts: list[str], tokenizer, max_length: int, text_cfg: TextConfig,
                targets: pa.Table, attention: bool, relation: bool) -> UnitTargets:
    """The student's side of the unit alignment (docs/method.md): parse each (fitted) text's units,
    map the student's tokens to them through the offset mapping (the same truncation as
    `encode`), keep the units both models have tokens for, in the teacher's order, and restrict
    the teacher's stored distributions to them (renormalised)."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.modeling.units import restrict, token_units

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: without an offset mapping the student's "
                         "tokens cannot be mapped to units; use the encoder's fast tokenizer")
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length, return_offsets_mapping=True)
    dx, rx, px = (samples.column(c).to_pylist() for c in (diagnosis_title_column(text_cfg), "drugs", "procedure_titles"))
    t_keys = targets.column("units").to_pylist()
    t_att = targets.column("unit_attention").to_pylist()
    t_rel = targets.column("unit_relation").to_pylist()
    if attention and any(a is None for a in t_att):
        raise ContractError("the unit targets hold no label attention (the teacher does not pool by label "
                            "attention): student.distill.label_attention needs teacher.pooling: label_attention")
    maps, atts, rels, kept, teacher_units = [], [], [], [], []
    for i, text in enumerate(texts):
        units = text_units(text, dx[i], rx[i], px[i])
        tok = token_units(enc["offset_mapping"][i], [(a, b) for _, a, b in units])
        student_keys = {units[u][0] for u in set(tok[tok >= 0].tolist())}
        common = [k for k in t_keys[i] if k in student_keys]          # the teacher's order
        pos = {k: j for j, k in enumerate(common)}
        lookup = np.asarray([pos.get(k, -1) for k, _, _ in units] + [-1], dtype=np.int32)
        maps.append(lookup[tok])                                       # -1 stays -1 (the last slot)
        w = len(t_keys[i])
        if attention:
            atts.append(restrict(np.asarray(t_att[i], np.float32).reshape(NUM_PHENOTYPES, w), t_keys[i], common))
        if relation:
            rels.append(restrict(np.asarray(t_rel[i], np.float32).reshape(w, w), t_keys[i], common, square=True))
        kept.append(len(common))
        teacher_units.append(w)
    stats = {"mean_units_teacher": float(np.mean(teacher_units)) if texts else 0.0,
             "mean_units_common": float(np.mean(kept)) if texts else 0.0,
             "samples_without_common_units": int(sum(k == 0 for k in kept))}
    return UnitTargets(maps, atts if attention else None, rels if relation else None, stats)


def encode(samples: pa.Table, soft: pa.Table | None, texts: list[str], tokenizer, max_length: int) -> Encoded:
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(
        input_ids=[list(x) for x in ids],
        labels=to_matrix(samples.column("labels"), np.float32),
        sample_ids=samples.column("sample_id").to_pylist(),
        subject_ids=samples.column("subject_id").to_pylist(),
        teacher_probs=None if soft is None else to_matrix(soft.column("probs"), np.float32),
        teacher_logits=None if soft is None else to_matrix(soft.column("logits"), np.float32),
    )
