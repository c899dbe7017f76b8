"""Config of the Ray Serve endpoint."""
from __future__ import annotations

from pydantic import Field

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
    max_records: int = Field(256, ge=1)
    """Most records in one request (more gets 413)."""
    max_text_chars: int = Field(20000, ge=1)
    """Longest free text or rendered record (longer gets 413)."""
    auth_token_env: str = "CKD_EHR_TOKEN"
    """Environment variable that holds the bearer token; unset = no auth."""
