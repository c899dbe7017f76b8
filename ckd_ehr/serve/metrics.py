"""Serving metrics: plain counters (tests, in-process) and, on Ray, Prometheus metrics.

`ServeMetrics` counts in memory; `RayServeMetrics` also exports them through
`ray.util.metrics` beside Ray Serve's own (Ray prefixes custom names with `ray_` on its
Prometheus endpoint, e.g. `ray_ckd_ehr_records_total`):

    ckd_ehr_records_total{model_version, precision}          records scored
    ckd_ehr_batch_size{model_version, precision}             records per forward pass (histogram)
    ckd_ehr_guessed_records_total{model_version}             records answered with the warning that
                                                             nothing in them is known to the model
    ckd_ehr_rejected_requests_total{reason, model_version}   overload, body_too_large,
                                                             too_many_records, record_too_long,
                                                             unauthorized, invalid
    ckd_ehr_model_info{model_version, precision}             1 for the loaded model

Requests shed by Ray Serve's proxy itself (serve.max_queued_requests) are in Ray Serve's
`ray_serve_num_http_error_requests_total{error_code="503"}`.
"""
from __future__ import annotations

from collections import Counter

REJECT_REASONS = ("overload", "body_too_large", "too_many_records", "record_too_long", "unauthorized", "invalid")
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServeMetrics:
    """In-memory counts of what a replica served and rejected."""

    def __init__(self, model_version: str = "", precision: str = "fp32"):
        self.model_version, self.precision = model_version, precision
        self.records = 0
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.rejections: Counter[str] = Counter()
        self.guessed = 0

    def scored(self, n_records: int) -> None:
        """One forward pass over n_records records."""
        self.records += n_records
        self.batches += 1
        self.batch_sizes[n_records] += 1

    def guessed_records(self, n: int) -> None:
        """n records answered although nothing in them is known to the model (a warning each)."""
        self.guessed += n

    def rejected(self, reason: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason '{reason}' (one of {', '.join(REJECT_REASONS)})")
        self.rejections[reason] += 1

    def snapshot(self) -> dict:
        return {"model_version": self.model_version, "precision": self.precision, "records": self.records,
                "batches": self.batches, "batch_sizes": dict(self.batch_sizes), "rejected": dict(self.rejections),
                "guessed": self.guessed}


class RayServeMetrics(ServeMetrics):
    """ServeMetrics that also exports to Prometheus through ray.util.metrics."""

    def __init__(self, model_version: str, precision: str):
        super().__init__(model_version, precision)
        # not at module level: ray, loaded only when this runs
        from ray.util import metrics as m

        tags = {"model_version": model_version, "precision": precision}
        self._records = m.Counter("ckd_ehr_records_total", "Records scored by the student.",
                                  tag_keys=("model_version", "precision"))
        self._records.set_default_tags(tags)
        self._batch = m.Histogram("ckd_ehr_batch_size", "Records per forward pass.", boundaries=BATCH_BOUNDARIES,
                                  tag_keys=("model_version", "precision"))
        self._batch.set_default_tags(tags)
        self._rejected = m.Counter("ckd_ehr_rejected_requests_total", "Requests rejected by the replica, by reason.",
                                   tag_keys=("reason", "model_version"))
        self._rejected.set_default_tags({"model_version": model_version})
        self._guessed = m.Counter("ckd_ehr_guessed_records_total",
                                  "Records answered although nothing in them is known to the model.",
                                  tag_keys=("model_version",))
        self._guessed.set_default_tags({"model_version": model_version})
        info = m.Gauge("ckd_ehr_model_info", "1 for the served model version.", tag_keys=("model_version", "precision"))
        info.set(1, tags=tags)
        self._info = info

    def scored(self, n_records: int) -> None:
        super().scored(n_records)
        self._records.inc(n_records)
        self._batch.observe(n_records)

    def guessed_records(self, n: int) -> None:
        super().guessed_records(n)
        if n:
            self._guessed.inc(n)

    def rejected(self, reason: str) -> None:
        super().rejected(reason)
        self._rejected.inc(1, tags={"reason": reason})
