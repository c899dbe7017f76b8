"""What holds the served student under abuse, in-process (no Ray): admission (503 + Retry-After,
/healthz still answering), body limits counted as the bytes arrive (413 without reading the
rest), request ids, rejection metrics; int8 serving; the Hugging Face export.

The ASGI app is driven directly (`_call`), so the test sees exactly which body chunks the app
pulled: a client library would buffer them. The artifact is a real one around the tiny BERT.
"""
from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest

from ckd_ehr.config import ServeConfig
from ckd_ehr.serve.api import PredictRequest, TooLarge, check_limits, create_app
from ckd_ehr.serve.guard import BodyTooLarge, JsonShapeGuard

LIMITS = dict(max_records=16, max_text_chars=5000, max_batch_size=8)
TEXTS = ["The patient-acquired disease is Sepsis. The patient had used the following medication: Heparin.",
         "The patient-acquired disease is Acute kidney failure. The patient had used the following medication: None.",
         "x " * 400]


@pytest.fixture(scope="module")
def artifact(tiny_bert_dir, tmp_path_factory):
    from ckd_ehr.bench.serve import make_untrained_artifact

    dest = tmp_path_factory.mktemp("guard") / "artifact"
    make_untrained_artifact(str(tiny_bert_dir), dest)
    return str(dest)


@pytest.fixture(scope="module")
def backend(artifact):
    from ckd_ehr.serve.app import load_predictor
    from helpers.local_backend import LocalBackend

    return LocalBackend(*load_predictor(artifact))


async def _call(app, method: str, path: str, chunks=(), headers=()):
    """(status, headers, json body, chunks the app read) of one ASGI request."""
    chunks = list(chunks) if not hasattr(chunks, "__next__") else chunks
    it = iter(chunks)
    read = 0
    sent: list[dict] = []

    async def receive():
        nonlocal read
        try:
            body = next(it)
        except StopIteration:
            await asyncio.sleep(3600)  # a client that sent everything waits for the answer
        read += 1
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body or b"null"), read


async def _post(app, body: bytes, headers=(), chunk=4096):
    """A complete (non-chunked-limit) request: the last chunk ends the body."""
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent: list[dict] = []
    queue = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "", "scheme": "http", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *[(k.lower().encode(), v.encode()) for k, v in headers]],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


# --- the streaming shape guard -----------------------------------------------------------

def _guard_result(body: bytes, step: int, cfg: ServeConfig):
    g = JsonShapeGuard(cfg.body_bytes, cfg.max_records, cfg.max_text_chars)
    try:
        for i in range(0, len(body), step):
            g.feed(body[i:i + step])
    except BodyTooLarge as exc:
        return exc.reason
    return "ok"


@pytest.mark.parametrize("body, expected", [
    ({"records": [{"text": "a" * 5000}]}, "ok"),
    ({"records": [{"text": "é\"\\" * 1666}]}, "ok"),                       # escapes and UTF-8: 4998 chars
    ({"records": [{"diagnoses": ["4019"] * 999, "medications": ["x"]}]}, "ok"),
    ({"records": [{"text": "a"}] * 16, "other": [[{}] * 40]}, "ok"),      # nested arrays elsewhere do not count
    ({"records": [{"text": "a"}] * 17}, "too_many_records"),
    ({"records": [{"text": "a"}, {"text": "a" * 5100}]}, "record_too_long"),
    ({"records": [{"medications": ["y" * 40] * 130}]}, "record_too_long"),
])
def test_shape_guard_counts_as_the_exact_check_across_chunk_boundaries(body, expected):
    cfg = ServeConfig(**LIMITS)
    for ensure_ascii in (True, False):
        raw = json.dumps(body, ensure_ascii=ensure_ascii).encode()
        assert {_guard_result(raw, step, cfg) for step in (1, 7, 4096, len(raw))} == {expected}
    exact = "ok"
    try:
        check_limits(PredictRequest.model_validate({"records": body["records"]}), cfg)
    except TooLarge as exc:
        exact = exc.reason
    assert exact == expected  # the streaming guard rejects only what the exact check rejects


def test_shape_guard_counts_bytes():
    cfg = ServeConfig(**LIMITS, max_body_bytes=1000)
    assert _guard_result(b" " * 1000, 100, cfg) == "ok"
    assert _guard_result(b" " * 1001, 100, cfg) == "body_too_large"


# --- the app: streaming limits, admission, request ids, metrics ---------------------------

