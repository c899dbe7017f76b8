"""Units: the clinical items of a text (ckd_ehr.text.text_units), the common ground on which a
decoder teacher and an encoder student, who share neither tokenizer, layers nor heads, are
compared (multi-granularity distillation, docs/method.md).

- `token_units`: a tokenizer's offset mapping + unit spans -> the unit of each token (-1: a
  token of the template, the instruction or a special token);
- `unit_attention`: attention over tokens [B, T, K] summed per unit and renormalised over the
  units -> [B, K, W] (a distribution over units per label);
- `unit_vectors` / `unit_relations`: the mean hidden state of each unit's tokens, then the
  row-softmax of scaled unit-by-unit dot products -> [B, W, W], whatever the hidden sizes;
- `restrict`: a stored distribution (over the teacher's units) cut to the units the student
  also sees and renormalised. Restricting a softmax to a subset and renormalising equals the
  softmax over that subset, so a relation stored as probabilities loses nothing.

Plain numpy and torch: the soft-label stage (teacher targets) and the student's loss share it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

NO_UNIT = -1


def token_units(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Unit index (into `spans`) of each token, or NO_UNIT. A token belongs to the unit its
    characters overlap most (a byte-level BPE token may carry the space before an item; a
    token of zero width, such as a special token, belongs to none)."""
    out = np.full(len(offsets), NO_UNIT, dtype=np.int32)
    if not len(offsets) or not len(spans):
        return out
    tok = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    uni = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    overlap = (np.minimum(tok[:, None, 1], uni[None, :, 1]) - np.maximum(tok[:, None, 0], uni[None, :, 0]))
    best = overlap.argmax(1)
    hit = overlap[np.arange(len(tok)), best] > 0
    out[hit] = best[hit]
    return out


def _one_hot(units: torch.Tensor, n_units: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] unit indices (NO_UNIT allowed) -> [B, T, W] membership."""
    idx = units.long().clamp_min(0)
    hot = torch.nn.functional.one_hot(idx, num_classes=max(1, n_units))[..., :n_units].to(dtype)
    return hot * (units >= 0).unsqueeze(-1).to(dtype)


def unit_attention(attention: torch.Tensor, units: torch.Tensor, n_units: int, eps: float = 1e-12) -> torch.Tensor:
    """[B, T, K] attention over tokens -> [B, K, W]: summed per unit, renormalised over the units
    (a row with no unit gets zeros)."""
    summed = torch.einsum("btk,btw->bkw", attention.float(), _one_hot(units, n_units, torch.float32))
    return summed / summed.sum(-1, keepdim=True).clamp_min(eps)


def unit_vectors(hidden: torch.Tensor, units: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, W, H] mean hidden state of each unit's tokens, [B, W] True where the unit has tokens)."""
    hot = _one_hot(units, n_units, torch.float32)
    counts = hot.sum(1)                                             # [B, W]
    vectors = torch.einsum("btw,bth->bwh", hot, hidden.float()) / counts.clamp_min(1.0).unsqueeze(-1)
    return vectors, counts > 0


def unit_relations(vectors: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, W, W]: row-softmax of v_i . v_j / sqrt(H) over the present units (MiniLM's
    value-relation, on units instead of tokens); rows of absent units are zeros."""
    scores = torch.einsum("bih,bjh->bij", vectors, vectors) / math.sqrt(vectors.shape[-1])
    scores = scores.masked_fill(~present.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)          # a row of all -inf: zeros
    return probs * present.unsqueeze(-1)


def restrict(dist: np.ndarray, keys: Sequence[str], keep: Sequence[str], square: bool = False,
             eps: float = 1e-12) -> np.ndarray:
    """`dist` [..., W] over `keys` -> [..., len(keep)] over `keep` (each key of keep must be in
    keys), renormalised along the last axis; `square`: also cut the rows ([W, W] -> [W', W'])."""
    index = {k: i for i, k in enumerate(keys)}
    cols = np.asarray([index[k] for k in keep], dtype=np.int64)
    out = np.asarray(dist, dtype=np.float32)[..., cols]
    if square:
        out = out[cols]
    total = out.sum(-1, keepdims=True)
    return np.where(total > eps, out / np.maximum(total, eps), 0.0).astype(np.float32)
