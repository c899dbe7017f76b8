"""Training only the top layers: the frozen layers' output computed once per row and cached.

With `train_top_layers: k` a model's embeddings and every layer below its top k are frozen; their
output for a row depends only on the pretrained weights, the row's token ids and the window the
encoder reads them in, so the training loop (ckd_ehr.training.loop) computes it once for every
training and validation row and every step runs only the top k layers and the head on it: no
forward or backward through the frozen part, no optimiser state for it. On a CPU that is most
of a step's cost (docs: bench train). The frozen part runs in eval mode (no dropout), as any
frozen feature extractor does; the uncached model in eval mode gives the same logits and
gradients (tests/modeling/test_frozen.py).

A model that supports it implements `freeze_below(k)`, `bottom(**inputs) -> [B, T, H]` and a
forward that takes `cached=[B, T, H]` in place of the token ids (ckd_ehr.student.model.StudentModel).

LayerCache keeps the states per row on disk (DIR/{digest}.npz, one file per batch of rows:
`key`, `rows` (digests of the token ids), `lengths`, `states` (the rows' states concatenated,
float32 or bfloat16 stored as its uint16 bits)); the key names the model, the number of top
layers, the window and the dtype. Variants reading the same text and later runs with the same
frozen model (seeds of a study, Tune trials) read it instead of recomputing. Files are written
under a temporary name and renamed (storage.py).
"""
from __future__ import annotations

import hashlib
import io
import logging
from typing import Sequence

import numpy as np
import torch

from ckd_ehr import storage
from ckd_ehr.modeling.feature_cache import row_digest
from ckd_ehr.modeling.collate import length_sorted_batches, predict_sorted, pad_batch

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def layer_cache_key(model_key: str, top: int, cache_dtype: str) -> str:
    """The key of a frozen model's states: the model (what decides its bottom layers' output),
    the number of top layers left to train, and the dtype the states are stored in."""
    return f"{model_key}|top{top}|{cache_dtype}"


