"""Scoring rows with a teacher, in plain torch without Ray: tokenising as the teacher was
trained (`tokenize`), scoring in length-sorted sub-batches (`score_ids`), the
multi-granularity targets of the same pass (`score_with_units`), the soft-label and unit
tables and the checks that a split is complete (`check_complete`), and the rows a teacher that
kept its probe scores from its cached features (`soft_labels_from_probe`).

Inside a batch, rows are sorted by token length and cut into sub-batches, so each forward pass
pads only to its own longest row (the authors padded every sample to max_length, one at a time).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ckd_ehr import storage
from ckd_ehr.contracts import SOFT_LABELS, UNIT_TARGETS, ContractError, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.collate import length_sorted_batches, pad_batch, pad_id, predict_sorted
from ckd_ehr.modeling.prompts import encode_texts, encode_texts_with_offsets
from ckd_ehr.modeling.units import token_units
from ckd_ehr.text import text_units
from ckd_ehr.contracts import ARTIFACT_TOKENIZER, PROBE_HEAD
from ckd_ehr.modeling.feature_cache import FeatureCache
from ckd_ehr.modeling.probe import LinearProbe

log = logging.getLogger(__name__)


def resolve_dtype(name: str, on_gpu: bool):

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def tokenize(tokenizer, texts: Sequence[str], use_chat_template: bool, max_length: int,
             instruction_kind: str = "paper") -> list[list[int]]:
    """Token ids per text (unpadded), built and truncated exactly as the teacher was trained."""

    return encode_texts(list(texts), tokenizer, max_length, use_chat_template, instruction_kind)


def sub_batches(lengths: Sequence[int], sub_batch_size: int) -> list[np.ndarray]:
    """Row indices sorted by length (longest first) and cut into sub-batches of
    `sub_batch_size`: each forward pass pads only to its own longest row."""
    return length_sorted_batches(lengths, sub_batch_size)


def score_ids(model, tokenizer, ids: list[list[int]], sub_batch_size: int,
              device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, 25] float32, padded length per row) for tokenised rows, in the order given.

    Rows are sorted by length and padded per sub-batch only (ckd_ehr.modeling.collate, as
    the teacher's predict_logits); the model pools each row at its own true length (the
    attention mask), so padding does not change a row's logits. The padded length is what
    the forward pass computed for the row (benchmarks count it).
    """
    pred = predict_sorted(model, ids, pad_id(tokenizer), sub_batch_size, NUM_PHENOTYPES, device)
    return pred.outputs, pred.padded_length


def unit_inputs(tokenizer, texts: Sequence[str], items: Sequence[tuple], use_chat_template: bool, max_length: int,
                instruction_kind: str = "paper") -> tuple[list[list[int]], list[np.ndarray], list[list[str]]]:
    """(token ids as `tokenize` gives them, the unit of each token, the unit keys) per text;
    `items` holds each text's (diagnosis titles, drugs, procedure titles) it was rendered from.
    Units the teacher never sees (cut by max_length) are left out of its keys."""

    ids, offsets = encode_texts_with_offsets(list(texts), tokenizer, max_length, use_chat_template, instruction_kind)
    maps, keys = [], []
    for text, (dx, rx, px), off in zip(texts, items, offsets):
        units = text_units(text, dx, rx, px)
        tok = token_units(off, [(a, b) for _, a, b in units])
        seen = sorted(set(tok[tok >= 0].tolist()))
        renumber = np.full(len(units) + 1, -1, dtype=np.int32)
        renumber[seen] = np.arange(len(seen), dtype=np.int32)
        maps.append(renumber[tok])   # -1 indexes the last slot: stays -1
        keys.append([units[u][0] for u in seen])
    return ids, maps, keys


def score_with_units(model, tokenizer, ids: list[list[int]], maps: list[np.ndarray], keys: list[list[str]],
                     sub_batch_size: int, relation_layer: int | None, device: str = "cpu") -> dict:
    """score_ids plus the unit targets, from one forward pass per sub-batch: {'logits' [N, 25],
    'padded' [N], 'unit_attention' / 'unit_relation': per row a flat float16 array (None where
    the teacher has no label attention / relation_layer is None)}."""

    n = len(ids)
    res = {"logits": np.zeros((n, NUM_PHENOTYPES), np.float32), "padded": [0] * n,
           "unit_attention": [None] * n, "unit_relation": [None] * n}
    for idx in length_sorted_batches([len(x) for x in ids], sub_batch_size):
        batch = pad_batch([ids[i] for i in idx], pad_id(tokenizer))
        width = batch["input_ids"].shape[1]
        units = torch.full((len(idx), width), -1, dtype=torch.long)
        for j, i in enumerate(idx):
            units[j, : len(maps[i])] = torch.as_tensor(maps[i], dtype=torch.long)
        n_units = max(1, max(len(keys[i]) for i in idx))
        with torch.inference_mode():
            out = model.unit_targets(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     units.to(device), n_units, relation_layer)
        out = {k: v.float().cpu().numpy() for k, v in out.items()}
        for j, i in enumerate(idx):
            w = len(keys[i])
            res["logits"][i], res["padded"][i] = out["logits"][j], width
            if "unit_attention" in out:
                res["unit_attention"][i] = out["unit_attention"][j, :, :w].astype(np.float16).ravel()
            if "unit_relation" in out:
                res["unit_relation"][i] = out["unit_relation"][j, :w, :w].astype(np.float16).ravel()
    return res


