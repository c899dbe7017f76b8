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
    capacity_timeout_s: float | None = Field(1800.0, gt=0)
    """How long a training run waits for the cluster to give it its workers (at start, and after
    losing a node) before the stage fails, saying what it waited for. The default leaves an
    autoscaler room to start GPU nodes. None: Ray Train's own behaviour (60 s a try, retried
    forever, the job RUNNING meanwhile)."""
