"""wrk, the compiled HTTP load generator, as `bench serve`'s default clients.

A Python load generator on the same two cores as the server measures its own event loop too
(issue 43: p99 27 s at 400 clients, server or client unknown); wrk costs a fraction of the CPU.
Its script (resources/wrk_predict.lua) posts one record per request and either honours a
503's Retry-After or retries at once. wrk comes from the system's packages (`apt-get install
wrk`); nothing is downloaded at run time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources

RETRY_MODES = ("honour", "at-once")
TOKEN_ENV = "CKD_EHR_TOKEN"   # the bearer token, read by the Lua script
_MARK = "CKD_EHR_WRK "


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise FileNotFoundError("wrk not found on PATH: install it from the system's packages (Debian/Ubuntu: "
                                "`apt-get install wrk`), or use --load-generator python")
    return path


def script_path() -> str:
    return str(resources.files("ckd_ehr.resources") / "wrk_predict.lua")


def write_bodies(records: list[dict], path: str) -> None:
    """One request body per line: {"records": [record]}."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"records": [r]}, separators=(",", ":")) + "\n")


def parse_output(stdout: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"wrk printed no result line ({_MARK.strip()}):\n{stdout[-2000:]}")


def run_wrk(url: str, bodies_file: str, connections: int, duration_s: float, retry: str,
            token: str | None = None, nice: int = 19, threads: int = 2, timeout_s: float = 120.0) -> dict:
    """One load level: `connections` closed-loop clients for `duration_s`; returns what the
    clients saw: records/s answered, latency of every response (200 and 503 alike: wrk's
    histogram does not tell them apart; the server's does), counts by status."""
    if retry not in RETRY_MODES:
        raise ValueError(f"retry '{retry}': one of {', '.join(RETRY_MODES)}")
    # wrk gives each thread connections // threads: one thread unless they divide evenly
    threads = threads if connections % threads == 0 else 1
    cmd = ["nice", "-n", str(nice), wrk_binary(), "-t", str(min(threads, connections)), "-c", str(connections),
           "-d", f"{max(1, round(duration_s))}s", "--timeout", f"{round(timeout_s)}s", "-s", script_path(),
           url, "--", bodies_file, retry]
    env = {**os.environ, TOKEN_ENV: token or ""}   # not on the command line, where `ps` shows it
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    raw = parse_output(done.stdout)
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {"concurrency": connections, "retry": retry, "wall_s": round(seconds, 2), "attempts": raw["requests"],
            "answered": raw["status_200"], "records_per_s": round(raw["status_200"] / seconds, 2),
            "shed": raw["status_503"], "share_shed": round(raw["status_503"] / max(raw["requests"], 1), 3),
            "errors": raw["status_other"] + sum(v for k, v in raw["errors"].items() if k != "status"),
            "client_p50_ms_all": round(lat["p50"] / 1000, 1), "client_p99_ms_all": round(lat["p99"] / 1000, 1),
            "client_max_ms_all": round(lat["max"] / 1000, 1), "retry_after_waited_s": round(raw["waited_ms"] / 1000, 1),
            "wrk_errors": raw["errors"]}


def bodies_tempfile(records: list[dict]) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    f.close()
    write_bodies(records, f.name)
    return f.name
