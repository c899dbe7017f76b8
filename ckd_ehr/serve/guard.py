"""What the replica checks before a request reaches the API: admission, body limits, request ids.

`RequestGuard` is a plain ASGI middleware (no Ray), so the in-process tests drive it too:

- **Request id**: Ray Serve's id of the request (the client's `X-Request-ID` when given; Ray's
  proxy answers it in the `x-request-id` header); without Ray, the client's `X-Request-ID`
  when it is a short token, else a new one, in the same header. It is in predict responses
  and on every log line of the request. Bodies are never logged.
- **Admission**: a replica holds at most `serve.pending_requests` predict requests, and, with
  `serve.queue_budget_s`, at most as many as it answered in that many seconds lately (its
  measured rate: on a slow or busy machine the queue shrinks so admitted requests still
  wait about the budget, not pending / rate); one more is answered 503 with `Retry-After`
  at once, before its body is read. /healthz and the other routes are never shed.
- **Retry-After that follows the crowd**: at least `serve.retry_after_s`; when many clients
  are being shed, longer (up to `serve.retry_after_max_s`, jittered), so the clients waiting
  to retry come back at about the rate the replica answers, not all at once every
  `retry_after_s`: each 503 still costs the proxy and the replica CPU the encoder needs.
- **Body limits as the bytes arrive**: `JsonShapeGuard` counts the body's bytes, its
  records (objects in the top-level `records` array) and each record's characters (in its
  strings) chunk by chunk, chunked transfer or not; the first chunk past a limit is answered
  413 and nothing more is read. Only a body within the limits is buffered (it is at most
  `serve.body_bytes` long) and handed to the API, which checks the exact limits again.
"""
from __future__ import annotations

import contextvars
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from typing import Awaitable, Callable

from ckd_ehr.config import ServeConfig

log = logging.getLogger("ckd_ehr.serve")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("ckd_ehr_request_id", default="-")
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Keys a record may have (diagnoses, medications, procedures, text) are at most this many
# characters together; the streaming count includes keys, the exact check (api.check_limits)
# does not, so the streaming limit adds them to stay a strict upper bound.
_KEY_SLACK = 64
_STRUCTURAL = re.compile(rb'["\\{}\[\],:]')
_STRING_END = re.compile(rb'["\\\\]')
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: not characters of their own


