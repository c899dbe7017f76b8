"""`bench serve`'s load: wrk clients that honour Retry-After or retry at once, and the server's
own latency histogram read from Ray Serve's Prometheus endpoint (its parsing and quantiles here;
read from a real Serve proxy in tests/serve/test_serve.py)."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ckd_ehr.bench import server_latency, wrk
from ckd_ehr.bench.serve import overload_targets

# As Ray 2.60's metrics agent prints it (labels trimmed of the session's ids).
PAGE = """# HELP ray_serve_http_request_latency_ms The end-to-end latency of HTTP requests
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="a",application="ckd-ehr",le="50.0",method="POST",route="/",status_code="200"} 10.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="a",application="ckd-ehr",le="5000.0",method="POST",route="/",status_code="200"} 90.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="a",application="ckd-ehr",le="+Inf",method="POST",route="/",status_code="200"} 100.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="b",application="ckd-ehr",le="50.0",method="POST",route="/",status_code="503"} 7.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="b",application="ckd-ehr",le="5000.0",method="POST",route="/",status_code="503"} 8.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="b",application="ckd-ehr",le="+Inf",method="POST",route="/",status_code="503"} 8.0
ray_serve_http_request_latency_ms_bucket{Component="core_worker",WorkerId="c",application="other",le="+Inf",method="POST",route="/",status_code="200"} 5.0
ray_serve_http_request_latency_ms_count{Component="core_worker",WorkerId="a",application="ckd-ehr",method="POST",route="/",status_code="200"} 100.0
"""


def test_the_proxy_histogram_is_read_per_application_and_status():
    h = server_latency.parse(PAGE, "ckd-ehr")
    inf = float("inf")
    assert h == {"200": {50.0: 10.0, 5000.0: 90.0, inf: 100.0}, "503": {50.0: 7.0, 5000.0: 8.0, inf: 8.0}}
    assert server_latency.total(h) == 108
    assert server_latency.parse(PAGE, "nothing") == {}


def test_quantiles_interpolate_within_a_bucket_and_shares_are_exact():
    inf = float("inf")
    b = {50.0: 10.0, 5000.0: 90.0, inf: 100.0}
    assert server_latency.quantile(b, 0.05) == pytest.approx(25.0)              # half of the first 10
    assert server_latency.quantile(b, 0.5) == pytest.approx(50 + 4950 * 40 / 80)
    assert server_latency.quantile(b, 0.99) == 5000.0                           # past the last bound
    assert server_latency.share_within(b, 5000) == 0.9
    assert server_latency.quantile({inf: 0.0}, 0.5) is None
    with pytest.raises(ValueError, match="not a bucket bound"):
        server_latency.share_within(b, 60)
    level = server_latency.difference(server_latency.parse(PAGE, "ckd-ehr"), {"200": {50.0: 10.0, 5000.0: 10.0,
                                                                                      inf: 10.0}})
    s = server_latency.summary(level)
    assert s["200"]["requests"] == 90 and s["200"]["within_50ms"] == 0.0 and s["503"]["within_50ms"] == 0.875


def test_overload_targets_judge_400_clients_against_64():
    calm = {"concurrency": 64, "retry": "at-once", "records_per_s": 10.0, "server": {}}
    flood = {"concurrency": 400, "retry": "at-once", "records_per_s": 9.5,
             "server": {"200": {"p99_ms": 3000.0, "within_5s": 0.995}, "503": {"p99_ms": 40.0, "within_50ms": 0.99}}}
    t = overload_targets([calm, flood])
    assert t["p99_answered_under_5s"] and t["p99_shed_within_50ms"] and t["goodput_at_least_90pct"]
    slow = {**flood, "records_per_s": 8.0, "server": {"200": {"p99_ms": 27000.0, "within_5s": 0.9}}}
    t = overload_targets([calm, slow])
    assert not t["p99_answered_under_5s"] and t["p99_shed_within_50ms"] is None and not t["goodput_at_least_90pct"]
    assert overload_targets([flood]) is None


class _Shedding(BaseHTTPRequestHandler):
    """Answers every predict with 503, Retry-After: 1, and keeps what it was sent."""
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((self.path, self.headers.get("Authorization"), json.loads(body)))
        payload = b'{"detail": "overloaded"}'
        self.send_response(503)
        self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def shedding_server():
    _Shedding.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Shedding)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk; .ci/run installs it)")
def test_wrk_clients_honour_retry_after_or_retry_at_once(shedding_server, tmp_path):
    """Null control beside the honouring clients: the same clients retrying at once send far more."""
    records = [{"diagnoses": ["4019"], "medications": [f"drug {i}"]} for i in range(3)]
    bodies = str(tmp_path / "bodies.jsonl")
    wrk.write_bodies(records, bodies)
    honour = wrk.run_wrk(shedding_server, bodies, 2, 2.0, "honour", token="s3cret", nice=0)
    # 2 clients waiting 1 s after each answer: about 2 requests each in 2 s (wrk stops at 2 s)
    assert 2 <= honour["attempts"] <= 8 and honour["shed"] == honour["attempts"] and honour["answered"] == 0
    assert honour["retry_after_waited_s"] >= 1 and honour["errors"] == 0
    at_once = wrk.run_wrk(shedding_server, bodies, 2, 2.0, "at-once", nice=0)
    assert at_once["attempts"] > 10 * honour["attempts"] and at_once["retry_after_waited_s"] == 0
    path, auth, body = _Shedding.seen[0]
    assert path == "/v1/predict" and auth == "Bearer s3cret" and body["records"][0] in records
    assert {tuple(b["records"][0]["medications"]) for _, _, b in _Shedding.seen} == {("drug 0",), ("drug 1",), ("drug 2",)}


def test_a_missing_wrk_is_named(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install wrk"):
        wrk.wrk_binary()
    with pytest.raises(ValueError, match="retry 'sometimes'"):
        wrk.run_wrk("http://127.0.0.1:1/", "x", 1, 1.0, "sometimes")