def test_chunked_body_past_a_limit_is_413_without_reading_the_rest(backend):
    cfg = ServeConfig(**LIMITS, max_body_bytes=200_000)
    app = create_app(backend, cfg)
    chunk = b" " * 65536

    def endless():  # 64 MiB, sent chunked (no content-length)
        for _ in range(1024):
            yield chunk

    status, headers, body, read = asyncio.run(_call(app, "POST", "/v1/predict", endless()))
    assert status == 413 and "200000" in body["detail"] and read == 4  # 4 x 64 KiB > 200,000: stop there
    # too many records: 413 as soon as the 17th record opens, long before the body ends
    recs = b'{"records": [' + b",".join([b'{"text": "a"}'] * 1000) + b"]}"
    status, _, body, read = asyncio.run(_call(app, "POST", "/v1/predict", (recs[i:i + 100] for i in range(0, len(recs), 100))))
    assert status == 413 and "16 records" in body["detail"] and read < 5
    # one record too long: 413 within the record
    long = b'{"records": [{"text": "' + b"a" * 100_000 + b'"}]}'
    status, _, body, read = asyncio.run(_call(app, "POST", "/v1/predict", (long[i:i + 1000] for i in range(0, len(long), 1000))))
    assert status == 413 and "5000 characters" in body["detail"] and read < 10
    snap = app.state.metrics.snapshot()["rejected"]
    assert snap == {"body_too_large": 1, "too_many_records": 1, "record_too_long": 1}


def test_admission_sheds_at_once_with_retry_after_and_healthz_answers(backend):
    class Held:
        """The real backend behind a gate: predictions wait until the test lets them through."""

        def __init__(self, inner):
            self.inner, self.info = inner, inner.info
            self.release, self.waiting = asyncio.Event(), 0

        async def predict(self, records):
            self.waiting += 1
            await self.release.wait()
            return await self.inner.predict(records)

    cfg = ServeConfig(**{**LIMITS, "max_batch_size": 1}, max_ongoing_requests=4, max_pending_requests=2, retry_after_s=3)
    body = json.dumps({"records": [{"text": TEXTS[0]}]}).encode()

    async def scenario():
        held = Held(backend)
        app = create_app(held, cfg)
        first = [asyncio.create_task(_post(app, body)) for _ in range(2)]
        while held.waiting < 2:
            await asyncio.sleep(0.01)
        shed = await asyncio.wait_for(_post(app, body), 5)           # answered while two are held
        health = await asyncio.wait_for(_call(app, "GET", "/healthz"), 5)
        assert not any(t.done() for t in first)
        held.release.set()
        done = await asyncio.gather(*first)
        return shed, health, done, app.state.metrics.snapshot()

    shed, health, done, snap = asyncio.run(scenario())
    assert shed[0] == 503 and shed[1]["retry-after"] == "3"
    assert health[0] == 200 and health[2]["status"] == "ok"
    assert [d[0] for d in done] == [200, 200]
    assert snap["rejected"] == {"overload": 1}


def test_request_ids_in_responses_and_rejections_counted(backend, caplog):
    from ckd_ehr.serve.api import token_digest

    app = create_app(backend, ServeConfig(**LIMITS), token_sha256=token_digest("tok"))
    auth = [("authorization", "Bearer tok")]
    body = json.dumps({"records": [{"text": "PATIENTMARKER " + TEXTS[0]}]}).encode()
    with caplog.at_level(logging.INFO, logger="ckd_ehr.serve"):
        status, headers, out = asyncio.run(_post(app, body, [*auth, ("x-request-id", "abc-123")]))
    assert status == 200 and headers["x-request-id"] == "abc-123" and out["request_id"] == "abc-123"
    assert any("abc-123" in r.getMessage() for r in caplog.records)          # the id is in the log
    assert not any("PATIENTMARKER" in r.getMessage() for r in caplog.records)  # the body is not
    status, headers, out = asyncio.run(_post(app, body, [*auth, ("x-request-id", "bad id\nwith newline")]))
    assert status == 200 and len(headers["x-request-id"]) == 32 and out["request_id"] == headers["x-request-id"]
    assert asyncio.run(_post(app, body))[0] == 401
    assert asyncio.run(_post(app, b"{nope", auth))[0] == 422
    assert asyncio.run(_post(app, json.dumps({"records": [{"text": "a"}] * 17}).encode(), auth))[0] == 413
    status, headers, _ = asyncio.run(_post(app, b"{}", [*auth, ("content-length", "999999999")]))
    assert status == 413
    assert app.state.metrics.snapshot()["rejected"] == {"unauthorized": 1, "invalid": 1, "too_many_records": 1,
                                                         "body_too_large": 1}


# --- int8 and loading ----------------------------------------------------------------------

