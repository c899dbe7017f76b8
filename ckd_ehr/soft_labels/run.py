"""Soft labels: the teacher's probabilities for every sample, by Ray Data batch inference.

    RUN/eadf/samples/{split}.parquet  --(Ray Data, actor pool, one teacher per actor)-->
    RUN/soft_labels/{split}.parquet   (contracts.SOFT_LABELS)  + RUN/soft_labels/quality/

The scoring itself (`tokenize` + `score_ids`) is plain torch and runs without Ray; `TeacherScorer` is
the callable class Ray Data instantiates once per actor, so the teacher is loaded once per
actor and not once per batch. Inside a batch, rows are sorted by token length and cut into
sub-batches, so each forward pass pads only to its own longest row (the authors padded
every sample to max_length, one at a time).

With `soft_labels.unit_targets` the same forward pass also gives the teacher's targets of
multi-granularity distillation (`score_with_units`): its label attention summed per clinical
item of the text and the relations between the items (RUN/soft_labels/units/, contracts.UNIT_TARGETS).

The stage is complete or fails: every input sample_id appears exactly once in the output
(`check_complete`), probabilities are finite and in [0, 1], and each split's file is written
under a temporary name and renamed, so a rerun replaces it and never appends.
"""
from __future__ import annotations

import logging
import math
import posixpath
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr import storage
from ckd_ehr.contracts import SOFT_LABELS, SPLITS, UNIT_TARGETS, ContractError, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.collate import length_sorted_batches, pad_batch, pad_id, padding_efficiency, predict_sorted
from ckd_ehr.training import format_duration
from ckd_ehr.training.batching import trainer_rows

log = logging.getLogger(__name__)


# --- core: plain torch, no Ray ------------------------------------------------------------

