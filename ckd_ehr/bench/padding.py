"""`ckd-ehr bench padding`: padding waste of every stage's batches, no model needed.

Tokenises the cohort's sample texts with the real tokenizers of the configured models (the
teacher's: SmolLM2 from its GGUF by default, through the teacher's own `encode_texts`; the
student's: MiniLM-L6's WordPiece, truncated at student.max_length) and builds, for each batch
size, the batches each stage builds with the stage's own batching code:

  teacher_train   ckd_ehr.training.length_grouped_batches (all ranks of teacher.num_workers)
  teacher_val     ckd_ehr.training.eval_batches (sorted by length; also predict_logits' order)
  soft_labels     Ray Data blocks of soft_labels.batch_size consecutive rows, each sorted and cut
                  into sub-batches (ckd_ehr.soft_labels.scoring.sub_batches); the batch size swept is
                  the sub-batch size
  student_train   length_grouped_batches on the student's token lengths
  random          the floor: a seeded shuffle cut into batches, no length grouping

and prints real tokens / computed tokens (computed = rows x the batch's longest row) per
stage and batch size. Texts: RUN/eadf/samples/train.parquet when the run has it, else a
synthetic cohort taken through prepare and eadf in a temporary run (Ray Data, local).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Sequence

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from ckd_ehr.bench.common import emit
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.modeling.prompts import encode_texts

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def efficiency(batches: Sequence[np.ndarray], lengths: np.ndarray) -> float:
    """Real tokens / computed tokens of `batches` (index arrays into `lengths`)."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.training import padding_efficiency

    real = sum(int(lengths[b].sum()) for b in batches if len(b))
    computed = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return padding_efficiency(real, computed)


def stage_efficiencies(lengths: Sequence[int], batch_size: int, world: int = 1, block: int = 64,
                       seed: int = 0) -> dict[str, float]:
    """Padding efficiency of each stage's batching of `lengths` at `batch_size`."""
    # not at module level: torch, loaded only when this runs
    from ckd_ehr.soft_labels.scoring import sub_batches
    from ckd_ehr.training import eval_batches, length_grouped_batches

    lengths = np.asarray(lengths)
    grouped = [b for r in range(world) for b in length_grouped_batches(lengths, batch_size, seed, 0, world, r)]
    val = [b for b in eval_batches(lengths, batch_size, 1, 0) if b is not None]
    scored = [start + b for start in range(0, len(lengths), block)
              for b in sub_batches(lengths[start:start + block], batch_size)]
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    random = [shuffled[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return {"length_grouped": efficiency(grouped, lengths), "sorted": efficiency(val, lengths),
            "ray_data_blocks": efficiency(scored, lengths), "random": efficiency(random, lengths)}


def _texts(cfg, tmp: str) -> tuple[list[str], str]:
    layout = RunLayout(cfg.run_dir)
    path = layout.augmented("train")
    if not storage.exists(path):
        # not at module level: imported only on this branch
        from ckd_ehr.pipeline import run_pipeline

        run = os.path.join(tmp, "run")
        log.info("no samples in %s: synthetic cohort through prepare + eadf in %s", cfg.run_dir, run)
        run_pipeline(cfg.model_copy(update={"run_dir": run}), to_stage="eadf")
        path = RunLayout(run).augmented("train")
    col = cfg.teacher.text_column
    return storage.read_parquet(path, columns=[col]).column(col).to_pylist(), path


def bench_padding(cfg, args) -> dict:
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.teacher.train import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-padding-") as tmp:
        texts, source = _texts(cfg, tmp)
    if args.samples:
        texts = texts[: args.samples]
    tc, sc, sl = cfg.teacher, cfg.student, cfg.soft_labels
    teacher_len = np.array([len(x) for x in encode_texts(texts, load_tokenizer(tc), tc.max_length,
                                                         tc.use_chat_template, tc.instruction)])
    stok = AutoTokenizer.from_pretrained(resolve_model_path(sc.model))
    student_len = np.minimum([len(x) for x in stok(texts, add_special_tokens=True)["input_ids"]], sc.max_length)
    res: dict = {"source": source, "samples": len(texts),
                 "teacher_tokens": {"model": tc.model, "mean": round(float(teacher_len.mean()), 1),
                                    "min": int(teacher_len.min()), "max": int(teacher_len.max())},
                 "student_tokens": {"model": sc.model, "mean": round(float(student_len.mean()), 1),
                                    "min": int(student_len.min()), "max": int(student_len.max())},
                 "configured": {"teacher.batch_size": tc.batch_size, "teacher.num_workers": tc.num_workers,
                                "soft_labels.batch_size": sl.batch_size, "soft_labels.sub_batch_size": sl.sub_batch_size,
                                "student.batch_size": sc.batch_size, "student.num_workers": sc.num_workers}}
    def r4(x: float) -> float | None:  # NaN (no full batch at this size) -> null in the JSON
        return round(x, 4) if x == x else None

    rows = {}
    for bs in BATCH_SIZES:
        t = stage_efficiencies(teacher_len, bs, tc.num_workers, sl.batch_size)
        s = stage_efficiencies(student_len, bs, sc.num_workers, sl.batch_size)
        rows[bs] = {"teacher_train": r4(t["length_grouped"]), "teacher_val_and_predict": r4(t["sorted"]),
                    "soft_labels": r4(t["ray_data_blocks"]) if bs <= sl.batch_size else None,
                    "student_train": r4(s["length_grouped"]), "random_teacher": r4(t["random"]),
                    "random_student": r4(s["random"])}
    res["efficiency_by_batch_size"] = rows
    res["note"] = ("real tokens / computed tokens; `random_*` is the floor without length grouping; soft_labels "
                   "sweeps sub_batch_size inside Ray Data batches of soft_labels.batch_size rows")
    emit(res, getattr(args, "out", None))
    return res
