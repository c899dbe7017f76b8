"""A Ray cluster on loopback whose worker node does not see the driver's run_dir, for the
shared-storage check's test (`python -m helpers.unshared_node ROOT`, from tests/, as root).

On one machine every node sees the same disk, so the worker node runs in a private mount
namespace (`unshare --mount`) with an empty tmpfs over ROOT: the files the driver writes under
ROOT are not there for it, as on a cluster whose run_dir is a node-local disk. The head is Ray's
`cluster_utils.Cluster` on 127.0.0.1; the worker node is started the way its `add_node` starts
one (a `ray._private.node.Node` joining the head's GCS), by this module run with `--join`
inside the namespace: `ray start --address` would not stay on loopback (it refuses a second
node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and rewrites 127.0.0.1 to another address
under 1). Prints one JSON line: the nodes, and what check_shared_run_dir said of ROOT/run.
"""
from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # before Ray is imported: it reads it once

import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def join(gcs_address: str) -> None:
    """Inside the namespace: a one-CPU worker node on 127.0.0.1 joined to the head; runs until killed."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1", gcs_address=gcs_address, num_cpus=1, num_gpus=0,
        object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
        include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    while True:
        time.sleep(3600)


def main(root: str) -> dict:
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from ckd_ehr.ray_utils import StorageNotShared, check_shared_run_dir

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    ray.init(address=cluster.address)
    script = (f"mount -t tmpfs ckd-ehr-unshared {shlex.quote(root)} && exec {shlex.quote(sys.executable)} "
              f"-m helpers.unshared_node --join {shlex.quote(cluster.address)}")
    env = dict(os.environ)
    log_path = os.path.join(os.path.dirname(root.rstrip("/")), "unshared_node.log")   # outside the tmpfs
    with open(log_path, "w") as log:
        node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    out: dict = {}
    try:
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if node.poll() is not None or time.time() > deadline:
                with open(log_path) as f:
                    raise RuntimeError(f"the unshared node did not join: {f.read()[-3000:]}")
            time.sleep(0.5)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        try:
            check_shared_run_dir(os.path.join(root, "run"))
            out["refused"] = None
        except StorageNotShared as exc:
            out["refused"] = str(exc)
        out["markers_left"] = [n for n in os.listdir(os.path.join(root, "run")) if n.startswith(".shared-check")]
    finally:
        try:
            try:
                procs = psutil.Process(node.pid).children(recursive=True) + [psutil.Process(node.pid)]
            except psutil.NoSuchProcess:   # it already ended (did not join)
                procs = []
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        finally:
            ray.shutdown()
            cluster.shutdown()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--join":
        join(sys.argv[2])
    if shutil.which("unshare") is None:
        sys.exit("unshare not found")
    print("UNSHARED " + json.dumps(main(sys.argv[1])), flush=True)
