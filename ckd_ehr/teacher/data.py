"""Teacher examples, per-batch padding and prediction; prompts and their tokenisation are
ckd_ehr.modeling.prompts' (shared with EADF's text-fit report).

Batches are padded to their own longest sample (right padding), never to max_length
(ckd_ehr.modeling.collate: padding and length-sorted prediction, shared with the student).
`encode_texts` is the one way to turn sample texts into teacher token ids (training,
validation, predict_logits, soft labels): over-long prompts lose instruction before input.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ckd_ehr.modeling.collate import pad_batch, pad_id, predict_sorted, stack_rows
from ckd_ehr.modeling.prompts import encode_texts

log = logging.getLogger(__name__)

class Collate:
    """Examples {'input_ids': list[int], 'labels': 25 ints} -> (inputs, labels float tensor).
    A class, not a closure, so it pickles into Ray Train workers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return pad_batch([e["input_ids"] for e in examples], self.pad_token_id), \
            stack_rows([e["labels"] for e in examples])


def make_examples(texts: Sequence[str], labels, tokenizer, max_length: int, use_chat_template: bool,
                  instruction_kind: str = "paper") -> list[dict]:
    """Training/validation examples: token ids, length (for grouping) and the 25 labels."""
    ids = encode_texts(list(texts), tokenizer, max_length, use_chat_template, instruction_kind)
    labels = np.asarray(labels, dtype=np.int8)
    return [{"input_ids": x, "length": len(x), "labels": labels[i]} for i, x in enumerate(ids)]


def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 1024,
                   device: str = "cpu", use_chat_template: bool | None = None,
                   instruction_kind: str | None = None) -> np.ndarray:
    """Logits [N, 25] in input order. Sorts by length and pads per batch (the in-process
    reference that Ray Data actors reuse). `use_chat_template` / `instruction_kind` None: as
    the teacher was trained (`model.use_chat_template` / `model.instruction_kind`, set by
    load_teacher), else True / `paper`."""
    texts = list(texts)
    if use_chat_template is None:
        use_chat_template = getattr(model, "use_chat_template", True)
    if instruction_kind is None:
        instruction_kind = getattr(model, "instruction_kind", "paper")
    if not texts:
        return np.zeros((0, getattr(getattr(model, "head", None), "num_labels", 25)), dtype=np.float32)
    ids = encode_texts(texts, tokenizer, max_length, use_chat_template, instruction_kind)
    num_labels = getattr(getattr(model, "head", None), "num_labels", None) or model.num_labels  # MLAPH or generative
    pred = predict_sorted(model, ids, pad_id(tokenizer), batch_size, num_labels, device)
    log.info("predict_logits: %d texts, padding efficiency %.3f (%d real / %d computed tokens)", len(ids),
             pred.padding_efficiency, pred.real_tokens, pred.computed_tokens)
    return pred.outputs