def resolve_dtype(name: str, on_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def tokenize(tokenizer, texts: Sequence[str], use_chat_template: bool, max_length: int,
             instruction_kind: str = "paper") -> list[list[int]]:
    """Token ids per text (unpadded), built and truncated exactly as the teacher was trained."""
    from ckd_ehr.modeling.prompts import encode_texts

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
    from ckd_ehr.modeling.units import token_units
    from ckd_ehr.modeling.prompts import encode_texts_with_offsets
    from ckd_ehr.text import text_units

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
    import torch

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
    from transformers import AutoTokenizer

    from ckd_ehr.contracts import ARTIFACT_TOKENIZER, PROBE_HEAD
    from ckd_ehr.modeling.feature_cache import FeatureCache
    from ckd_ehr.modeling.probe import LinearProbe
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


def teacher_frozen_cache(layout: RunLayout, meta: dict, units: bool) -> tuple[str, str, int, str] | None:
    """(directory, key, top layers, dtype) of the frozen-layer states the teacher cached in
    training (teacher.train_top_layers), for TeacherScorer; None when it trained no such cache
    or when the stage needs more than the logits (unit targets read every layer)."""
    from ckd_ehr.teacher.train import teacher_frozen_key

    tcfg = meta.get("config", {})
    if units or meta.get("head", "mlaph") != "mlaph" or not tcfg.get("train_top_layers"):
        return None
    directory = tcfg.get("frozen_cache_dir") or layout.teacher_frozen_cache
    if not storage.exists(directory):
        return None
    return directory, teacher_frozen_key(tcfg), int(tcfg["train_top_layers"]), tcfg.get("frozen_cache_dtype", "float32")


# --- Ray edge -----------------------------------------------------------------------------

class TeacherScorer:
    """Ray Data callable class: loads the teacher once per actor, scores pyarrow batches."""

    def __init__(self, artifact_dir: str, text_column: str, max_length: int | None, sub_batch_size: int,
                 use_gpu: bool, dtype: str, torch_threads: int | None, unit_columns: tuple[str, str, str] | None = None,
                 relation_layer: int | None = -1, frozen_cache: tuple[str, str, int, str] | None = None):
        import torch

        from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache
        from ckd_ehr.teacher import load_teacher

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if use_gpu else "cpu"
        # load_teacher reads s3:// artifacts through storage.local_dir (a temporary local copy).
        self.model, self.tokenizer, meta = load_teacher(
            artifact_dir, device=self.device, dtype=resolve_dtype(dtype, use_gpu), merge_lora=True)
        self.model.eval()
        self.teacher_id = meta["artifact_id"]
        self.use_chat_template, self.max_length, self.instruction = teacher_text_options(meta, max_length)
        self.text_column = text_column
        self.sub_batch_size = sub_batch_size
        self.unit_columns, self.relation_layer = unit_columns, relation_layer
        # frozen_cache (directory, key, top layers, dtype): the teacher trained only its top layers
        # (train_top_layers) and cached its frozen layers' states of every training and
        # validation row; those rows need only the top layers here (LoRA below them never left
        # its zero start, so the merged teacher's frozen part is the cached one's).
        self.frozen_states: dict = {}
        if frozen_cache and not unit_columns:
            directory, key, top, cache_dtype = frozen_cache
            self.model.freeze_below(top)
            self.frozen_states = LayerCache(directory, key, CACHE_DTYPES[cache_dtype]).load_all()

    def _score(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, padded length, from the frozen cache) per row: cached rows through the top
        layers only, the others through the whole teacher."""
        from ckd_ehr.modeling.feature_cache import row_digest
        from ckd_ehr.modeling.frozen import predict_cached

        found = [self.frozen_states.get(row_digest(x)) for x in ids] if self.frozen_states else [None] * len(ids)
        cached = np.array([f is not None for f in found], dtype=bool)
        logits = np.zeros((len(ids), NUM_PHENOTYPES), dtype=np.float32)
        padded = np.zeros(len(ids), dtype=np.int32)
        hit, miss = np.flatnonzero(cached), np.flatnonzero(~cached)
        if len(hit):
            logits[hit], padded[hit] = predict_cached(self.model, [found[i] for i in hit], self.sub_batch_size,
                                                      NUM_PHENOTYPES, self.device)
        if len(miss):
            logits[miss], padded[miss] = score_ids(self.model, self.tokenizer, [ids[i] for i in miss],
                                                   self.sub_batch_size, self.device)
        return logits, padded, cached

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        sample_ids = batch.column("sample_id").to_pylist()
        if self.unit_columns:
            items = list(zip(*(batch.column(c).to_pylist() for c in self.unit_columns)))
            ids, maps, keys = unit_inputs(self.tokenizer, texts, items, self.use_chat_template, self.max_length,
                                          self.instruction)
            out = score_with_units(self.model, self.tokenizer, ids, maps, keys, self.sub_batch_size,
                                   self.relation_layer, self.device)
            logits, padded = out["logits"], out["padded"]
            cached = np.zeros(len(ids), dtype=bool)
        else:
            ids = tokenize(self.tokenizer, texts, self.use_chat_template, self.max_length, self.instruction)
            logits, padded, cached = self._score(ids)
        table = soft_label_table(sample_ids, logits, self.teacher_id)
        if self.unit_columns:
            units = unit_target_table(sample_ids, keys, out["unit_attention"], out["unit_relation"])
            for name in UNIT_TARGETS.names[1:]:
                table = table.append_column(name, units.column(name))
        # Carried through so the driver can tell the splits apart and count tokens; dropped
        # before writing.
        return (table.append_column("path", batch.column("path"))
                .append_column("n_tokens", pa.array([len(x) for x in ids], pa.int32()))
                .append_column("n_computed", pa.array(padded, pa.int32()))
                .append_column("frozen_cached", pa.array(cached, pa.bool_())))


def teacher_text_options(meta: dict, max_length: int | None = None) -> tuple[bool, int, str]:
    """(use_chat_template, max_length, instruction) as the teacher was trained; `max_length` overrides."""
    from ckd_ehr.teacher.artifact import teacher_instruction

    tcfg = meta.get("config", {})
    chat = meta.get("use_chat_template", tcfg.get("use_chat_template", True))
    return (bool(chat), int(max_length or meta.get("max_length") or tcfg.get("max_length", 1024)),
            teacher_instruction(meta))


def teacher_text_column(artifact_dir: str, meta: dict | None = None) -> str:
    """The sample text column the teacher was trained on (teacher.json, or its `meta` already read)."""
    meta = meta if meta is not None else storage.read_json(storage.join(artifact_dir, "teacher.json"))
    return meta.get("text_column") or meta.get("config", {}).get("text_column", "text_eadf")


SCORING_BLOCK_BYTES = 4096
"""Ray Data's target block size for the soft-label Dataset (its default is 128 MiB). Why: with
the default, the read put every input file into ONE block (the demo's 870 rows of three files:
1.5 MiB), so one actor scored everything however many the pool had, and, Ray Data handing a
task's output on only when a block is full, the stage showed no progress until the end (the
demo: over 50 minutes without a progress line). At 4 KiB a block holds a row or two of text
(Ray Data bundles them into batches of `batch_size` for the actors, who then share the work)
and the output (~0.3 KiB a row: ids, 25 logits, 25 probabilities) comes back about one block per
batch; one small object per row is nothing next to scoring it."""


def read_scoring_input(input_paths: dict[str, str], text_column: str, extra_columns: Sequence[str] = ()):
    """(Dataset of sample_id, `text_column`, `extra_columns` and path over every input file, in
    blocks of SCORING_BLOCK_BYTES; {path inside the filesystem: split})."""
    import ray

    paths, fs = {}, None
    for split, path in input_paths.items():
        fs, inner = storage.resolve(path)
        paths[inner] = split
    ds = ray.data.read_parquet(list(paths), filesystem=fs, columns=["sample_id", text_column, *extra_columns], include_paths=True)
    ds.context.target_max_block_size = SCORING_BLOCK_BYTES   # inherited by the operators after the read
    return ds, paths


def infer_soft_labels(input_paths: dict[str, str], artifact_dir: str, cfg,
                      unit_columns: tuple[str, str, str] | None = None,
                      frozen_cache: tuple[str, str, int, str] | None = None) -> dict[str, pa.Table]:
    """Score every row of every input file with one actor pool; {split: SOFT_LABELS + path,
    n_tokens, n_computed (+ UNIT_TARGETS' columns when `unit_columns`, the diagnosis title,
    drug and procedure title columns the texts were rendered from, are given)}.

    `cfg` is a SoftLabelsConfig. Ray must already be initialised.
    """
    import ray

    text_column = teacher_text_column(artifact_dir)
    ds, paths = read_scoring_input(input_paths, text_column, unit_columns or ())
    use_gpu = cfg.use_gpu
    threads = cfg.torch_threads or max(1, math.ceil(cfg.cpus_per_actor))
    ds = ds.map_batches(
        TeacherScorer,
        fn_constructor_kwargs=dict(artifact_dir=artifact_dir, text_column=text_column, max_length=cfg.max_length,
                                   sub_batch_size=cfg.sub_batch_size, use_gpu=use_gpu, dtype=cfg.dtype,
                                   torch_threads=None if use_gpu else threads, unit_columns=unit_columns,
                                   relation_layer=cfg.relation_layer, frozen_cache=frozen_cache),
        batch_size=cfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.num_gpus_per_actor or None)
    # No no-progress window: a teacher on CPU is legitimately slow (before the small blocks, a
    # 438-row block of the demo outlasted Ray Data's 30-minute window on a loaded 2-core machine
    # and a healthy run was killed), and a slow batch is not a hang.
    ds.context.execution_no_progress_timeout_s = -1
    # Ray Data's high-memory detector repeats a warning every 30 s for the whole stage when an
    # actor holds more than it requested (each actor holds a whole teacher: ~1.3 GiB for the
    # demo's SmolLM2 on CPU). The pool's size is explicit (num_actors), not autoscaled onto a
    # node by a memory estimate, so the advice does not apply: switched off for this Dataset.
    ds.context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    # Streamed, not collected at the end: the driver logs progress with the time left (Ray
    # Data's own progress bars are off in this project: they garble logs of jobs and tests).
    total = sum(storage.parquet_num_rows(p) for p in input_paths.values())
    tables, done, start, last = [], 0, time.time(), time.time()
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if block.num_rows:
            tables.append(block)
            done += block.num_rows
        if time.time() - last > 20 or done == total:
            last, rate = time.time(), done / max(1e-9, time.time() - start)
            log.info("soft labels: %d/%d samples scored (%.0f%%), about %s left", done, total,
                     100.0 * done / max(1, total), format_duration((total - done) / max(rate, 1e-9)))
    if not tables:
        return {split: _empty(unit_columns is not None) for split in input_paths}
    full = pa.concat_tables(tables)
    # include_paths gives the path inside the filesystem; match on the normalised form.
    by_norm = {posixpath.normpath(p): s for p, s in paths.items()}
    path_list = full.column("path").to_pylist()
    split_of = np.array([by_norm.get(posixpath.normpath(p), "") for p in path_list])
    if (split_of == "").any():
        strays = sorted({p for p, s in zip(path_list, split_of) if not s})
        raise ContractError(f"soft labels: rows from unexpected file(s) {strays[:3]}")
    return {split: full.filter(pa.array(split_of == split)) for split in input_paths}


def _empty(units: bool = False) -> pa.Table:
    table = (SOFT_LABELS.empty_table().append_column("path", pa.array([], pa.string()))
             .append_column("n_tokens", pa.array([], pa.int32())).append_column("n_computed", pa.array([], pa.int32()))
             .append_column("frozen_cached", pa.array([], pa.bool_())))
    for field in UNIT_TARGETS if units else ():
        if field.name != "sample_id":
            table = table.append_column(field, pa.array([], field.type))
    return table


def run_soft_labels(cfg) -> dict:
    """`ckd-ehr soft-labels`: SOFT_LABELS for every split plus the quality report."""
    from ckd_ehr.ray_utils import init_ray
    from ckd_ehr.soft_labels.quality import write_quality_report

    layout = RunLayout(cfg.run_dir)
    artifact = layout.teacher_artifact
    if not storage.exists(storage.join(artifact, "teacher.json")):
        raise FileNotFoundError(f"{artifact}: no teacher artifact (run `ckd-ehr teacher` first)")
    meta = storage.read_json(layout.teacher_meta)
    # The rows this stage scores, per split: every row, or under `soft_labels.rows: student` the
    # training / validation rows the student reads.
    rows, totals = {}, {}
    for split in SPLITS:
        table = storage.read_parquet(layout.augmented(split))
        totals[split] = table.num_rows
        if cfg.soft_labels.rows == "student" and split in ("train", "val"):
            keep = trainer_rows(cfg.student, split, table.num_rows)
            if len(keep) < table.num_rows:
                log.info("soft labels %s: the %d of %d rows the student reads (soft_labels.rows: student)",
                         split, len(keep), table.num_rows)
                table = table.take(pa.array(keep))
        rows[split] = table
    input_ids = {split: t.column("sample_id").to_pylist() for split, t in rows.items()}
    unit_columns = None
    if cfg.soft_labels.unit_targets:
        from ckd_ehr.text import diagnosis_title_column

        unit_columns = (diagnosis_title_column(cfg.text), "drugs", "procedure_titles")
        if meta.get("head", "mlaph") != "mlaph":
            raise ValueError("soft_labels.unit_targets needs an MLAPH teacher (teacher.head: mlaph): a generative "
                             "teacher has neither label attention nor a projection head's states")
        unit_attention = meta.get("pooling") == "label_attention"
    # A teacher that kept its probe: rows whose frozen features the probe cached need no pass.
    from_probe = {} if unit_columns else soft_labels_from_probe(layout, meta, cfg.soft_labels, rows)
    to_score, subsets = {}, []
    try:
        for split, table in rows.items():
            if split in from_probe:
                done = set(from_probe[split].column("sample_id").to_pylist())
                log.info("soft labels %s: %d of %d rows from the teacher's probe features (it kept its probe, step 0)",
                         split, len(done), table.num_rows)
                table = table.filter(pa.array([sid not in done for sid in input_ids[split]]))
            if not table.num_rows:
                continue
            if table.num_rows == totals[split]:
                to_score[split] = layout.augmented(split)
            else:   # beside the run's other files (same filesystem for Ray Data), removed below
                to_score[split] = storage.join(layout.root, "soft_labels", f"to_score_{split}.parquet")
                storage.write_parquet(table, to_score[split])
                subsets.append(to_score[split])
        raw, scoring_s = {}, 0.0
        if to_score:
            init_ray(cfg.ray)
            started = time.time()
            raw = infer_soft_labels(to_score, artifact, cfg.soft_labels, unit_columns,
                                    teacher_frozen_cache(layout, meta, unit_columns is not None))
            scoring_s = time.time() - started
    finally:
        for path in subsets:
            storage.remove(path)
    from_frozen = {split: int(pc.sum(t.column("frozen_cached")).as_py() or 0) if "frozen_cached" in t.column_names
                   else 0 for split, t in raw.items()}
    for split in SPLITS:
        parts = [t.select([*SOFT_LABELS.names, "n_tokens", "n_computed"]) for t in (raw.get(split), from_probe.get(split))
                 if t is not None] if not unit_columns else [raw[split]]
        raw[split] = pa.concat_tables(parts) if parts else _empty(False)
    # Every split is checked before any is written: the stage fails whole, not half-replaced.
    tables, unit_tables = {}, {}
    for split in SPLITS:
        table = raw[split].select(SOFT_LABELS.names)
        check_complete(input_ids[split], table, layout.soft_labels(split))
        tables[split] = in_input_order(table, input_ids[split])
        if unit_columns:
            units = raw[split].select(UNIT_TARGETS.names)
            check_unit_targets(units, input_ids[split], layout.unit_targets(split), unit_attention,
                               cfg.soft_labels.relation_layer is not None)
            unit_tables[split] = in_input_order(units, input_ids[split])
    summary = {}
    for split, table in tables.items():
        storage.write_parquet(table, layout.soft_labels(split))
        if split in unit_tables:
            storage.write_parquet(unit_tables[split], layout.unit_targets(split))
        scored = raw[split].filter(pc.greater(raw[split].column("n_computed"), 0))   # not from the probe's cache
        real = int(pc.sum(scored.column("n_tokens")).as_py() or 0)
        computed = int(pc.sum(raw[split].column("n_computed")).as_py() or 0)
        summary[split] = {"rows": table.num_rows, "tokens": real, "computed_tokens": computed,
                          "padding_efficiency": padding_efficiency(real, computed),
                          "rows_from_probe_features": from_probe[split].num_rows if split in from_probe else 0,
                          "rows_from_frozen_cache": from_frozen.get(split, 0)}
        if split in unit_tables:
            summary[split]["unit_targets_bytes"] = storage.size(layout.unit_targets(split))
            spread = label_attention_spread(unit_tables[split]) if unit_attention else None
            summary[split]["label_attention_spread"] = spread
            if spread is not None and spread < SPREAD_WARNING:
                log.warning("soft labels %s: the teacher's label attention is the same for every phenotype (spread "
                            "%.2g < %g): its queries never left their start (zero under head_init probe), so the "
                            "label-level term would distil only how the tokens fall into units; train the queries at "
                            "a rate of their own (teacher.query_lr, docs/method.md)", split, spread, SPREAD_WARNING)
        elif storage.exists(layout.unit_targets(split)):   # another teacher's: never left to be read as this one's
            storage.remove(layout.unit_targets(split))
        log.info("soft labels %s: %d rows -> %s (%d from the probe's features, %d through the top layers only on the "
                 "teacher's frozen cache; scored: padding efficiency %.3f, %d real / %d computed tokens)", split,
                 table.num_rows, layout.soft_labels(split), summary[split]["rows_from_probe_features"],
                 summary[split]["rows_from_frozen_cache"], summary[split]["padding_efficiency"], real, computed)
    quality = write_quality_report(layout, cfg.soft_labels.ece_bins)
    # Throughput of the rows the teacher computed (not those from its probe's cache), Ray Data's
    # start-up included: what a user waits for per row (the study compares teacher heads on it).
    scored_rows = sum(v["rows"] - v["rows_from_probe_features"] for v in summary.values())
    scoring = {"rows": scored_rows, "seconds": round(scoring_s, 1), "head": meta.get("head", "mlaph"),
               "rows_per_s": round(scored_rows / scoring_s, 3) if scoring_s > 0 else None}
    log.info("soft labels: %d rows scored in %.1f s (%s rows/s, %s head)", scored_rows, scoring_s,
             scoring["rows_per_s"], scoring["head"])
    return {"splits": summary, "scoring": scoring, "quality": quality}
