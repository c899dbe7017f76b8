"""The serve API's backend in-process, for tests: one forward per request, no Ray Serve.
The same `render_and_predict` the deployment's batch loop calls."""
from __future__ import annotations

import asyncio
import threading

from ckd_ehr.serve.api import ModelInfo, Record, render_and_predict
from ckd_ehr.serve.metrics import ServeMetrics


class LocalBackend:
    """The API backend in-process (tests, benchmark ceiling): one forward per request."""

    def __init__(self, predictor, info: ModelInfo, batch_size: int = 32, metrics: ServeMetrics | None = None):
        self.predictor, self.info, self.batch_size = predictor, info, batch_size
        self.metrics = metrics or ServeMetrics(info.artifact_id, getattr(predictor, "precision", "fp32"))
        self._lock = threading.Lock()  # one forward (and one tokenizer user) at a time

    def _forward(self, records: list[Record]):
        with self._lock:
            out = render_and_predict(records, self.info, lambda t: self.predictor.predict_proba(t, self.batch_size))
        self.metrics.scored(len(records))
        return out

    async def predict(self, records: list[Record]):
        return await asyncio.to_thread(self._forward, records)