def unit_target_table(sample_ids: Sequence[str], keys: Sequence[Sequence[str]], attention: Sequence, relation: Sequence) -> pa.Table:
    """A UNIT_TARGETS table."""
    def halves(rows):
        return pa.array([None if r is None else np.asarray(r, np.float16) for r in rows], pa.list_(pa.float16()))

    return pa.Table.from_arrays([pa.array(list(sample_ids), pa.string()), pa.array([list(k) for k in keys],
                                 pa.list_(pa.string())), halves(attention), halves(relation)], schema=UNIT_TARGETS)


def check_unit_targets(table: pa.Table, input_ids: Sequence[str], where: str, attention: bool, relation: bool) -> None:
    """Raise ContractError unless every input sample has one row whose targets have the shapes
    its units say (25 x W attention, W x W relation, as asked), finite, each distribution
    summing to 1 (0 for a text without units)."""
    if sorted(table.column("sample_id").to_pylist()) != sorted(input_ids):
        raise ContractError(f"{where}: unit targets do not cover the {len(input_ids)} input samples exactly once "
                            f"({table.num_rows} rows)")
    bad = []
    for sid, units, att, rel in zip(*(table.column(c).to_pylist() for c in UNIT_TARGETS.names)):
        w = len(units)
        for name, wanted, rows, flat in (("unit_attention", attention, NUM_PHENOTYPES, att), ("unit_relation", relation, w, rel)):
            if not wanted:
                continue
            arr = None if flat is None else np.asarray(flat, np.float64)
            if arr is None or arr.size != rows * w or not np.isfinite(arr).all():
                bad.append(f"{sid}: {name} has {None if arr is None else arr.size} values for {rows} x {w}")
                continue
            sums = arr.reshape(rows, w).sum(1) if w else np.zeros(0)
            if w and name == "unit_attention" and not np.allclose(sums, 1.0, atol=2e-2):
                bad.append(f"{sid}: {name} rows sum to {sums.min():.3f}..{sums.max():.3f}, not 1")
    if bad:
        raise ContractError(f"{where}: unit targets malformed: {len(bad)} problem(s), e.g. " + "; ".join(bad[:3]))


def label_attention_spread(table: pa.Table) -> float | None:
    """How much the teacher's label attention depends on the phenotype: per sample, the mean over
    the 25 phenotypes of the total-variation distance between that phenotype's distribution over
    the units and the phenotypes' mean one, averaged over samples with units (None without
    attention targets). 0 means one distribution for every phenotype (queries that never moved
    from zero: the label-level term then distils only how the tokens fall into units); 1 the most."""
    spreads = []
    for units, att in zip(table.column("units").to_pylist(), table.column("unit_attention").to_pylist()):
        if att is None or not units:
            continue
        a = np.asarray(att, np.float64).reshape(NUM_PHENOTYPES, len(units))
        spreads.append(0.5 * np.abs(a - a.mean(0, keepdims=True)).sum(1).mean())
    return float(np.mean(spreads)) if spreads else None


SPREAD_WARNING = 1e-3
"""Below this label_attention_spread the soft-label stage warns that the label-level targets carry
no phenotype-specific attention."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Split by sign so large |x| neither overflows exp nor loses precision.
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out.astype(np.float32)


def soft_label_table(sample_ids: Sequence[str], logits: np.ndarray, teacher_id: str) -> pa.Table:
    """A SOFT_LABELS table (fixed-size lists of 25 float32)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    probs = sigmoid(logits)
    n = len(sample_ids)

    def vec(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), NUM_PHENOTYPES)

    return pa.Table.from_arrays(
        [pa.array(list(sample_ids), pa.string()), vec(logits), vec(probs), pa.array([teacher_id] * n, pa.string())],
        schema=SOFT_LABELS)


