"""A Ray cluster on loopback whose worker node does not see the driver's run_dir, for the
shared-storage check's test (`python -m helpers.unshared_node ROOT`, from tests/, as root).

On one machine every node sees the same disk, so the worker node is started by `ray start` in
a private mount namespace (`unshare --mount`) with an empty tmpfs over ROOT: the files the driver
writes under ROOT are not there for it, as on a cluster whose run_dir is a node-local disk. The
head is Ray's `cluster_utils.Cluster` on 127.0.0.1; `ray start` joins it with an explicit
--node-ip-address 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 lets it join at all).
Prints one JSON line: the nodes, and what check_shared_run_dir said of ROOT/run.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time


def main(root: str) -> dict:
    import psutil
    import ray
    from ray.cluster_utils import Cluster

    from ckd_ehr.ray_utils import StorageNotShared, check_shared_run_dir

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    ray.init(address=cluster.address)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    script = (f"mount -t tmpfs ckd-ehr-unshared {shlex.quote(root)} && exec {shlex.quote(ray_cli)} start "
              f"--address {shlex.quote(cluster.address)} --node-ip-address 127.0.0.1 --num-cpus 1 --block")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
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
    if shutil.which("unshare") is None:
        sys.exit("unshare not found")
    print("UNSHARED " + json.dumps(main(sys.argv[1])), flush=True)
