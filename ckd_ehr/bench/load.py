"""HTTP load generator of `bench serve`, run as its own process at a lower CPU share.

    python -m ckd_ehr.bench.load URL RECORDS_JSON CONCURRENCY DURATION_S [--nice N]

`concurrency` closed-loop clients post one record per request for `duration` seconds; a
client answered 503 waits the Retry-After the server sent (a well-behaved client), then
goes on. Meanwhile a probe GETs /healthz every 0.5 s. The generator shares the machine's
cores with the server, so it runs `nice`d, by default at 19: below Ray's worker processes
(the Serve replica and proxy run at nice 15), so when both want a core the server gets about
70% of it; it reports its own CPU time, so a reader can see what it took. aiohttp, not httpx: it costs the clients about half the CPU.
Prints one JSON object. The bearer token, when needed, comes from $CKD_EHR_TOKEN.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time

import numpy as np


async def run_load(url: str, records: list[dict], concurrency: int, duration: float,
                   token: str | None = None, timeout_s: float = 120.0) -> dict:
    # not at module level: aiohttp, loaded only when this runs
    import aiohttp

    lat: list[float] = []
    status: dict[str, int] = {}
    health = {"probes": 0, "failures": 0, "max_ms": 0.0}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stop = time.perf_counter() + duration
    conn = aiohttp.TCPConnector(limit=concurrency + 1, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(url, connector=conn, timeout=timeout, headers=headers) as session:
        async def client(k: int):
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                retry = 0.0
                try:
                    async with session.post("/v1/predict", json={"records": [records[i % len(records)]]}) as r:
                        await r.read()
                        kind = str(r.status)
                        if r.status == 503:
                            retry = float(r.headers.get("retry-after", "1") or 1)
                except asyncio.TimeoutError:
                    kind = "timeout"
                except aiohttp.ClientError as exc:
                    kind = type(exc).__name__
                status[kind] = status.get(kind, 0) + 1
                if kind == "200":
                    lat.append(time.perf_counter() - t)
                if retry:
                    await asyncio.sleep(min(retry, max(0.0, stop - time.perf_counter())))
                i += concurrency

        async def probe():
            async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=5)) as s:
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    try:
                        async with s.get("/healthz") as r:
                            await r.read()
                            ok = r.status == 200
                    except (asyncio.TimeoutError, aiohttp.ClientError):
                        ok = False
                    health["probes"] += 1
                    health["failures"] += not ok
                    health["max_ms"] = max(health["max_ms"], round((time.perf_counter() - t) * 1000, 1))
                    await asyncio.sleep(0.5)

        start = time.perf_counter()
        await asyncio.gather(probe(), *(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    attempts = sum(status.values())
    shed = status.get("503", 0)
    q = np.percentile(lat, [50, 95, 99]) * 1000 if lat else [float("nan")] * 3
    return {"concurrency": concurrency, "wall_s": round(wall, 2), "attempts": attempts, "answered": len(lat),
            "records_per_s": round(len(lat) / wall, 2), "p50_ms": round(float(q[0]), 1),
            "p95_ms": round(float(q[1]), 1), "p99_ms": round(float(q[2]), 1),
            "shed": shed, "share_shed": round(shed / attempts, 3) if attempts else 0.0,
            "errors": attempts - len(lat) - shed, "status": status, "healthz": health,
            "load_avg_1m": round(os.getloadavg()[0], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ckd_ehr.bench.load")
    p.add_argument("url")
    p.add_argument("records_json", help="JSON file: a list of records")
    p.add_argument("concurrency", type=int)
    p.add_argument("duration", type=float)
    p.add_argument("--nice", type=int, default=19, help="niceness added to this process (its CPU share)")
    a = p.parse_args(argv)
    if a.nice:
        os.nice(a.nice)
    with open(a.records_json) as f:
        records = json.load(f)
    out = asyncio.run(run_load(a.url, records, a.concurrency, a.duration, os.environ.get("CKD_EHR_TOKEN")))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["client_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 1)
    out["client_nice"] = a.nice
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