def check_complete(input_ids: Sequence[str], output_table: pa.Table, where: str) -> None:
    """Raise ContractError unless `output_table` holds every input sample_id exactly once,
    nothing else, and probabilities that are finite and in [0, 1]."""
    out_ids = output_table.column("sample_id").to_pylist()
    expected = list(input_ids)
    problems = []

    def examples(xs) -> str:
        xs = sorted(xs)
        return ", ".join(map(str, xs[:5])) + (" ..." if len(xs) > 5 else "")

    dup_in = _duplicates(expected)
    if dup_in:
        problems.append(f"{len(dup_in)} sample_id(s) duplicated in the input (e.g. {examples(dup_in)})")
    dup_out = _duplicates(out_ids)
    if dup_out:
        problems.append(f"{len(dup_out)} sample_id(s) duplicated in the output (e.g. {examples(dup_out)})")
    exp_set, out_set = set(expected), set(out_ids)
    missing = exp_set - out_set
    if missing:
        problems.append(f"{len(missing)} of {len(exp_set)} sample_id(s) missing (e.g. {examples(missing)})")
    extra = out_set - exp_set
    if extra:
        problems.append(f"{len(extra)} sample_id(s) not in the input (e.g. {examples(extra)})")
    if output_table.num_rows:
        probs = np.asarray(output_table.column("probs").combine_chunks().flatten(), dtype=np.float64)
        bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
        if probs.size != output_table.num_rows * NUM_PHENOTYPES:
            problems.append(f"probs has {probs.size} values, expected {output_table.num_rows} x {NUM_PHENOTYPES}")
        elif bad.any():
            rows = np.unique(np.nonzero(bad)[0] // NUM_PHENOTYPES)
            problems.append(f"{len(rows)} row(s) with probabilities not finite or outside [0, 1] "
                            f"(e.g. {examples(out_ids[i] for i in rows)})")
    if problems:
        raise ContractError(f"{where}: soft labels incomplete: {len(out_ids)} rows for "
                            f"{len(expected)} input samples; " + "; ".join(problems))


def _duplicates(xs: Sequence[str]) -> set:
    seen, dup = set(), set()
    for x in xs:
        (dup if x in seen else seen).add(x)
    return dup


def in_input_order(table: pa.Table, input_ids: Sequence[str]) -> pa.Table:
    """Reorder rows to the input file's order (Ray Data does not keep row order across actors)."""
    pos = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    return table.take(pa.array([pos[sid] for sid in input_ids], pa.int64()))


def soft_labels_from_probe(layout: RunLayout, meta: dict, sl_cfg, rows: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """{split: SOFT_LABELS rows + n_tokens, n_computed (0)} of the `rows` (sample_id and the
    teacher's text column, per split) whose frozen
    features the teacher's probe cached (RUN/teacher/probe_features), when the teacher kept its
    probe: checkpoint selection kept step 0, so no update was ever applied (LoRA's B starts at
    zero, the head is the probe) and the teacher's logits of a row ARE the probe's on the frozen
    backbone's pooled features. The demo's teacher keeps step 0; scoring the student's training
    rows again would cost a teacher pass over rows whose features exist. {} in every other case
    (a fine-tuned teacher, label attention, another dtype or max_length than the probe's:
    nothing in the cache matches), and the stage scores every row as before."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.teacher.train import teacher_feature_key

    art = layout.teacher_artifact
    if ((meta.get("metrics") or {}).get("step") != 0 or meta.get("head", "mlaph") != "mlaph"
            or meta.get("pooling") not in ("last", "mean") or not storage.exists(storage.join(art, PROBE_HEAD))
            or not storage.exists(layout.teacher_probe_features)):
        return {}
    dtype = str(resolve_dtype(sl_cfg.dtype, sl_cfg.use_gpu)).replace("torch.", "")
    cache = FeatureCache(layout.teacher_probe_features, teacher_feature_key(meta.get("config", {}), dtype))
    with storage.local_dir(art) as d:
        probe = LinearProbe.load(str(d / PROBE_HEAD))
        tokenizer = AutoTokenizer.from_pretrained(str(d / ARTIFACT_TOKENIZER))
    chat, max_length, instruction = teacher_text_options(meta, sl_cfg.max_length)
    column = teacher_text_column(art, meta)
    ids = {split: tokenize(tokenizer, [t or "" for t in table.column(column).to_pylist()], chat, max_length,
                           instruction) for split, table in rows.items()}
    features, found = cache.lookup([x for split in rows for x in ids[split]])   # one read of the cache
    out, start = {}, 0
    for split, table in rows.items():
        n = table.num_rows
        hit = np.flatnonzero(found[start:start + n])
        if len(hit):
            sample_ids = table.column("sample_id").to_pylist()
            got = soft_label_table([sample_ids[i] for i in hit], probe.logits(features[start + hit]), meta["artifact_id"])
            out[split] = (got.append_column("n_tokens", pa.array([len(ids[split][i]) for i in hit], pa.int32()))
                          .append_column("n_computed", pa.array(np.zeros(len(hit), np.int32))))
        start += n
    return out


def teacher_text_options(meta: dict, max_length: int | None = None) -> tuple[bool, int, str]:
    """(use_chat_template, max_length, instruction) as the teacher was trained; `max_length` overrides."""
    # not at module level: safetensors, loaded only when this runs
    from ckd_ehr.teacher.artifact import teacher_instruction

    tcfg = meta.get("config", {})
    chat = meta.get("use_chat_template", tcfg.get("use_chat_template", True))
    return (bool(chat), int(max_length or meta.get("max_length") or tcfg.get("max_length", 1024)),
            teacher_instruction(meta))


def teacher_text_column(artifact_dir: str, meta: dict | None = None) -> str:
    """The sample text column the teacher was trained on (teacher.json, or its `meta` already read)."""
    meta = meta if meta is not None else storage.read_json(storage.join(artifact_dir, "teacher.json"))
    return meta.get("text_column") or meta.get("config", {}).get("text_column", "text_eadf")
