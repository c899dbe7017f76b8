"""The student's token bag: which wordpieces a text holds, in two segments, for a linear path.

A mean of 500 tokens' hidden states keeps little of which items a text names; a logistic
regression on the set of wordpieces does (docs/results.md, "token bag"). With
`student.token_bag` the student adds a linear map of that set to its logits (a wide path
beside the encoder, as in wide-and-deep models): logits = head(pooled) + bag_head(bag).

The bag has two segments of the vocabulary: wordpieces before the knowledge lead (the words
that open EADF's clauses, text.knowledge_lead) and from it on. In one segment a drug the
patient received and the same drug listed in a clause would be one column; the clauses name
the patient's present phenotypes, which is what they add. A text without the lead (plain
text) fills the first segment only. Padding is excluded by the attention mask; the special
tokens ([CLS], [SEP]) are in every row, so their columns are constant and the fit ignores them.

`multi_hot` (torch, batches) and `bag_columns` (one id list) compute the same set; a test checks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ckd_ehr.text import knowledge_lead


@dataclass(frozen=True)
class TokenBag:
    """What the bag needs from the tokenizer: the lead's token ids and the vocabulary size."""

    lead: tuple[int, ...]
    vocab_size: int

    @property
    def width(self) -> int:
        """Columns of the bag: one per wordpiece and segment."""
        return 2 * self.vocab_size


def token_bag_of(tokenizer, lead_text: str) -> TokenBag:
    """The TokenBag of `tokenizer` for a knowledge lead (text.knowledge_lead)."""
    lead = tuple(tokenizer(lead_text, add_special_tokens=False)["input_ids"])
    if not lead:
        raise ValueError(f"token_bag: the knowledge lead {lead_text!r} tokenises to nothing")
    return TokenBag(lead=lead, vocab_size=len(tokenizer))


def token_bag_for(tokenizer, text_cfg) -> TokenBag:
    """The TokenBag of texts rendered with `text_cfg` (its knowledge lead, text.knowledge_lead)."""

    return token_bag_of(tokenizer, knowledge_lead(text_cfg))


def lead_position(ids: Sequence[int], lead: Sequence[int]) -> int:
    """Index of the first occurrence of `lead` in `ids`, len(ids) if none."""
    n, k = len(ids), len(lead)
    first = lead[0]
    for p in range(n - k + 1):
        if ids[p] == first and list(ids[p:p + k]) == list(lead):
            return p
    return n


def bag_columns(ids: Sequence[int], bag: TokenBag) -> np.ndarray:
    """Sorted column indices set to 1 in the bag of one unpadded id list."""
    cut = lead_position(ids, bag.lead)
    arr = np.asarray(ids, dtype=np.int64)
    return np.union1d(arr[:cut], arr[cut:] + bag.vocab_size)


def multi_hot(input_ids: torch.Tensor, attention_mask: torch.Tensor, lead: torch.Tensor, vocab_size: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] ids -> [B, 2 * vocab_size] 0/1 bag (bag_columns of each row, batched)."""
    batch, width = input_ids.shape
    k = lead.numel()
    if width >= k:
        windows = input_ids.unfold(1, k, 1)                                  # [B, T-k+1, k]
        hit = (windows == lead.view(1, 1, k)).all(-1)
        hit = hit & attention_mask[:, : hit.shape[1]].bool()
        pos = torch.where(hit.any(1), hit.float().argmax(1), torch.full((batch,), width, device=hit.device))
    else:
        pos = torch.full((batch,), width, device=input_ids.device)
    segment = (torch.arange(width, device=input_ids.device).view(1, -1) >= pos.view(-1, 1)).long()
    cols = input_ids.long() + segment * vocab_size
    out = torch.zeros((batch, 2 * vocab_size), dtype=dtype, device=input_ids.device)
    out.scatter_add_(1, cols, attention_mask.to(dtype))   # padding adds 0
    return out.clamp_(max=1)