class BodyTooLarge(Exception):
    """A body limit was passed; `reason` is the metrics label, the message the 413's detail."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class JsonShapeGuard:
    """Counts a JSON body's bytes, records and characters per record as chunks arrive.

    A small scanner over the structural bytes only (regex), so a multi-megabyte string costs
    one slice per chunk. It does not validate JSON (the API does): it only has to never
    under-count a body that parses, so each limit here is an upper bound of the exact one.
    """

    def __init__(self, max_bytes: int, max_records: int, max_record_chars: int):
        self.max_bytes, self.max_records = max_bytes, max_records
        self.max_record_chars = max_record_chars + _KEY_SLACK
        self.n_bytes = 0
        self.records = 0
        self.record_chars = 0
        self._stack: list[bytes] = []   # open containers: b"{" or b"["
        self._in_string = False
        self._skip = 0                  # bytes of an escape sequence still to skip
        self._backslash = False         # a chunk ended right after a backslash
        self._expect_key = False        # at depth 1, the next string is a key
        self._key: bytearray | None = None  # the top-level key being read
        self._last_key = b""
        self._in_records = False

    def _count(self, segment: bytes) -> None:
        if self._in_records and len(self._stack) >= 3 and segment:
            self.record_chars += len(segment.translate(None, _CONTINUATION))
            if self.record_chars > self.max_record_chars:
                raise BodyTooLarge("record_too_long", f"record {self.records - 1}: more than "
                                   f"{self.max_record_chars - _KEY_SLACK} characters")

    def feed(self, chunk: bytes) -> None:
        """Account for the next chunk; raises BodyTooLarge at the first limit passed."""
        self.n_bytes += len(chunk)
        if self.n_bytes > self.max_bytes:
            raise BodyTooLarge("body_too_large", f"body of more than {self.max_bytes} bytes")
        pos, n = 0, len(chunk)
        while pos < n:
            if self._backslash:  # the letter after a backslash: \uXXXX skips 4 more
                self._backslash = False
                self._skip = 4 if chunk[pos:pos + 1] == b"u" else 0
                pos += 1
                continue
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            if self._in_string:
                m = _STRING_END.search(chunk, pos)
                end = m.start() if m else n
                seg = chunk[pos:end]
                self._count(seg)
                if self._key is not None and len(self._key) < 64:
                    self._key += seg[:64]
                if m is None:
                    return
                pos = end + 1
                if m.group() == b"\\":
                    self._count(b"x")  # an escape is one character (a surrogate pair counts two: an upper bound)
                    self._backslash = True
                    continue
                self._in_string = False
                if self._key is not None:
                    self._last_key, self._key = bytes(self._key), None
                continue
            m = _STRUCTURAL.search(chunk, pos)
            if m is None:
                return
            c, pos = m.group(), m.end()
            depth = len(self._stack)
            if c == b'"':
                self._in_string = True
                if depth == 1 and self._expect_key:
                    self._key = bytearray()
            elif c in (b"{", b"["):
                if self._in_records and depth == 2:
                    self.records += 1
                    self.record_chars = 0
                    if self.records > self.max_records:
                        raise BodyTooLarge("too_many_records", f"more than {self.max_records} records")
                if depth == 1 and c == b"[" and self._last_key == b"records" and self._stack[0] == b"{":
                    self._in_records = True
                self._stack.append(c)
                if depth == 0:
                    self._expect_key = c == b"{"
            elif c in (b"}", b"]"):
                if self._stack:
                    self._stack.pop()
                if len(self._stack) == 1:
                    self._in_records = False
            elif depth == 1:
                if c == b",":
                    self._expect_key = True
                elif c == b":":
                    self._expect_key = False


Send = Callable[[dict], Awaitable[None]]


async def _json_response(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _in_serve_replica() -> bool:
    """True inside a Ray Serve replica: its proxy answers the x-request-id header itself."""
    try:
        # not at module level: imported only on this branch
        from ray.serve.context import _get_internal_replica_context
    except ImportError:
        return False
    return _get_internal_replica_context() is not None


def _ray_request_id() -> str | None:
    """Ray Serve's id of the current request, None outside a Serve request (in-process use)."""
    try:
        # not at module level: imported only on this branch
        from ray.serve.context import _serve_request_context
    except ImportError:
        return None
    ctx = _serve_request_context.get()  # read only: the getter would set a default context
    return (ctx.request_id or None) if ctx is not None else None


RATE_WINDOW_S = 10.0   # completions counted for the replica's recent rate
MIN_EVIDENCE = 8       # fewer completions in the window: too little to go on, use the fixed limit
MIN_ADMITTED = 2


def admission_limit(completions: deque, now: float, fixed: int, budget_s: float | None) -> int:
    """Predict requests to admit: `fixed`, or fewer when the recent rate (completions in the
    last RATE_WINDOW_S seconds) times `budget_s` is smaller (never under MIN_ADMITTED)."""
    while completions and now - completions[0] > RATE_WINDOW_S:
        completions.popleft()
    if budget_s is None or len(completions) < MIN_EVIDENCE:
        return fixed
    rate = len(completions) / RATE_WINDOW_S
    return max(MIN_ADMITTED, min(fixed, int(rate * budget_s)))


RETRY_SPREAD = 1.0
"""Shed clients are told to wait until, together, they come back at about this many times the
rate the replica answers. The replica stays busy anyway (a client just answered sends its next
request at once and takes the slot it freed); what matters is that answering 503s does not eat
the cores: at 400 clients on 2 cores a fixed 2 s Retry-After meant ~190 rejections/s and
goodput fell to about half of the 64-client figure."""


class ShedLog(deque):
    """(monotonic time, seconds told) of recent 503s, with the sum of the seconds told kept as
    entries come and go: retry_after reads it once per 503 instead of summing a flood's worth of
    entries (clients that ignore Retry-After can make thousands a second)."""

    def __init__(self, entries=()):
        super().__init__(entries)
        self.told = sum(t for _, t in self)

    def append(self, entry: tuple[float, int]) -> None:
        super().append(entry)
        self.told += entry[1]

    def popleft(self) -> tuple[float, int]:
        entry = super().popleft()
        self.told -= entry[1]
        return entry


