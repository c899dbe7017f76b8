"""The Ray edge of the soft-label stage: `TeacherScorer`, the callable class Ray Data instantiates
once per actor (the teacher is loaded once per actor, not once per batch), and
`infer_soft_labels`, one actor pool over every input file, streamed with progress lines."""
from __future__ import annotations

import logging
import math
import posixpath
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ckd_ehr import storage
from ckd_ehr.contracts import SOFT_LABELS, UNIT_TARGETS, ContractError
from ckd_ehr.phenotypes import NUM_PHENOTYPES
from ckd_ehr.modeling.collate import pad_id
from ckd_ehr.training import format_duration
from ckd_ehr.soft_labels.scoring import (resolve_dtype, score_ids, score_with_units, soft_label_table,
                                         teacher_text_column, teacher_text_options, tokenize, unit_inputs,
                                         unit_target_table)
from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, predict_through_cache
from ckd_ehr.teacher import load_teacher

log = logging.getLogger(__name__)


class TeacherScorer:
    """Ray Data callable class: loads the teacher once per actor, scores pyarrow batches."""

    def __init__(self, artifact_dir: str, text_column: str, max_length: int | None, sub_batch_size: int,
                 use_gpu: bool, dtype: str, torch_threads: int | None, unit_columns: tuple[str, str, str] | None = None,
                 relation_layer: int | None = -1, frozen_cache: tuple[str, str, int, str] | None = None):


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
        self.frozen, self.frozen_states = None, {}
        if frozen_cache and not unit_columns:
            directory, key, top, cache_dtype = frozen_cache
            self.model.freeze_below(top)
            self.frozen = LayerCache(directory, key, CACHE_DTYPES[cache_dtype])
            self.frozen_states = self.frozen.load_all()

    def _score(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, padded length, from the frozen cache) per row: cached rows through the top
        layers only; the others through the whole teacher, or with a frozen cache through its
        bottom (added to the cache, for evaluate's probe row) and its top."""

        if self.frozen is None:
            logits, padded = score_ids(self.model, self.tokenizer, ids, self.sub_batch_size, self.device)
            return logits, padded, np.zeros(len(ids), dtype=bool)
        return predict_through_cache(self.model, ids, pad_id(self.tokenizer), self.sub_batch_size, NUM_PHENOTYPES,
                                     self.frozen_states, self.frozen, self.device)

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
    # not at module level: ray, loaded only when this runs
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
    # not at module level: ray, loaded only when this runs
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
        return {split: empty_scored(unit_columns is not None) for split in input_paths}
    full = pa.concat_tables(tables)
    # include_paths gives the path inside the filesystem; match on the normalised form.
    by_norm = {posixpath.normpath(p): s for p, s in paths.items()}
    path_list = full.column("path").to_pylist()
    split_of = np.array([by_norm.get(posixpath.normpath(p), "") for p in path_list])
    if (split_of == "").any():
        strays = sorted({p for p, s in zip(path_list, split_of) if not s})
        raise ContractError(f"soft labels: rows from unexpected file(s) {strays[:3]}")
    return {split: full.filter(pa.array(split_of == split)) for split in input_paths}


def empty_scored(units: bool = False) -> pa.Table:
    table = (SOFT_LABELS.empty_table().append_column("path", pa.array([], pa.string()))
             .append_column("n_tokens", pa.array([], pa.int32())).append_column("n_computed", pa.array([], pa.int32()))
             .append_column("frozen_cached", pa.array([], pa.bool_())))
    for field in UNIT_TARGETS if units else ():
        if field.name != "sample_id":
            table = table.append_column(field, pa.array([], field.type))
    return table
