"""Ray Serve at the edge: one deployment that loads a student artifact and serves `api.create_app`.

Every record of every request goes into one `@serve.batch` queue, so records from many
concurrent requests share a forward pass; the batch is rendered, tokenised and run in a
worker thread (torch and the tokenizers release the GIL), so the event loop only moves
HTTP. The batch size counts records, and `max_ongoing_requests` defaults to twice it: a
replica that admits fewer requests than a batch holds would wait out batch_wait_timeout_s on
every call. Of those, `serve.pending_requests` (three quarters) may be predictions; the
rest is kept for /healthz and fast 503s (guard.RequestGuard), so a flood is shed at once
and health checks answer throughout. `serve.precision` int8 quantises the encoder, bf16 runs it under bf16 autocast.

Local runs bind 127.0.0.1 (`serve.host`). The bearer token is read from the environment
variable `serve.auth_token_env`: `run_serve` hands replicas only its sha256; replicas
started by `serve deploy` or KubeRay read the variable themselves (from a Secret there).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import LoggingConfig
import torch
from ray.serve.config import BackpressureConfig

from ckd_ehr.config import PipelineConfig, ServeConfig
from ckd_ehr.contracts import RunLayout
from ckd_ehr.phenotypes import normalize_icd9
from ckd_ehr.serve.api import ModelInfo, Record, create_app, item_key, render_and_predict, token_digest
from ckd_ehr.serve.metrics import RayServeMetrics
from ckd_ehr.student.artifact import VOCABULARY_FILE
from ckd_ehr.storage import local_dir
from ckd_ehr.student import load_student
from ckd_ehr.config import load_config
from ckd_ehr.ray_utils import init_ray

log = logging.getLogger("ckd_ehr.serve")

TITLES_FILE = "diagnosis_titles.json"  # optional in an artifact: {ICD-9 code: title}


def model_info(predictor, artifact_dir: str | os.PathLike) -> ModelInfo:
    """ModelInfo from a loaded StudentPredictor and its (local) artifact directory."""
    titles_path = Path(artifact_dir) / TITLES_FILE
    titles = {}
    if titles_path.exists():
        # ICD-9 keys are stored normalised; ICD-10-CM keys dotted (MIMIC-IV runs), kept as they are.
        titles = {(k if "." in k else normalize_icd9(k)): str(v) for k, v in json.loads(titles_path.read_text()).items()}
    vocab_path = Path(artifact_dir) / VOCABULARY_FILE
    vocabulary = None
    if vocab_path.exists():
        items = json.loads(vocab_path.read_text())
        vocabulary = frozenset(item_key(s) for s in [*items.get("drugs", []), *items.get("procedures", []),
                                                      *titles, *titles.values(), *predictor.label_names]) - {""}
    return ModelInfo(
        artifact_id=str(predictor.meta["artifact_id"]),
        label_names=list(predictor.label_names),
        thresholds=[float(t) for t in predictor.thresholds],
        text_config=predictor.text_config,
        efficacy={k: list(v) for k, v in (predictor.efficacy or {}).items()},
        diagnosis_titles=titles,
        vocabulary=vocabulary,
        icd10_crosswalk=str((predictor.meta.get("data") or {}).get("icd10_crosswalk") or "hcup_ccs"),
        render=_own_tokenizer_render(predictor))


def _own_tokenizer_render(predictor):
    """predictor.render on a shallow copy with its own tokenizer.

    Rendering runs on the event loop while a batch is tokenised in a worker thread; a Hugging
    Face fast tokenizer used from two threads at once can fail ('Already borrowed': setting
    truncation needs exclusive access), so the two paths never share one."""
    if not hasattr(predictor, "render"):
        return None
    clone = copy.copy(predictor)
    clone.tokenizer = copy.deepcopy(predictor.tokenizer)
    return clone.render


def load_predictor(artifact: str, torch_threads: int | None = None, precision: str = "fp32",
                   compile: bool = False):
    """(StudentPredictor, ModelInfo) for a local path or URI (copied locally while loading);
    `compile`: serve.compile."""


    if torch_threads:
        torch.set_num_threads(torch_threads)
    with local_dir(artifact) as d:
        predictor = load_student(d, device="cpu", precision=precision, compile=compile)
        return predictor, model_info(predictor, d)


@serve.deployment(name="StudentDeployment")
@serve.ingress()  # the FastAPI app is built per replica by __serve_build_asgi_app__
class StudentDeployment:
    def __init__(self, artifact: str, serve_cfg: dict[str, Any], token_sha256: str | None = None):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        threads = self.cfg.torch_threads or max(1, round(self.cfg.num_cpus))
        self.predictor, self.info = load_predictor(artifact, threads, self.cfg.precision, self.cfg.compile)
        self.metrics = RayServeMetrics(self.info.artifact_id, self.cfg.precision)
        if token_sha256 is None and os.environ.get(self.cfg.auth_token_env):
            token_sha256 = token_digest(os.environ[self.cfg.auth_token_env])
        self.token_sha256 = token_sha256
        self.predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        log.info("serving %s (%s%s, auth %s, batch %d, %d pending requests at most)", self.info.artifact_id,
                 self.cfg.precision, ", compiled" if self.cfg.compile else "", "on" if token_sha256 else "off",
                 self.cfg.max_batch_size,
                 self.cfg.pending_requests)

    def __serve_build_asgi_app__(self):
        return create_app(self, self.cfg, self.token_sha256, self.metrics)

    async def predict(self, records: list[Record]) -> tuple[np.ndarray, list[list[str]]]:
        """One request's records: each joins the shared batch queue."""
        rows = await asyncio.gather(*(self.predict_batch(r) for r in records))
        probs = np.stack([p for p, _ in rows]) if rows else np.zeros((0, len(self.info.label_names)), np.float32)
        return probs, [w for _, w in rows]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # reset from config in __init__
    async def predict_batch(self, records: list[Record]) -> list[tuple[np.ndarray, list[str]]]:
        # rendering, tokenisation and forward of the whole batch, off the event loop
        probs, warnings = await asyncio.to_thread(
            render_and_predict, records, self.info, lambda t: self.predictor.predict_proba(t, len(t)))
        self.metrics.scored(len(records))
        return list(zip(probs, warnings))

    def stats(self) -> dict:
        return self.metrics.snapshot()

    def check_health(self) -> None:
        # Cheap: the model is loaded and its batch loop has not died.
        if self.predictor is None or self.info is None:
            raise RuntimeError("no model loaded")


