"""Ray at the edges: start or join a cluster, kept on 127.0.0.1 for local runs."""
from __future__ import annotations

import logging
import os
import re
import sys

from ckd_ehr.config import RayConfig

# Local Ray binds a non-loopback address unless this is set; local runs stay on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _NoColour(logging.Filter):
    """Drops terminal colour codes from a log record (Ray wraps the dashboard address in them
    whatever the stream is): a log written to a file reads as plain text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = ANSI.sub("", record.msg)
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(ANSI.sub("", a) if isinstance(a, str) else a for a in record.args)
        return True


def plain_logs_when_redirected() -> None:
    """When stderr is not a terminal (a log file, CI, `ray job logs`): no colour codes from Ray,
    neither in its workers' line prefixes (RAY_COLOR_PREFIX=0, inherited by the workers) nor in
    its own messages."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    for name in ("ray", "ray._private.worker"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoColour) for f in logger.filters):
            logger.addFilter(_NoColour())


CAPACITY_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for a worker group's resources, read in the driver and propagated by Ray
Train to its controller; training.fit gives up after one such wait when it is set."""


def set_capacity_timeout(seconds: float | None) -> None:
    """`ray.capacity_timeout_s` for the training runs this process starts (see CAPACITY_TIMEOUT_ENV)."""
    if seconds is not None:
        os.environ[CAPACITY_TIMEOUT_ENV] = str(seconds)


def init_ray(cfg: RayConfig | None = None, **kwargs) -> None:
    """Start a local Ray on 127.0.0.1, or join `cfg.address` (`auto` inside `ray job submit`)."""
    # not at module level: ray, loaded only when this runs
    import ray

    cfg = cfg or RayConfig()
    set_capacity_timeout(cfg.capacity_timeout_s)
    if ray.is_initialized():
        return
    plain_logs_when_redirected()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    # A local one-node cluster is never preempted: Ray Train's preemption watcher (one more
    # actor per run) only competes for a laptop's cores and logs an error-level line about its
    # constructor arguments at every start. Set before the local cluster starts so its
    # processes inherit it; a cluster joined by address keeps its own setting.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Weight-loading progress bars (transformers' "Loading weights", the GGUF de-quantisation's
    # tqdm) from every worker interleave into unreadable log lines; the stages print their own
    # progress with a time estimate. TQDM_DISABLE is tqdm's own switch for its default.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        object_store_memory=cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None,
        # The dashboard process serves the state API, which Ray Train's placement-group
        # cleaner needs (without it, resources of stopped Tune trials leak). Loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        **kwargs,
    )
    # Quiet Ray Data's progress bars in logs that are not a terminal.
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.isatty(2)