def test_int8_quantises_the_encoder_and_agrees_with_fp32(artifact, caplog):
    import torch

    from ckd_ehr.student import load_student

    with caplog.at_level(logging.INFO):
        fp32 = load_student(artifact)
    assert not any("pooler" in r.getMessage() for r in caplog.records)  # no MISSING pooler.dense report
    int8 = load_student(artifact, precision="int8")
    kinds = {type(m).__module__ for m in int8.model.encoder.modules()}
    assert any("quantized" in k for k in kinds)                           # it really is quantised
    assert isinstance(int8.model.head, torch.nn.Linear)                   # the head stays fp32
    texts = [f"{t} {i}" for i in range(20) for t in TEXTS]
    p32, p8 = fp32.predict_proba(texts), int8.predict_proba(texts)
    assert not np.array_equal(p32, p8)
    assert np.abs(p32 - p8).max() <= 0.02
    with pytest.raises(ValueError, match="precision 'int4': one of fp32, int8, bf16"):
        load_student(artifact, precision="int4")


def test_bf16_runs_the_encoder_in_bf16_and_keeps_the_answers(artifact):
    """serve.precision: bf16: the encoder's matrix products run in bf16 (its answers differ
    from fp32), pooling and the head read fp32 states, and every probability stays within 0.02
    of fp32, also for rows longer than the encoder's window (encoded in windows)."""
    import torch

    from ckd_ehr.student import load_student
    from ckd_ehr.student.model import Bf16Encoder

    fp32, bf16 = load_student(artifact), load_student(artifact, precision="bf16")
    assert isinstance(bf16.model.encoder, Bf16Encoder) and bf16.precision == "bf16"
    assert bf16.model.head.weight.dtype == torch.float32
    ids = bf16.tokenizer(TEXTS + ["x " * 700], padding=True, return_tensors="pt")
    assert ids["input_ids"].shape[1] > bf16.model.window   # the long row takes two windows
    with torch.inference_mode():
        states = bf16.model.encoder(input_ids=ids["input_ids"][:, :64], attention_mask=ids["attention_mask"][:, :64])
        assert states.last_hidden_state.dtype == torch.float32
        long32, long16 = (torch.sigmoid(p.model(ids["input_ids"], ids["attention_mask"])) for p in (fp32, bf16))
    assert long16.dtype == torch.float32 and (long32 - long16).abs().max() <= 0.02
    texts = [f"{t} {i}" for i in range(20) for t in TEXTS]
    p32, p16 = fp32.predict_proba(texts), bf16.predict_proba(texts)
    assert not np.array_equal(p32, p16)
    assert np.abs(p32 - p16).max() <= 0.02


@pytest.mark.slow   # torch.compile: about 30 s of compiling on 2 cores
def test_compiled_encoder_gives_the_eager_answers(artifact):
    """serve.compile: the encoder runs through torch.compile (compiled at load), and every
    batch shape a replica sees (1 row, several, short and long rows) gives the eager
    model's probabilities."""
    import torch

    from ckd_ehr.student import load_student

    eager = load_student(artifact)
    compiled = load_student(artifact, compile=True)
    assert isinstance(compiled.model.encoder, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.model.encoder, torch._dynamo.eval_frame.OptimizedModule)
    texts = [f"{t} {i}" for i in range(7) for t in TEXTS]
    for batch in (texts[:1], texts[:5], texts):
        np.testing.assert_allclose(compiled.predict_proba(batch, batch_size=8), eager.predict_proba(batch, batch_size=8),
                                   rtol=0, atol=1e-5)


# --- the Hugging Face export ----------------------------------------------------------------

def test_export_hf_loads_in_a_pipeline_with_the_artifacts_probabilities(artifact, tmp_path):
    from transformers import pipeline

    from ckd_ehr.phenotypes import phenotype_names
    from ckd_ehr.student import load_student
    from ckd_ehr.student.export_hf import RestrictedModelError, export_hf, push_to_hub

    out = tmp_path / "hf"
    info = export_hf(artifact, str(out), data_source="synthetic")
    assert not info["restricted"]
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(25)] == phenotype_names()
    assert "BertForSequenceClassification" in (out / "hf_modeling.py").read_text()
    clf = pipeline("text-classification", model=str(out), top_k=None, trust_remote_code=True)
    got = clf(TEXTS, truncation=True)
    expected = load_student(artifact).predict_proba(TEXTS)
    probs = np.array([[{d["label"]: d["score"] for d in row}[n] for n in phenotype_names()] for row in got])
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "Intended use" in card and "synthetic" in card

    restricted = tmp_path / "hf_mimic"
    assert export_hf(artifact, str(restricted), data_source="mimic")["restricted"]
    card = (restricted / "README.md").read_text()
    assert "PhysioNet Credentialed Health Data License" in card and "never publicly" in card
    with pytest.raises(RestrictedModelError, match="refusing"):
        push_to_hub(str(restricted), "someone/ckd-ehr-student")


