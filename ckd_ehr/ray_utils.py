"""Ray at the edges: start or join a cluster, kept on 127.0.0.1 for local runs."""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import uuid

from ckd_ehr import storage
from ckd_ehr.config import RayConfig

# Local Ray binds a non-loopback address unless this is set; local runs stay on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


log = logging.getLogger(__name__)

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


class StorageNotShared(RuntimeError):
    """A local run_dir that some node of the cluster does not see."""


def _read_marker(path: str) -> tuple[str, str | None]:
    try:
        with open(path) as f:
            return socket.gethostname(), f.read()
    except OSError:
        return socket.gethostname(), None


def check_shared_run_dir(run_dir: str, timeout_s: float = 120.0, what: str = "run_dir") -> None:
    """On a cluster of more than one node, a local run_dir must hold the same files on every
    node (a shared volume mounted at the same path): the driver writes a marker into it and a
    task pinned to each node alive now reads it back. StorageNotShared names the nodes that do
    not see it (or did not answer). A URI (s3://...) passes: every node reads it alike; a node
    that joins later (an autoscaler's) is not checked."""
    # not at module level: ray, loaded only when this runs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if (storage.is_uri(run_dir) and not run_dir.startswith("file://")) or len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    marker = storage.join(run_dir if storage.is_uri(run_dir) else os.path.abspath(run_dir), f".shared-check-{token}")
    storage.makedirs(run_dir)
    storage.write_text(marker, token)
    local = marker.removeprefix("file://")
    read = ray.remote(num_cpus=0)(_read_marker)
    try:
        refs = {n["NodeID"]: read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                          max_retries=0).remote(local) for n in nodes}
        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            ray.cancel(ref, force=True)
        blind = []
        for n in nodes:
            ref = refs[n["NodeID"]]
            try:
                host, seen = ray.get(ref) if ref in ready else (f"no answer in {timeout_s:.0f} s", None)
            except Exception as exc:   # the node died, or its task could not run there
                host, seen = f"failed: {type(exc).__name__}", None
            if seen != token:
                blind.append(f"{n['NodeManagerAddress']} ({host}, node {n['NodeID'][:8]})")
    finally:
        storage.remove(marker)
    if blind:
        raise StorageNotShared(
            f"{what} {run_dir} is not shared: {len(blind)} of {len(nodes)} nodes do not see the files the driver "
            f"writes there: {', '.join(blind)}; mount one shared volume at that path on every node, or use "
            "s3://... (--run-dir or --set run_dir=...)")
    log.info("%s %s: the same files on all %d nodes", what, run_dir, len(nodes))