def _deployment_options(cfg: ServeConfig) -> dict[str, Any]:

    return dict(
        # admission (serve.pending_requests) is the replica's own; the headroom lets a flood reach
        # it to be shed at once instead of queueing at the proxy, /healthz among it
        max_ongoing_requests=cfg.ongoing_requests + cfg.shed_headroom,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
        autoscaling_config=AutoscalingConfig(
            min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
            initial_replicas=max(cfg.min_replicas, 1),
            target_ongoing_requests=cfg.target_ongoing_requests),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        health_check_period_s=10, health_check_timeout_s=30,
        logging_config=LoggingConfig(enable_access_log=cfg.access_log),
    )


def build_app(cfg: PipelineConfig, artifact: str | None = None, token_sha256: str | None = None):
    """The Serve application for `artifact` (default RUN/student/ckd_ehr/artifact)."""
    artifact = str(artifact or RunLayout(cfg.run_dir).student_artifact("ckd_ehr"))
    if "://" not in artifact:
        artifact = os.path.abspath(artifact)
    if token_sha256 is None and os.environ.get(cfg.serve.auth_token_env):
        token_sha256 = token_digest(os.environ[cfg.serve.auth_token_env])
    dep = StudentDeployment.options(**_deployment_options(cfg.serve))
    return dep.bind(artifact, cfg.serve.model_dump(mode="json"), token_sha256)


def app_builder(args: dict[str, Any]):
    """Entry for `serve deploy` / `serve run` config files (cluster/serve/serve_config.yaml).

    args: `artifact` (path or URI), optional `config` (YAML path) and `overrides` (list of
    key.path=value). Replicas read the token from serve.auth_token_env themselves.
    """

    cfg = load_config(PipelineConfig, args.get("config"), list(args.get("overrides") or []))
    dep = StudentDeployment.options(**_deployment_options(cfg.serve))
    return dep.bind(str(args["artifact"]), cfg.serve.model_dump(mode="json"), None)


def start(cfg: PipelineConfig, artifact: str | None = None, token_sha256: str | None = None) -> str:
    """Start Serve on cfg.serve.host:port, deploy the student, return the base URL."""

    init_ray(cfg.ray)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=LoggingConfig(
        enable_access_log=s.access_log))
    serve.run(build_app(cfg, artifact, token_sha256), name=s.app_name, route_prefix=s.route_prefix,
              blocking=False)
    prefix = s.route_prefix.rstrip("/")
    return f"http://{s.host}:{s.port}{prefix}"


def run_serve(cfg: PipelineConfig, artifact: str | None = None, blocking: bool = True) -> str:
    """`ckd-ehr serve`: serve the student on 127.0.0.1 (by default) until Ctrl-C."""
    url = start(cfg, artifact)
    docs = f"{url}/docs" if cfg.serve.api_docs else f"{url}/openapi.json"
    print(f"ckd-ehr: serving at {url}/v1/predict (API: {docs}); Ctrl-C stops", flush=True)
    if not blocking:
        return url

    def stop(signum, frame):  # `kill` (SIGTERM) shuts down as cleanly as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("ckd-ehr: shutting down Serve", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
    return url
