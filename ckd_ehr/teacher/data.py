"""Teacher prompts, tokenisation and per-batch padding.

Prompt = the instruction naming the 25 phenotypes + the sample's text, wrapped in the
tokenizer's chat template where it has one, with the generation prompt added so the last
token is the start of the assistant turn (what `last` pooling reads).

Batches are padded to their own longest sample (right padding), never to max_length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..text import instruction

# Tokens kept from the END of an over-long prompt: the chat template's closing tokens and the
# assistant turn start must survive truncation, or `last` pooling reads a mid-text token.
KEEP_TAIL_TOKENS = 16


def build_prompts(texts: list[str], tokenizer, use_chat_template: bool) -> list[str]:
    """Instruction + input per text; through the chat template when asked and available."""
    instr = instruction()
    out = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for text in texts:
        content = f"{instr}\n{text}"
        if use_chat_template and has_template:
            content = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        out.append(content)
    return out


def encode(prompts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per prompt, unpadded. Over-long prompts keep their head and their last
    KEEP_TAIL_TOKENS tokens (the chat template adds its own special tokens as text)."""
    ids = tokenizer(prompts, add_special_tokens=False, truncation=False)["input_ids"]
    tail = min(KEEP_TAIL_TOKENS, max_length // 4)
    return [x if len(x) <= max_length else x[: max_length - tail] + x[-tail:] for x in ids]


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def pad_batch(seqs: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of this batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Collate:
    """Examples {'input_ids': list[int], 'labels': 25 ints} -> (inputs, labels float tensor).
    A class, not a closure, so it pickles into Ray Train workers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = pad_batch([e["input_ids"] for e in examples], self.pad_token_id)
        labels = torch.as_tensor(np.asarray([e["labels"] for e in examples], dtype=np.float32))
        return inputs, labels


def make_examples(texts: Sequence[str], labels, tokenizer, max_length: int, use_chat_template: bool) -> list[dict]:
    """Training/validation examples: token ids, length (for grouping) and the 25 labels."""
    ids = encode(build_prompts(list(texts), tokenizer, use_chat_template), tokenizer, max_length)
    labels = np.asarray(labels, dtype=np.int8)
    return [{"input_ids": x, "length": len(x), "labels": labels[i]} for i, x in enumerate(ids)]


@torch.no_grad()
def predict_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 1024,
                   device: str = "cpu", use_chat_template: bool | None = None) -> np.ndarray:
    """Logits [N, 25] in input order. Sorts by length and pads per batch (the in-process
    reference that Ray Data actors reuse). `use_chat_template` None: as the teacher was
    trained (`model.use_chat_template`, set by load_teacher), else True."""
    texts = list(texts)
    if use_chat_template is None:
        use_chat_template = getattr(model, "use_chat_template", True)
    if not texts:
        return np.zeros((0, getattr(getattr(model, "head", None), "num_labels", 25)), dtype=np.float32)
    ids = encode(build_prompts(texts, tokenizer, use_chat_template), tokenizer, max_length)
    order = np.argsort([-len(x) for x in ids], kind="stable")
    pid = pad_id(tokenizer)
    out: list[np.ndarray | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = pad_batch([ids[i] for i in idx], pid)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        logits = logits.float().cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = logits[j]
    model.train(was_training)
    return np.stack(out).astype(np.float32)