class LayerCache:
    """Per-row frozen-layer states of one frozen model (`key`) under `directory` (local or URI)."""

    def __init__(self, directory: str, key: str, dtype: torch.dtype):
        self.directory, self.key, self.dtype = directory, key, dtype

    def _cached_rows(self, wanted=None):
        """(row digest, states [t, H]) of every row stored under this key; with `wanted` (a set
        of digests), only the files that hold one of them are read into tensors."""
        if not storage.exists(self.directory):
            return
        for path in storage.list_files(self.directory, ".npz"):
            with np.load(io.BytesIO(storage.read_bytes(path))) as f:
                if str(f["key"]) != self.key:
                    continue
                digests = f["rows"].tolist()
                if wanted is not None and not any(d in wanted for d in digests):
                    continue
                states = _from_numpy(f["states"], self.dtype)
                starts = np.concatenate([[0], np.cumsum(f["lengths"])])
                for d, a, b in zip(digests, starts[:-1], starts[1:]):
                    yield d, states[a:b].clone()

    def lookup(self, rows: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        """Each row's states [t, H] (None where not cached)."""
        wanted: dict[str, list[int]] = {}
        for i, r in enumerate(rows):   # a text can repeat (two visits rendered alike)
            wanted.setdefault(row_digest(r), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(rows)
        for d, states in self._cached_rows(wanted):
            for i in wanted.get(d, ()):
                out[i] = states
        return out

    def load_all(self) -> dict[str, torch.Tensor]:
        """{row digest: states [t, H]} of every row cached under this key (one read of the
        directory, for a reader that does not know its rows in advance: a Ray Data actor)."""
        return dict(self._cached_rows())

    def add(self, rows: Sequence[Sequence[int]], states: Sequence[torch.Tensor]) -> None:
        """Store the states of `rows` (one new file)."""
        if not len(rows):
            return
        digests = np.array([row_digest(r) for r in rows])
        name = hashlib.sha256((self.key + "|" + "".join(digests.tolist())).encode()).hexdigest()[:20]
        buf = io.BytesIO()
        np.savez(buf, key=np.array(self.key), rows=digests, lengths=np.array([len(s) for s in states]),
                 states=_to_numpy(torch.cat([s.to(self.dtype) for s in states])))
        storage.write_bytes(storage.join(self.directory, name + ".npz"), buf.getvalue())


def pad_cached(states: Sequence[torch.Tensor], width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-row states [t_i, H] -> [B, width, H], zero after each row's tokens (the mask hides them)."""
    out = torch.zeros((len(states), width, states[0].shape[-1]), dtype=dtype)
    for i, s in enumerate(states):
        out[i, : s.shape[0]] = s.to(dtype)
    return out


def predict_cached(model, states: Sequence[torch.Tensor], batch_size: int, num_outputs: int,
                   device: str = "cpu", ids: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(outputs [N, num_outputs] float32, padded length per row) of `model(cached=..., attention_mask=...)`
    over per-row frozen states, in batches sorted by length and padded per batch (as
    ckd_ehr.modeling.collate.predict_sorted over token ids); eval mode, inference_mode. `ids`:
    the rows' token ids, passed beside the states (a student's token bag reads them)."""

    out = np.zeros((len(states), num_outputs), dtype=np.float32)
    padded = np.zeros(len(states), dtype=np.int32)
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in length_sorted_batches([s.shape[0] for s in states], batch_size):
                width = max(states[i].shape[0] for i in idx)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for j, i in enumerate(idx):
                    mask[j, : states[i].shape[0]] = 1
                batch = pad_cached([states[i] for i in idx], width)
                extra = {}
                if ids is not None:
                    extra["input_ids"] = torch.zeros((len(idx), width), dtype=torch.long)
                    for j, i in enumerate(idx):
                        extra["input_ids"][j, : len(ids[i])] = torch.as_tensor(list(ids[i]), dtype=torch.long)
                    extra["input_ids"] = extra["input_ids"].to(device)
                out[idx] = model(cached=batch.to(device), attention_mask=mask.to(device), **extra).float().cpu().numpy()
                padded[idx] = width
    finally:
        model.train(was)
    return out, padded


def cached_states(cache: LayerCache, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """{row digest: states} of the rows of `ids` the cache holds (for predict_through_cache)."""
    return {row_digest(x): st for x, st in zip(ids, cache.lookup(ids)) if st is not None}


def predict_through_cache(model, ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int,
                          num_outputs: int, states: dict[str, torch.Tensor], cache: LayerCache | None = None,
                          device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outputs, padded length, from the cache) per token-id row of a model whose bottom is
    frozen (`freeze_below`): rows in `states` ({row digest: states}, LayerCache.load_all) run
    through the top layers only; the others through the whole model, or, given `cache`, through
    the bottom once, whose states are added to it (a later reader of the same rows, evaluate's
    probe row, then needs only the top layers), and the top."""

    found = [states.get(row_digest(x)) for x in ids]
    hit = np.array([f is not None for f in found], dtype=bool)
    out = np.zeros((len(ids), num_outputs), dtype=np.float32)
    padded = np.zeros(len(ids), dtype=np.int32)
    on, off = np.flatnonzero(hit), np.flatnonzero(~hit)
    if len(on):
        out[on], padded[on] = predict_cached(model, [found[i] for i in on], batch_size, num_outputs, device,
                                             [ids[i] for i in on])
    if len(off) and cache is not None:
        rows = [ids[i] for i in off]
        bottom = compute_bottom(model, rows, batch_size, cache.dtype, torch.device(device))
        cache.add(rows, bottom)
        out[off], padded[off] = predict_cached(model, bottom, batch_size, num_outputs, device, rows)
    elif len(off):
        pred = predict_sorted(model, [ids[i] for i in off], pad_token_id, batch_size, num_outputs, device)
        out[off], padded[off] = pred.outputs, pred.padded_length
    return out, padded, hit


def compute_bottom(model, rows: Sequence[Sequence[int]], batch_size: int, dtype: torch.dtype,
                   device: torch.device, autocast: bool = False, progress=None) -> list[torch.Tensor]:
    """The frozen part's states of each row (token id lists), in input order: rows sorted by
    length and padded per batch, each row's states cut to its own tokens, stored in `dtype`."""

    out: list[torch.Tensor | None] = [None] * len(rows)
    order = np.argsort([len(r) for r in rows], kind="stable")
    was = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            inputs = pad_batch([rows[i] for i in idx], 0)   # the pad id: masked, and cut off below
            hidden = model.bottom(**{k: v.to(device) for k, v in inputs.items()}).float().cpu()
            for j, i in enumerate(idx):
                out[i] = hidden[j, : len(rows[i])].to(dtype).clone()
            if progress is not None:
                progress(b + len(idx), len(rows))
    model.train(was)
    return out
