"""Config of Ray Tune searches."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckd_ehr.config.base import Section


class TuneConfig(Section):
    target: Literal["teacher", "student"] = "student"
    """What a search trains: the teacher (LoRA space) or the student (distillation space)."""
    num_samples: int = Field(8, ge=1)
    """Trials to sample from the space."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """ASHA stops weak trials early; FIFO runs every trial to the end."""
    metric: Literal["val_macro_f1", "val_macro_auroc"] | None = None
    """Metric maximised; None takes the space file's `metric` (val_macro_auroc if it names none).
    Short runs such as the demo predict every phenotype absent at 0.5, so macro-F1 is 0 for
    every trial there: set val_macro_auroc."""
    grace_period: int = Field(1, ge=1)
    """Epochs a trial runs before ASHA may stop it."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Concurrent trials; None sizes it to the cluster's CPUs (and GPUs) when the search starts,
    which on a cluster that scales from zero is the head's: set it there."""
    cpus_per_trial: float = Field(1.0, gt=0)
    """CPUs per trial, all told (a trial is one Train worker plus a waiting trial process)."""
    gpus_per_trial: float = Field(0.0, ge=0, le=1)
    """GPUs per trial: 0 trains on CPU; a share below 1 packs several trials on one GPU."""
    max_failures: int = Field(1, ge=0)
    """Retries of a failed trial."""
