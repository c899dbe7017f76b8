"""Which rows go into which batch, and how much of a batch is padding. No torch state, no Ray.

- `length_grouped_batches`: a rank's training batches of one epoch (seeded shuffle, sorted by
  length within mega-batches, every rank the same number of batches).
- `eval_batches`: validation / prediction batches sorted by length, rank-strided, padded with
  None so every rank runs the same number of forwards.
- `subset_indices`: the training rows kept under cfg.max_train_samples.
- `batch_tokens`: real / computed tokens of a collated batch (their ratio: `padding_efficiency`,
  from ckd_ehr.modeling.collate, which scoring shares).
- `to_device`: a collated batch (tensors in dicts, lists, tuples) onto a device.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ckd_ehr.modeling.collate import length_sorted_batches, padding_efficiency  # noqa: F401  (re-exported)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, world: int = 1,
                           rank: int = 0, mega: int = 50) -> list[np.ndarray]:
    """This rank's batches (index arrays) for one epoch: a seeded shuffle, sorted by length
    inside mega-batches of `mega` global batches so each batch pads little, then the batch
    order shuffled. Every rank gets the same number of batches."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(lengths))
    span = batch_size * world * mega
    batches = []
    for s in range(0, len(idx), span):
        chunk = idx[s: s + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def eval_batches(lengths: Sequence[int], batch_size: int, world: int, rank: int) -> list[np.ndarray | None]:
    """Validation batches sorted by length, rank-strided; padded with None so every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively)."""
    batches = length_sorted_batches(lengths, batch_size)
    n = math.ceil(len(batches) / world) if batches else 0
    mine: list[np.ndarray | None] = list(batches[rank::world])
    return mine + [None] * (n - len(mine))


def subset_indices(n_total: int, max_n: int | None, seed: int) -> np.ndarray:
    """The training rows kept under cfg.max_train_samples (a seeded sample, in file order).
    load_data may apply it itself to skip work on rows that would be dropped anyway."""
    if not max_n or n_total <= max_n:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:max_n])


def split_limit(trainer_cfg, split: str) -> int | None:
    """Rows of a split a trainer (TrainerConfig) uses: max_train_samples / max_eval_samples, all of test."""
    return {"train": trainer_cfg.max_train_samples, "val": trainer_cfg.max_eval_samples}.get(split)


def trainer_rows(trainer_cfg, split: str, n_rows: int) -> np.ndarray:
    """Indices of the rows of a split a trainer reads (a seeded subset, in file order); the
    soft-label stage scores exactly the student's when `soft_labels.rows: student`."""
    return subset_indices(n_rows, split_limit(trainer_cfg, split), trainer_cfg.seed)


def batch_tokens(inputs: dict) -> tuple[int, int]:
    """(real, computed) tokens of a collated batch, from its attention_mask ((0, 0) without one)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return 0, 0
    return int(mask.sum()), int(mask.numel())


def to_device(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
