"""Token ids -> padded batches, and batched prediction sorted by length.

Every model here reads right-padded batches padded to their own longest row (never to
max_length) with an attention mask, and pools each row at its true length, so padding does
not change a row's outputs. Prediction sorts rows by length (longest first: the widest batch,
the one that could run out of memory, comes first) so each batch pads little, and returns the
outputs in input order. One implementation for the teacher (`predict_logits`), the soft-label
actors (`score_ids`) and the student (`predict_ids`); the training loop's validation batches
(`ckd_ehr.training.eval_batches`) use the same longest-first order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its end-of-sequence id (decoder LLMs often have no pad)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def pad_batch(seqs: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this batch: {'input_ids', 'attention_mask'} [B, T] long."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def stack_rows(rows: Sequence, dtype=np.float32) -> torch.Tensor:
    """Per-example vectors (labels, teacher outputs) -> one [B, K] tensor."""
    return torch.from_numpy(np.stack(list(rows)).astype(dtype))


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices sorted by length, longest first (ties in input order), cut into batches."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def padding_efficiency(real_tokens: int, computed_tokens: int) -> float:
    """Real tokens / computed tokens (batch rows x padded width); 1.0 = no padding."""
    return float(real_tokens) / computed_tokens if computed_tokens else float("nan")


@dataclass
class SortedPredictions:
    """What `predict_sorted` returns; every array is in input order."""

    outputs: np.ndarray
    """[N, K] float32: the model's outputs (after `activation`, if one was given)."""
    padded_length: np.ndarray
    """[N] int32: the padded width of the batch each row was computed in."""
    real_tokens: int
    computed_tokens: int

    @property
    def padding_efficiency(self) -> float:
        return padding_efficiency(self.real_tokens, self.computed_tokens)


def predict_sorted(model: torch.nn.Module, ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int,
                   num_outputs: int, device: str = "cpu",
                   activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SortedPredictions:
    """`model(input_ids, attention_mask)` over token id lists, in batches sorted by length and
    padded per batch; outputs in input order. The model runs in eval mode (its training mode
    is restored after) under inference_mode. `activation` (e.g. torch.sigmoid) is applied to
    each batch's float32 outputs; `num_outputs` gives the width of an empty result."""
    n = len(ids)
    out = np.zeros((n, num_outputs), dtype=np.float32)
    padded = np.zeros(n, dtype=np.int32)
    computed = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in length_sorted_batches([len(x) for x in ids], batch_size):
                batch = pad_batch([ids[i] for i in idx], pad_token_id)
                y = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
                if activation is not None:
                    y = activation(y)
                out[idx] = y.cpu().numpy()
                padded[idx] = batch["input_ids"].shape[1]
                computed += batch["input_ids"].numel()
    finally:
        model.train(was_training)
    return SortedPredictions(out, padded, int(sum(len(x) for x in ids)), computed)
