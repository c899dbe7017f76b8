"""ray_utils: the shared-storage check refuses a run_dir some node does not see (a real second
node in a private mount namespace: tests/helpers/unshared_node.py). Its passing side runs in
every multi-node pipeline (tests/test_multinode.py: two nodes, one disk)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers.paths import REPO


def _can_unshare_mounts() -> bool:
    """Root with the right to make a mount namespace (a container without CAP_SYS_ADMIN has not)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare_mounts(), reason="a node in its own mount namespace needs root, unshare "
                                                      "and the right to make mount namespaces")
def test_a_run_dir_one_node_does_not_see_is_refused_naming_the_node(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # not the session's cluster
    root = tmp_path / "shared"
    root.mkdir()
    proc = subprocess.run([sys.executable, "-m", "helpers.unshared_node", str(root)], cwd=REPO / "tests",
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("UNSHARED ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:] + proc.stderr[-5000:])
    out = json.loads(lines[-1].removeprefix("UNSHARED "))
    assert out["nodes"] == 2
    refused = out["refused"]
    assert refused is not None, "a node without the driver's files was let through"
    assert f"run_dir {root / 'run'} is not shared: 1 of 2 nodes do not see" in refused and "127.0.0.1" in refused
    assert "s3://" in refused and out["markers_left"] == []   # the driver's marker is removed
