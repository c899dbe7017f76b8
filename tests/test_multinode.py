"""Multi-node for real, on this machine: a head and a worker node on 127.0.0.1, one CPU each
(tests/helpers/multinode.py, in its own process). The tiny pipeline's teacher puts a worker on
each node and EADF's Ray Data tasks run on both; then, in a second run, the worker node is killed
from a Ray Train callback once the checkpoint of step 4 is registered, and a node is added back:
the teacher resumes from step 4 (training its step 5 next) and its test soft labels equal the
uninterrupted run's to 1e-4."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers.multinode import KILL_AFTER_STEP
from helpers.paths import REPO


@pytest.mark.slow
def test_two_nodes_spread_the_work_and_a_lost_node_resumes_from_the_last_checkpoint(tmp_path, tiny_qwen_dir,
                                                                                     tiny_bert_dir):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # not the session's cluster
    proc = subprocess.run([sys.executable, "-m", "helpers.multinode", str(tmp_path), str(tiny_qwen_dir),
                           str(tiny_bert_dir)], cwd=REPO / "tests", env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MULTINODE ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-5000:])
    out = json.loads(lines[-1].removeprefix("MULTINODE "))
    assert len(out["nodes"]) == 2
    assert out["train_worker_nodes"] == out["nodes"], out      # a teacher worker on each node
    assert out["data_task_nodes"] == out["nodes"], out         # EADF's Ray Data tasks on both
    assert out["killed_after_step"] == KILL_AFTER_STEP
    assert out["resumed_from_step"] == KILL_AFTER_STEP and out["final_step"] == 12, out
    ids = sorted(out["plain"])
    assert ids == sorted(out["killed"])
    plain = np.array([out["plain"][i] for i in ids])
    killed = np.array([out["killed"][i] for i in ids])
    assert np.abs(plain - killed).max() <= 1e-4
    print(f"multi-node run: {out['seconds']} s")
