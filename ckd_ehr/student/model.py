"""The student: any Hugging Face encoder (AutoModel) + one linear layer to 25 logits.

Pooling is configurable and defaults to a mask-aware mean of the last hidden states:
MiniLM (the embedded default) was trained as a sentence encoder with mean pooling, and
a mean over the true tokens (pads excluded) does not depend on which side is padded.
`cls` takes the [CLS] hidden state (position 0, the classic BERT classifier input).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..phenotypes import NUM_PHENOTYPES
from ..models import resolve_model_path

HEAD_FILE = "head.safetensors"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] hidden states -> [B, H] sentence vectors."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-pad row (never produced by the tokenizer) would divide by zero
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling '{how}' (mean or cls)")


class StudentModel(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str = "mean", num_labels: int = NUM_PHENOTYPES):
        super().__init__()
        # BERT's pooler (tanh layer over [CLS], trained for next-sentence prediction) is not
        # used by our pooling: dropped, so DDP sees no parameters without gradients.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        kw = {"token_type_ids": extra["token_type_ids"]} if "token_type_ids" in extra else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return self.head(pool(out.last_hidden_state, attention_mask, self.pooling))


def build_student(model: str, pooling: str = "mean", seed: int = 0, dtype: torch.dtype = torch.float32) -> StudentModel:
    """Pretrained encoder from `model` (directory, cached hub id or `pkg:NAME`), fresh head."""
    from transformers import AutoModel

    path = resolve_model_path(model)
    encoder = AutoModel.from_pretrained(path, dtype=dtype)
    torch.manual_seed(seed)  # the head's initialisation is the only random part
    return StudentModel(encoder, pooling=pooling)


def save_student(model: StudentModel, out_dir: str | os.PathLike) -> None:
    """`model/` (encoder save_pretrained) + `head.safetensors` under `out_dir` (local)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    model.encoder.save_pretrained(out / "model")
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / HEAD_FILE))


def load_student_model(in_dir: str | os.PathLike, pooling: str = "mean", device: str = "cpu") -> StudentModel:
    """Inverse of save_student."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    in_dir = Path(in_dir)
    encoder = AutoModel.from_pretrained(in_dir / "model")
    model = StudentModel(encoder, pooling=pooling)
    model.head.load_state_dict(load_file(str(in_dir / HEAD_FILE)))
    return model.to(device).eval()


def predict_ids(model: StudentModel, input_ids: list[list[int]], pad_id: int, batch_size: int = 32,
                device: str = "cpu") -> "np.ndarray":
    """[N, 25] probabilities of token id lists. Sorted by length and padded per batch; the
    same function serves training-time evaluation, test predictions and the loaded artifact,
    so they agree exactly."""
    import numpy as np

    out = np.zeros((len(input_ids), model.head.out_features), dtype=np.float32)
    order = np.argsort([len(x) for x in input_ids], kind="stable")
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(input_ids[i]) for i in idx)
            x = torch.full((len(idx), width), pad_id, dtype=torch.long)
            m = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(input_ids[i])] = torch.tensor(input_ids[i], dtype=torch.long)
                m[r, : len(input_ids[i])] = 1
            logits = model(x.to(device), m.to(device))
            out[idx] = torch.sigmoid(logits.float()).cpu().numpy()
    model.train(was_training)
    return out
