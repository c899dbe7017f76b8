"""Start and stop a Ray head on 127.0.0.1 for tests, without touching other Ray instances.

Why not `ray.init()`: a head started with `ray start` gets RAY_ADDRESS (and the token auth
mode that Ray >= 2.59 uses for local clusters) in its environment, which every worker
inherits. Ray Train's placement-group cleaner and the state API inside workers then find
*this* cluster even when other Ray instances run on the same machine; with several
instances and no address they fail, and placement groups of stopped Tune trials leak.
`stop` kills only this head's processes (by its temp dir), never `ray stop` (which would
kill every Ray on the machine).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.paths import REPO

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all n sockets stay bound until every port is chosen (asking one
    at a time can hand out the same port twice, and `ray start` refuses a port used twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    address: str
    dashboard: str
    temp_dir: str
    env: dict

    def stop(self) -> None:
        import psutil

        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    procs.append(p)
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass


def start_head(num_cpus: int = 2, object_store_mb: int = 1024) -> RayHead:
    services = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    port, dash_port, *service_ports = free_ports(2 + len(services))
    # Short path: Ray's unix socket paths must stay under 108 characters.
    temp_dir = f"/tmp/ckdray{port}"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": f"127.0.0.1:{port}",
           "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
           f"--object-store-memory={object_store_mb * 2**20}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    # The dashboard process is also the state API that Ray Train's placement-group cleaner
    # asks whether a controller is alive: without it, the placement groups of Tune trials
    # that ASHA stops are never freed. Loopback only.
    cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}"]
    # Fixed default ports (agent 52365, ...) collide when two heads run at once (the session's
    # and the job test's): give every listening service of this head a free port.
    cmd += [f"--{flag}={p}" for flag, p in zip(services, service_ports)]
    dash = f"http://127.0.0.1:{dash_port}"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")
    head = RayHead(address=f"127.0.0.1:{port}", dashboard=dash, temp_dir=temp_dir, env=env)
    # The dashboard (and the job API) answers a little after `ray start` returns; any HTTP
    # answer (401 without the token) means it is up.
    import urllib.error
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{dash}/api/version", timeout=5)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(1)
    return head


def job_cli(head: RayHead, *args: str) -> str:
    """`ray job ...` against this head's job API, from the repository; ANSI colours stripped."""
    res = subprocess.run([RAY, "job", *args, "--address", head.dashboard], cwd=REPO, env=head.env,
                         capture_output=True, text=True, timeout=120)
    return re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)


def submit_job(head: RayHead, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait` of `entrypoint` with the shipped runtime_env, as a user would;
    returns the submission id."""
    cmd = [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--no-wait", "--", *entrypoint]
    # The head's job agent registers a little after the dashboard answers: retry while it says so.
    for _ in range(30):
        out = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or "No available agent" not in out.stderr:
            break
        time.sleep(3)
    if out.returncode != 0:
        raise RuntimeError(f"ray job submit failed: {out.stderr[-3000:]}")
    return re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)  # output has ANSI colours
