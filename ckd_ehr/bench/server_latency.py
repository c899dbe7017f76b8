"""The server's own latency histogram, for `bench serve`: Ray Serve's proxy histogram
`serve_http_request_latency_ms` (end to end from the HTTP proxy, by status code) read from
every node's Prometheus endpoint before and after a load level.

A load generator on the same cores measures its own scheduling too; this histogram is what the
server did, whatever the client. Ray's default buckets jump from 2 s to 5 s to 10 s, so the
bench asks for finer ones, exported every second (`fine_buckets`, set before Ray starts).
Quantiles interpolate linearly within a bucket, as Prometheus' histogram_quantile does; the
share answered within a bucket's bound (50 ms, 5 s) is exact.
"""
from __future__ import annotations

import os
import re
import time
import urllib.request

BUCKETS_ENV = "RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS"
REPORT_INTERVAL_ENV = "RAY_metrics_report_interval_ms"   # Ray's default: 10 s
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000,
                      4000, 5000, 7500, 10000, 15000, 20000, 30000, 60000, 120000, 300000)
METRIC = "ray_serve_http_request_latency_ms_bucket"
_LINE = re.compile(r"^" + METRIC + r"\{(?P<labels>.*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Histogram = dict[str, dict[float, float]]
"""{status code: {bucket upper bound in ms (inf last): cumulative count}}."""


_started_here: dict[str, str] = {}
"""The settings fine_buckets gave the Ray this process starts (empty: a cluster started elsewhere,
whose export interval is taken to be Ray's default)."""


def fine_buckets() -> None:
    """Finer latency buckets, and metrics exported every second instead of every 10 s, for the
    Ray this process is about to start (call it only then: a running cluster keeps its own)."""
    os.environ.setdefault(BUCKETS_ENV, ",".join(str(b) for b in LATENCY_BUCKETS_MS))
    os.environ.setdefault(REPORT_INTERVAL_ENV, "1000")
    _started_here[REPORT_INTERVAL_ENV] = os.environ[REPORT_INTERVAL_ENV]


def parse(text: str, application: str) -> Histogram:
    """The proxy histogram of `application`'s POST requests (its predictions) in a Prometheus
    text page, summed over workers."""
    out: Histogram = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        if labels.get("application") != application or labels.get("method", "POST") != "POST":
            continue   # predictions only: not GET /healthz, /v1/phenotypes
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        code = out.setdefault(labels.get("status_code", "?"), {})
        code[le] = code.get(le, 0.0) + float(m.group("value"))
    return out


def metrics_urls() -> list[str]:
    """Every live node's Prometheus endpoint (this process is connected to Ray)."""
    # not at module level: ray, loaded only when this runs
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def scrape(application: str, urls: list[str]) -> Histogram:
    total: Histogram = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as r:
            page = parse(r.read().decode("utf-8", "replace"), application)
        for code, buckets in page.items():
            into = total.setdefault(code, {})
            for le, v in buckets.items():
                into[le] = into.get(le, 0.0) + v
    return total


def total(histogram: Histogram) -> float:
    """Requests of every status code."""
    return sum(buckets.get(float("inf"), 0.0) for buckets in histogram.values())


def report_interval_s() -> float:
    """How often Ray's processes export their metrics (Ray floors it at 1 s): fine_buckets' for
    a Ray this process started, else Ray's default of 10 s."""
    return max(int(_started_here.get(REPORT_INTERVAL_ENV, "10000")), 1000) / 1000


def settled(application: str, urls: list[str], at_least: float = 0, timeout_s: float = 120.0,
            every_s: float = 0.5) -> Histogram:
    """A scrape holding at least `at_least` requests (what the clients saw answered, counted
    since the proxy started) and unchanged for two of Ray's export intervals: the proxy exports
    its histogram every interval, so a level's last answers reach the endpoint a little later."""
    quiet_s = 2 * report_interval_s() + every_s
    last, deadline = scrape(application, urls), time.monotonic() + timeout_s
    unchanged_since = time.monotonic()
    while time.monotonic() < deadline and (total(last) < at_least or time.monotonic() - unchanged_since < quiet_s):
        time.sleep(every_s)
        now = scrape(application, urls)
        if now != last:
            last, unchanged_since = now, time.monotonic()
    if total(last) < at_least:
        raise TimeoutError(f"the Serve proxy's latency histogram of '{application}' holds {total(last):.0f} requests "
                           f"after {timeout_s:.0f} s; the clients saw at least {at_least:.0f} answered")
    return last


def difference(after: Histogram, before: Histogram) -> Histogram:
    return {code: {le: v - before.get(code, {}).get(le, 0.0) for le, v in buckets.items()}
            for code, buckets in after.items()}


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile (ms) of one status code's cumulative buckets, linear within a bucket;
    the last finite bound when it falls in the +Inf bucket; None without requests."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower


def share_within(buckets: dict[float, float], bound_ms: float) -> float | None:
    """The share of requests answered within `bound_ms` (a bucket bound: exact)."""
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    if bound_ms not in buckets:
        raise ValueError(f"{bound_ms} ms is not a bucket bound ({sorted(buckets)})")
    return buckets[bound_ms] / total


def summary(level: Histogram) -> dict:
    """Counts, p50 / p99 and the shares within 50 ms and 5 s, per status code."""
    out = {}
    for code, buckets in sorted(level.items()):
        n = int(round(buckets.get(float("inf"), 0.0)))
        if not n:
            continue
        p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
        out[code] = {"requests": n, "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
                     "within_50ms": round(share_within(buckets, 50), 4) if 50 in buckets else None,
                     "within_5s": round(share_within(buckets, 5000), 4) if 5000 in buckets else None}
    return out
