"""Config of how the pipeline reaches Ray."""
from __future__ import annotations

from pydantic import Field

from ckd_ehr.config.base import Section


class RayConfig(Section):
    address: str | None = None
    """Ray cluster address (`auto`, `ray://host:10001`); empty starts a local Ray on 127.0.0.1."""
    num_cpus: int | None = Field(None, gt=0)
    """CPUs of a local Ray (default: all cores)."""
    object_store_memory_mb: int | None = Field(None, gt=0)
    """Object store size of a local Ray, in MiB."""