def test_admission_limit_follows_the_measured_rate():
    from collections import deque

    from ckd_ehr.serve.guard import RATE_WINDOW_S, admission_limit

    now = 1000.0
    assert admission_limit(deque(), now, 48, 1.0) == 48                      # no evidence: the fixed limit
    slow = deque(now - i * 2.0 for i in range(9)[::-1])                      # 0.5/s over 16 s: 5 in the window
    assert admission_limit(slow, now, 48, 1.0) == 48 and len(slow) == 6      # old ones dropped; too few to judge
    busy = deque(now - RATE_WINDOW_S + i * 0.5 for i in range(1, 21))        # 20 in 10 s: 2 per second
    assert admission_limit(busy, now, 48, 1.0) == 2 and admission_limit(busy, now, 48, 5.0) == 10
    fast = deque(now - RATE_WINDOW_S + i * 0.01 for i in range(1, 1001))     # 100 per second
    assert admission_limit(fast, now, 48, 1.0) == 48                         # never above the fixed limit
    assert admission_limit(fast, now, 48, None) == 48


def test_retry_after_grows_with_the_crowd_waiting_to_retry():
    """Little's law on the back-off pool: 400 clients told 2 s each (200 503s/s) at 10 answers/s
    are ~400 waiting; to come back at RETRY_SPREAD x 10/s they are told 400 / (RETRY_SPREAD x 10)
    seconds, jittered by +-50%, within [minimum, cap]."""
    import random
    from collections import deque

    from ckd_ehr.serve.guard import RATE_WINDOW_S, RETRY_SPREAD, ShedLog, retry_after

    now, rng = 1000.0, random.Random(0)
    answers = lambda per_s: deque(now - RATE_WINDOW_S + (i + 1) / per_s for i in range(int(per_s * RATE_WINDOW_S)))
    crowd = lambda per_s, told: ShedLog((now - RATE_WINDOW_S + (i + 1) / per_s, told)
                                        for i in range(int(per_s * RATE_WINDOW_S)))
    # no crowd, too few answers to judge, or adaptation off: the configured minimum
    assert retry_after(ShedLog(), answers(10), now, 2, 30, rng) == 2
    assert retry_after(crowd(200, 2), deque([now - 1.0] * 3), now, 2, 30, rng) == 2
    assert retry_after(crowd(200, 2), answers(10), now, 2, 2, rng) == 2
    # a flood: 400 waiting at 10 answers/s
    want = 400 / (RETRY_SPREAD * 10)
    told = [retry_after(crowd(200, 2), answers(10), now, 2, 1000, rng) for _ in range(300)]
    assert 0.5 * want - 1 <= min(told) and max(told) <= 1.5 * want + 1 and abs(np.mean(told) - want) < 0.1 * want
    assert len(set(told)) > 5                                              # jitter: not all in step
    assert retry_after(crowd(200, 2), answers(10), now, 2, 8, rng) == 8   # never over the cap
    # the crowd, told `want` s, comes back at 400 / want per s: still 400 waiting, so the answer is stable
    stable = [retry_after(crowd(400 / want, want), answers(10), now, 2, 1000, rng) for _ in range(300)]
    assert abs(np.mean(stable) - want) < 0.1 * want
    # a small crowd (10 503s/s told 2 s: 20 waiting, at 16 answers/s) is told the minimum
    assert all(retry_after(crowd(10, 2), answers(16), now, 2, 30, rng) == 2 for _ in range(50))
    old = ShedLog([(now - RATE_WINDOW_S - 1, 30)] * 100)
    assert retry_after(old, answers(10), now, 2, 30, rng) == 2 and not old and old.told == 0  # stale 503s dropped


def test_bench_record_shapes():
    """`bench serve --records short` is the issue's record: 4 diagnoses, 2 drugs, 1 procedure."""
    from ckd_ehr.bench.serve import bench_records

    short, titles = bench_records(50, shape="short")
    assert all(len(r["diagnoses"]) == 4 and len(r["medications"]) == 2 and len(r["procedures"]) == 1 for r in short)
    assert all(c in titles for r in short for c in r["diagnoses"])
    long, _ = bench_records(50, shape="long")
    assert min(len(r["medications"]) for r in long) >= 15
    with pytest.raises(ValueError, match="record shape 'huge'"):
        bench_records(1, shape="huge")
