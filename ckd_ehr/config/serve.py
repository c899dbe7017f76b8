"""Config of the Ray Serve endpoint."""
from __future__ import annotations

from pydantic import Field, model_validator

from .base import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Bind address of the HTTP proxy; loopback by default (patient data)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    max_batch_size: int = Field(32, ge=1)
    """Largest batch `@serve.batch` forms."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a batch waits to fill."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Per-replica concurrency; None = 2 x max_batch_size (must be >= the batch size)."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling floor."""
    max_replicas: int = Field(2, ge=1)
    """Autoscaling ceiling."""
    target_ongoing_requests: float = Field(16, gt=0)
    """Autoscaling target of ongoing requests per replica."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per replica; None = num_cpus rounded (at least 1)."""
    max_records: int = Field(256, ge=1)
    """Most records in one request (more gets 413)."""
    max_text_chars: int = Field(20000, ge=1)
    """Longest record in characters: its free text, or all its structured items together (longer gets 413)."""
    auth_token_env: str = "CKD_EHR_TOKEN"
    """Environment variable that holds the bearer token; unset = no auth."""
    app_name: str = "ckd-ehr"
    """Name of the Serve application."""
    route_prefix: str = "/"
    """Route prefix of the application (the API lives under it)."""
    access_log: bool = True
    """Serve access log: method, route, status and latency per request, never bodies."""

    @model_validator(mode="after")
    def _batch_fits(self):
        # A replica that admits fewer requests than a batch holds never fills a batch and
        # waits out batch_wait_timeout_s on every call: latency explodes.
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"serve.max_batch_size ({self.max_batch_size})")
        if self.min_replicas > self.max_replicas:
            raise ValueError("serve.min_replicas must be <= serve.max_replicas")
        return self

    @property
    def ongoing_requests(self) -> int:
        """max_ongoing_requests, defaulted to twice the batch size."""
        return self.max_ongoing_requests or 2 * self.max_batch_size
