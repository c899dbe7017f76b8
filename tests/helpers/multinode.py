"""A two-node Ray cluster on loopback for the multi-node test, run as its own process
(`python -m helpers.multinode RUN_ROOT TEACHER_DIR STUDENT_DIR`, from tests/): the test
session's own Ray connection stays untouched.

Ray's `ray.cluster_utils.Cluster` starts a head and a worker node on 127.0.0.1 (`ray start
--address` refuses a second node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with it set to 1
Ray rewrites 127.0.0.1 to another address; the Cluster utility does neither). Each node has one
CPU, so the teacher's two workers must sit one on each node.

1. The tiny pipeline to its soft labels, uninterrupted: where the teacher's workers and the
   EADF stage's Ray Data tasks ran (Ray's state API).
2. The same with a fresh run directory, and the worker node killed from a Ray Train callback
   (KillNodeAfterCheckpoint, run by Train's controller once it has registered the checkpoint of
   step KILL_AFTER_STEP), then a node added back. The teacher must resume from that step.
Prints one JSON line: the nodes, the placements, the resumed step and both runs' test soft labels.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from ray.train.v2._internal.execution.callback import ReportCallback

KILL_AFTER_STEP = 4
MARKER_ENV = "CKD_EHR_TEST_KILL_MARKER"


class KillNodeAfterCheckpoint(ReportCallback):
    """On Train's controller: after the checkpoint of step KILL_AFTER_STEP is registered (Train
    runs its checkpoint manager's report hook first), ask the driver to kill the worker node (a
    marker file) and hold the controller until it has, so no later checkpoint is registered
    before the failure. Loaded by Ray Train from RAY_TRAIN_CALLBACKS (a ReportCallback: Train's
    developer API; its user callbacks come only through RunConfig)."""

    def __init__(self):
        self.marker = os.environ.get(MARKER_ENV)

    def after_report(self, training_report, metrics):
        checkpoint = training_report.checkpoint
        if not self.marker or checkpoint is None or metrics[0].get("step") != KILL_AFTER_STEP:
            return
        with open(self.marker, "w") as f:
            f.write(str(KILL_AFTER_STEP))
        deadline = time.time() + 120
        while not os.path.exists(self.marker + ".done") and time.time() < deadline:
            time.sleep(0.1)


def _config(root: str, name: str, address: str, teacher_dir: str, student_dir: str):
    from ckd_ehr.config import PipelineConfig, build

    from helpers.pipeline_configs import small_pipeline_config

    cfg = small_pipeline_config(os.path.join(root, name), teacher_dir, student_dir)
    cfg["ray"] = {"address": address}
    # two one-CPU workers on two one-CPU nodes; dropout off so a resumed run can equal an
    # uninterrupted one (the random state is not part of a checkpoint)
    cfg["teacher"] = {**cfg["teacher"], "num_workers": 2, "cpus_per_worker": 1, "epochs": 10, "max_steps": 12,
                      "max_train_samples": 96, "checkpoint_every_steps": 2, "max_failures": 2,
                      "num_checkpoints_to_keep": 20, "keep_checkpoint": "last", "head_init": "random",
                      "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
    cfg["eadf"] = {**cfg["eadf"], "read_blocks": 2}
    return build(PipelineConfig, cfg)


def _test_soft_labels(cfg) -> dict:
    from ckd_ehr import storage
    from ckd_ehr.contracts import RunLayout

    table = storage.read_parquet(RunLayout(cfg.run_dir).soft_labels("test"), columns=["sample_id", "probs"])
    return dict(zip(table.column("sample_id").to_pylist(), table.column("probs").to_pylist()))


def _placements() -> dict:
    from ray.util.state import list_actors, list_tasks

    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    data = [t for t in list_tasks(limit=10000, detail=True) if "ReadParquet" in t.name or "MapBatches" in t.name]
    return {"train_worker_nodes": sorted({a.node_id for a in workers}),
            "data_task_nodes": sorted({t.node_id for t in data if t.node_id})}


def main(root: str, teacher_dir: str, student_dir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from ckd_ehr.pipeline import run_pipeline

    from helpers.ray_head import free_ports

    start = time.time()
    (dash,) = free_ports(1)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    out: dict = {"nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
    try:
        plain = _config(root, "plain", cluster.address, teacher_dir, student_dir)
        run_pipeline(plain, to_stage="soft_labels")
        out.update(_placements())
        out["plain"] = _test_soft_labels(plain)

        killed = _config(root, "killed", cluster.address, teacher_dir, student_dir)
        marker = os.path.join(root, "kill.marker")
        os.environ[MARKER_ENV] = marker
        os.environ["RAY_TRAIN_CALLBACKS"] = "helpers.multinode.KillNodeAfterCheckpoint"
        errors: list[BaseException] = []

        def pipeline():
            try:
                run_pipeline(killed, to_stage="soft_labels")
            except BaseException as exc:   # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=pipeline, daemon=True)
        thread.start()
        # main thread: Cluster.add_node installs signal handlers
        while not os.path.exists(marker) and thread.is_alive():
            time.sleep(0.1)
        if os.path.exists(marker):
            cluster.remove_node(worker, allow_graceful=False)
            out["killed_after_step"] = KILL_AFTER_STEP
            worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            open(marker + ".done", "w").close()
        thread.join()
        if errors:
            raise errors[0]
        with open(os.path.join(killed.run_dir, "teacher", "artifact", "teacher.json")) as f:
            metrics = json.load(f)["metrics"]
        out.update(resumed_from_step=metrics.get("resumed_from_step"), final_step=metrics.get("final_step"),
                   killed=_test_soft_labels(killed), seconds=round(time.time() - start, 1))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print("MULTINODE " + json.dumps(main(*sys.argv[1:4])), flush=True)
