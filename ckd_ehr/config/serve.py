"""Config of the Ray Serve endpoint."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section
from ckd_ehr.contracts import SERVE_PRECISIONS


class ServeConfig(Section):
    host: str = "127.0.0.1"
    """Bind address of the HTTP proxy; loopback by default (patient data)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    api_docs: bool = False
    """Serve FastAPI's interactive /docs page. Off by default: the page loads its scripts from a
    public CDN, so on a hospital network without the internet it is blank. /openapi.json (the
    API's schema) is served either way."""
    max_batch_size: int = Field(8, ge=1)
    """Largest batch `@serve.batch` forms. 8: on a 2-core CPU larger batches bought little
    throughput and doubled the tail latency (docs/benchmarks.md, "Serve under load"); raise it
    on a GPU."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a batch waits to fill."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Per-replica concurrency; None = 2 x max_batch_size (must be >= the batch size)."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling floor."""
    max_replicas: int = Field(2, ge=1)
    """Autoscaling ceiling."""
    target_ongoing_requests: float = Field(6, gt=0)
    """Autoscaling target of ongoing requests per replica: half the default admission limit
    (12), so a replica is added before one sheds."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per replica; None = num_cpus rounded (at least 1)."""
    max_pending_requests: int | None = Field(None, ge=1)
    """Predict requests one replica holds at once (waiting for or in a forward pass); one more
    is answered 503 with Retry-After at once, before its body is read. None = three quarters of
    max_ongoing_requests: the last quarter stays free for /healthz and for fast rejections, so
    a flood never queues them behind predictions. Bounds latency: about this many records
    divided by the replica's records/s."""
    queue_budget_s: float | None = Field(None, gt=0)
    """Admission also shrinks to the predict requests the replica answered in this many seconds
    lately (its rate over the last 10 s), so on a slow or busy machine admitted requests wait
    about this long instead of max_pending_requests / rate; None = the fixed limit only. Off by
    default: at 1 s on a 2-core machine it shed most requests and cut goodput (docs/serving.md)."""
    shed_headroom: int = Field(512, ge=0)
    """Requests a replica accepts beyond max_ongoing_requests only to answer them at once (503
    over the admission limit; /healthz always). Ray Serve's max_ongoing_requests is set to
    max_ongoing_requests + this: without it a flood queues at Ray Serve's proxy, unbounded,
    with /healthz behind it."""
    retry_after_s: int = Field(2, ge=0)
    """Retry-After (seconds) of a 503 for overload, here and at Ray Serve's proxy; the least a
    replica tells. Each shed request still costs the proxy and the replica a little CPU: a
    client that waits before retrying keeps a flood of them from eating the cores that serve."""
    retry_after_max_s: int = Field(30, ge=0)
    """The most a replica tells: under a crowd it tells shed clients to wait until, together,
    they come back at about its answer rate (serve/guard.py: retry_after), jittered, up
    to this; at or below retry_after_s = always retry_after_s."""
    max_queued_requests: int = Field(-1, ge=-1)
    """Ray Serve's own queue bound per caller (proxy) for requests no replica has room for;
    -1 = unbounded. The replica's admission limit (max_pending_requests) sheds first; this is
    a backstop while replicas start (it would also shed /healthz, hence off by default)."""
    precision: Literal[SERVE_PRECISIONS] = "fp32"
    """`bf16`: the encoder runs under bf16 autocast (matrix products in bf16, LayerNorm and
    softmax in fp32; the head stays fp32): faster on CPUs with bf16 matrix units, probabilities
    within about 0.01 of fp32. `int8`: dynamic int8 quantisation of the encoder's linear layers,
    CPU only: usually faster, probabilities move more. `bench serve` measures each with its
    largest difference from fp32 (figures: docs/serving.md); `evaluate` scores the chosen one as
    its own row."""
    compile: bool = False
    """torch.compile the encoder at load (dynamic shapes), compiled before the replica takes
    traffic: the same answers as eager, a few percent more records/s, about a minute more
    start-up and a C++ compiler on the machine. Off by default for that start-up (docs/serving.md)."""
    max_body_bytes: int | None = Field(None, ge=1)
    """Largest request body, counted as it arrives (chunked or not); None = derived from
    max_records and max_text_chars (worst-case UTF-8 JSON)."""
    max_records: int = Field(256, ge=1)
    """Most records in one request (more gets 413)."""
    max_text_chars: int = Field(20000, ge=1)
    """Longest record in characters: its free text, or all its structured items together (longer gets 413)."""
    auth_token_env: str = "CKD_EHR_TOKEN"
    """Environment variable that holds the bearer token; unset = no auth."""
    app_name: str = "ckd-ehr"
    """Name of the Serve application."""
    route_prefix: str = "/"
    """Route prefix of the application (the API lives under it)."""
    access_log: bool = True
    """Serve access log: method, route, status and latency per request, never bodies."""

    @model_validator(mode="after")
    def _batch_fits(self):
        # A replica that admits fewer requests than a batch holds never fills a batch and
        # waits out batch_wait_timeout_s on every call: latency explodes.
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"serve.max_batch_size ({self.max_batch_size})")
        if self.max_pending_requests is not None and not (
                self.max_batch_size <= self.max_pending_requests < self.ongoing_requests):
            raise ValueError(f"serve.max_pending_requests ({self.max_pending_requests}) must be >= serve.max_batch_size "
                             f"({self.max_batch_size}) and < max_ongoing_requests ({self.ongoing_requests})")
        if self.min_replicas > self.max_replicas:
            raise ValueError("serve.min_replicas must be <= serve.max_replicas")
        return self

    @property
    def ongoing_requests(self) -> int:
        """max_ongoing_requests, defaulted to twice the batch size."""
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def pending_requests(self) -> int:
        """max_pending_requests, defaulted to three quarters of max_ongoing_requests."""
        if self.max_pending_requests is not None:
            return self.max_pending_requests
        ongoing = self.ongoing_requests
        return max(1, self.max_batch_size if ongoing < 2 else min(ongoing - 1, max(self.max_batch_size, ongoing * 3 // 4)))

    @property
    def body_bytes(self) -> int:
        """max_body_bytes, defaulted to worst-case UTF-8 JSON of max_records full records."""
        return self.max_body_bytes or self.max_records * (self.max_text_chars + 1024) * 4
