"""Hidden states [B, T, H] + attention mask [B, T] -> what a classification head reads.

- `last`: each row's TRUE last token, found from the attention mask, so it is right whatever
  the padding side (the teacher: a decoder LLM whose last prompt token opens the answer);
- `mean`: the mean over the attended tokens only (pads excluded; an all-pad row, which no
  tokenizer produces, gives zeros rather than a division by zero);
- `cls`: position 0 (BERT's [CLS]), the mask is not read;
- `label_attention`: one learned query per label attends over the attended tokens, giving
  one vector per label [B, K, H] (the teacher's MLAPH projects each with its own weights).

Used by the teacher's head (ckd_ehr.teacher.model.MLAPH) and the student
(ckd_ehr.student.model.StudentModel). The student's Hugging Face export
(ckd_ehr.student.hf_modeling) repeats `mean` and `cls` in its own file because transformers
loads that file alone (trust_remote_code); the export test checks that it gives the
artifact's probabilities.
"""
from __future__ import annotations

import math

import torch

POOLINGS = ("last", "mean", "cls")
"""Poolings to a single vector per row [B, H]."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def last_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    return hidden[:, 0]


_POOLS = {"last": last_pool, "mean": mean_pool, "cls": cls_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H] by `how` (one of POOLINGS)."""
    if how not in _POOLS:
        raise ValueError(f"pooling {how!r} has no single pooled vector (one of {', '.join(POOLINGS)})")
    return _POOLS[how](hidden, attention_mask)


def label_attention_weights(hidden: torch.Tensor, attention_mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[B, T, K]: per label k, softmax(h . q_k / sqrt(H)) over the attended tokens (pads get 0).
    Zero queries give uniform weights: label attention then computes the mean pool."""
    mask = attention_mask.to(hidden.device).bool()
    scores = torch.einsum("blh,kh->blk", hidden, queries) / math.sqrt(hidden.shape[-1])
    scores = scores.masked_fill(~mask.unsqueeze(-1), torch.finfo(scores.dtype).min)
    return scores.softmax(dim=1)


def label_attention_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[B, T, H] -> [B, K, H]: the label_attention_weights-weighted mean of the token states."""
    return torch.einsum("blk,blh->bkh", label_attention_weights(hidden, attention_mask, queries), hidden)