def retry_after(shed: ShedLog, completions: deque, now: float, base_s: int, max_s: int,
                rng: random.Random | None = None) -> int:
    """Retry-After (whole seconds) for the next 503: the clients now waiting to retry, divided
    by RETRY_SPREAD times the replica's rate, jittered by +-50% so they do not return in step;
    never under `base_s` nor over `max_s`.

    `shed` (a ShedLog) holds (time, seconds told) of recent 503s, `completions` the times of
    answered predictions (both pruned to the last RATE_WINDOW_S seconds here). The clients
    waiting to retry are counted by Little's law: 503s per second times the mean wait they were
    told, i.e. the sum of the waits told in the window divided by the window.
    """
    while shed and now - shed[0][0] > RATE_WINDOW_S:
        shed.popleft()
    while completions and now - completions[0] > RATE_WINDOW_S:
        completions.popleft()
    if max_s <= base_s or len(completions) < MIN_EVIDENCE or not shed:
        return base_s
    waiting = shed.told / RATE_WINDOW_S
    rate = len(completions) / RATE_WINDOW_S
    target = waiting / (RETRY_SPREAD * rate) * (rng or random).uniform(0.5, 1.5)
    return int(min(max_s, max(base_s, round(target))))


class RequestGuard:
    """ASGI middleware: request id, admission of predict requests, streaming body limits."""

    def __init__(self, app, cfg: ServeConfig, metrics=None, predict_path: str = "/v1/predict"):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.predict_path = predict_path
        self.pending = 0
        self.limit = cfg.pending_requests
        self.completions: deque[float] = deque()  # monotonic times of answered predictions
        self.shed = ShedLog()
        self.rng = random.Random()

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = _ray_request_id() or (given if _ID.match(given) else uuid.uuid4().hex)
        # under Ray Serve its proxy sends the header (the client's id when given, else its own)
        id_header = None if _in_serve_replica() else (b"x-request-id", rid.encode())
        token = request_id_var.set(rid)

        async def send_with_id(message):
            if id_header and message["type"] == "http.response.start":
                hs = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*hs, id_header]}
            await send(message)

        try:
            path = scope.get("path", "")
            if scope.get("method") == "POST" and path.endswith(self.predict_path):
                return await self._predict(scope, receive, send_with_id, headers, rid)
            return await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    async def _predict(self, scope, receive, send, headers: dict, rid: str):
        cfg = self.cfg
        now = time.monotonic()
        if self.pending >= admission_limit(self.completions, now, self.limit, cfg.queue_budget_s):
            self._reject("overload")
            wait = retry_after(self.shed, self.completions, now, cfg.retry_after_s, cfg.retry_after_max_s, self.rng)
            self.shed.append((now, wait))
            log.info("predict %s: 503 overload (%d pending, retry after %d s)", rid, self.pending, wait)
            return await _json_response(send, 503, {"detail": f"overloaded: {self.pending} requests pending; retry later"},
                                        [(b"retry-after", str(wait).encode())])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > cfg.body_bytes:
            self._reject("body_too_large")
            log.info("predict %s: 413 body_too_large (content-length)", rid)
            return await _json_response(send, 413, {"detail": f"body of {int(length)} bytes; at most {cfg.body_bytes}"}, [])
        self.pending += 1
        try:
            guard = JsonShapeGuard(cfg.body_bytes, cfg.max_records, cfg.max_text_chars)
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left: nothing to answer
                body = message.get("body", b"")
                try:
                    guard.feed(body)
                except BodyTooLarge as exc:
                    self._reject(exc.reason)
                    log.info("predict %s: 413 %s after %d bytes", rid, exc.reason, guard.n_bytes)
                    return await _json_response(send, 413, {"detail": str(exc)}, [(b"connection", b"close")])
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            self.completions.append(time.monotonic())
        finally:
            self.pending -= 1
