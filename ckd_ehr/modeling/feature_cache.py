"""Frozen pooled features, cached per row.

A frozen model's pooled features of a row depend only on the model (with its pooling) and the
row's token ids. Under `head_init: probe` several passes read the same rows with the same
frozen model: the probe of each student variant reading a text (hard_eadf and ckd_ehr share
EADF text), a checkpoint that kept its probe (step 0: no update applied, so the model IS the
frozen model plus the probe) scoring test, and the soft labels of a teacher that kept its
probe. The cache makes each row's features a one-time cost.

Layout: DIR/{digest}.npz, each file one batch of rows: `key` (the feature key: model, pooling,
anything else that changes the features), `rows` (one digest of each row's token ids) and
`features` [N, H] float32. Files are written under a temporary name and renamed (storage.py),
so a reader never sees half a file; files of other keys are ignored.
"""
from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np

from ckd_ehr import storage


def row_digest(ids: Sequence[int]) -> str:
    """A row's identity for the cache: its token ids (int64 bytes), hashed."""
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:24]


class FeatureCache:
    """Per-row features of one frozen model (`key`) under `directory` (local or URI)."""

    def __init__(self, directory: str, key: str):
        self.directory, self.key = directory, key

    def _read(self) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for path in storage.list_files(self.directory, ".npz"):
            with np.load(io.BytesIO(storage.read_bytes(path))) as f:
                if str(f["key"]) != self.key:
                    continue
                for digest, vec in zip(f["rows"].tolist(), f["features"]):
                    found[digest] = vec
        return found

    def lookup(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray | None, np.ndarray]:
        """(features [N, H] with zeros where missing, or None if no row is cached; found [N] bool)."""
        digests = [row_digest(r) for r in rows]
        cached = self._read()
        found = np.array([d in cached for d in digests], dtype=bool)
        if not found.any():
            return None, found
        width = len(next(iter(cached.values())))
        out = np.zeros((len(rows), width), dtype=np.float32)
        for i, d in enumerate(digests):
            if d in cached:
                out[i] = cached[d]
        return out, found

    def add(self, rows: Sequence[Sequence[int]], features: np.ndarray) -> None:
        """Store the features of `rows` (one new file; rows already cached are simply repeated)."""
        if not len(rows):
            return
        features = np.asarray(features, dtype=np.float32)
        if features.shape[0] != len(rows):
            raise ValueError(f"{len(rows)} rows but {features.shape[0]} feature vectors")
        digests = np.array([row_digest(r) for r in rows])
        name = hashlib.sha256((self.key + "|" + "".join(digests.tolist())).encode()).hexdigest()[:20]
        buf = io.BytesIO()
        np.savez(buf, key=np.array(self.key), rows=digests, features=features)
        storage.write_bytes(storage.join(self.directory, name + ".npz"), buf.getvalue())
