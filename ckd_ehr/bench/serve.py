"""`ckd-ehr bench serve`: HTTP throughput and latency of the served student on 127.0.0.1.

Three figures on the same cores: (1) the ceiling, in-process batched forward of the same
model on the same rendered texts; (2) the batched endpoint (`@serve.batch`) at a few client
concurrencies; (3) the same endpoint with max_batch_size 1. Clients are asyncio + httpx in
this process, one record per request (the online case), bounded in time (args.duration per
level) and count. The clients share the cores with the replica, as they would on one box.

Without a trained student in RUN/student/ckd_ehr/artifact, an artifact with an untrained
head on cfg.student.model (MiniLM-L6 by default) is built: throughput does not depend on the
head's weights. Its diagnosis title map holds placeholder titles of realistic length.
"""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import PipelineConfig, TextConfig
from ..contracts import EFFICACY, RunLayout
from ..phenotypes import NUM_PHENOTYPES, phenotypes, phenotypes_of_code
from ..storage import exists
from .common import emit, machine

LEVELS = (1, 8, 32, 64)
_DRUGS = ["Sodium Chloride 0.9%  Flush", "Potassium Chloride", "Heparin", "Insulin", "Furosemide",
          "Metoprolol Tartrate", "Acetaminophen", "Pantoprazole", "Docusate Sodium", "Senna",
          "Magnesium Sulfate", "Vancomycin", "Piperacillin-Tazobactam", "Lisinopril", "Aspirin",
          "Atorvastatin", "Warfarin", "Morphine Sulfate", "Ondansetron", "Albuterol 0.083% Neb Soln",
          "Calcium Gluconate", "Famotidine", "Levothyroxine Sodium", "Amiodarone HCl", "Lorazepam"]
_PROCS = ["Venous cath NEC", "Insert endotracheal tube", "Cont inv mec ven <96 hrs", "Packed cell transfusion",
          "Arterial catheterization", "Hemodialysis", "Enteral infusion nutrit"]


def efficacy_table_for_bench(top_k: int = 5) -> pa.Table:
    """An EFFICACY table with top_k ranked drugs per phenotype (placeholder statistics)."""
    rows = []
    for p in phenotypes():
        for r in range(top_k):
            drug = _DRUGS[(p.index * 3 + r) % len(_DRUGS)]
            rows.append(dict(phenotype_index=p.index, phenotype=p.name, drug=drug, n_given=100, resolved_given=60,
                             n_not_given=100, resolved_not_given=40, rate_given=0.6, rate_not_given=0.4,
                             effect=0.2, lower=0.05, upper=0.35, risk_ratio=1.5, score=0.05 - r * 0.001,
                             rank=r + 1, ranking="efficacy"))
    return pa.Table.from_pylist(rows, schema=EFFICACY)


def make_untrained_artifact(model: str, dest: str | os.PathLike, max_length: int = 512,
                            titles: dict[str, str] | None = None) -> dict:
    """A student artifact (real layout, written by student.artifact.write_artifact) with an
    untrained head on encoder `model`: for benchmarks and tests of the serving path."""
    from transformers import AutoTokenizer

    from ..models import resolve_model_path
    from ..student.artifact import write_artifact
    from ..student.model import build_student, save_student

    path = resolve_model_path(model)
    student = build_student(path, pooling="mean", seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    rng = np.random.default_rng(0)
    tuned = np.round(rng.uniform(0.3, 0.7, NUM_PHENOTYPES), 3).tolist()
    meta = {"config": {"model": model, "untrained_head": True}, "max_length": max_length, "pooling": "mean",
            "text": {"column": "text_eadf", "config": TextConfig().model_dump(mode="json"), "top_k": 5},
            "thresholds": {"fixed": [0.5] * NUM_PHENOTYPES, "tuned": tuned, "served": "tuned"}, "metrics": {}}
    with tempfile.TemporaryDirectory(prefix="ckd-ehr-art-") as tmp:
        save_student(student, Path(tmp) / "weights")
        meta = write_artifact(str(dest), Path(tmp) / "weights", tok, meta, efficacy_table_for_bench(),
                              Path(tmp) / "staging")
    if titles:
        (Path(dest) / "diagnosis_titles.json").write_text(json.dumps(titles))
    return meta


def bench_records(n: int, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """n structured records (codes of 2-5 phenotypes plus others, ~25 drugs, a few
    procedures) and placeholder titles of realistic length for their codes."""
    rng = np.random.default_rng(seed)
    ph = phenotypes()
    titles: dict[str, str] = {}
    records = []
    for _ in range(n):
        codes = []
        for p in rng.choice(len(ph), size=int(rng.integers(2, 6)), replace=False):
            codes += [str(c) for c in rng.choice(ph[p].codes, size=min(3, len(ph[p].codes)), replace=False)]
        for c in codes:
            titles.setdefault(c, f"{ph[phenotypes_of_code(c)[0]].name.split(';')[0]}, unspecified ({c})")
        drugs = [str(d) for d in rng.choice(_DRUGS, size=int(rng.integers(15, 25)), replace=False)]
        procs = [str(p) for p in rng.choice(_PROCS, size=int(rng.integers(0, 4)), replace=False)]
        records.append({"diagnoses": codes, "medications": drugs, "procedures": procs})
    return records, titles


async def _load(url: str, records: list[dict], concurrency: int, duration: float, headers: dict,
                timeout_s: float = 120.0) -> dict:
    """`concurrency` clients posting one record each, back to back, for `duration` seconds."""
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}  # 'status_503', 'timeout', 'ReadError', ...: server vs client side
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s, headers=headers) as client:
        async def worker(k: int):
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", json={"records": [records[i % len(records)]]})
                    kind = None if r.status_code == 200 else f"status_{r.status_code}"
                except httpx.TimeoutException:
                    kind = "timeout"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                if kind is None:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[kind] = errors.get(kind, 0) + 1
                i += concurrency
        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    q = np.percentile(lat, [50, 95, 99]) * 1000 if lat else [float("nan")] * 3
    return {"concurrency": concurrency, "requests": len(lat), "errors": sum(errors.values()), "error_kinds": errors,
            "throughput_rps": round(len(lat) / wall, 2), "p50_ms": round(float(q[0]), 1),
            "p95_ms": round(float(q[1]), 1), "p99_ms": round(float(q[2]), 1),
            "load_avg_1m": round(os.getloadavg()[0], 1)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _levels(url: str, records, duration: float, headers: dict) -> list[dict]:
    out = []
    asyncio.run(_load(url, records, 4, min(3.0, duration), headers))  # warm-up
    for c in LEVELS:
        out.append(asyncio.run(_load(url, records, c, duration, headers)))
        print(f"  concurrency {c}: {out[-1]}", flush=True)
    return out


def bench_serve(cfg: PipelineConfig, args) -> dict:
    import torch
    from ray import serve

    from ..serve.api import render_record, Record
    from ..serve.app import load_predictor, start

    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    cores = os.cpu_count() or 1
    n = int(getattr(args, "samples", None) or 512)
    duration = float(getattr(args, "duration", None) or 20.0)
    records, titles = bench_records(n)
    tmp = tempfile.TemporaryDirectory(prefix="ckd-ehr-bench-serve-")
    artifact = RunLayout(cfg.run_dir).student_artifact("ckd_ehr")
    trained = exists(str(Path(artifact) / "student.json")) if "://" not in artifact else exists(artifact)
    if not trained:
        artifact = str(Path(tmp.name) / "artifact")
        make_untrained_artifact(cfg.student.model, artifact, cfg.student.max_length, titles)
    results: dict = {"artifact": artifact, "trained_student": trained, "records": n,
                     "duration_s_per_level": duration, "machine": machine()}

    # (1) ceiling: in-process, batched, same texts, all cores
    predictor, info = load_predictor(artifact, torch_threads=cores)
    texts = [render_record(Record(**r), info)[0] for r in records]
    results["mean_text_chars"] = round(float(np.mean([len(t) for t in texts])), 1)
    results["mean_tokens"] = round(float(np.mean([len(x) for x in predictor.tokenizer(texts)["input_ids"]])), 1)
    bs = cfg.serve.max_batch_size
    predictor.predict_proba(texts[:bs], bs)  # warm-up
    ceiling_runs: list[float] = []

    def ceiling():
        # Measured before, between and after the endpoint runs: on a shared machine the load
        # drifts, and the ratio is only fair against a ceiling taken at about the same time.
        m = min(n, 4 * bs)
        t = time.perf_counter()
        predictor.predict_proba(texts[:m], bs)
        ceiling_runs.append(round(m / (time.perf_counter() - t), 2))
        print(f"in-process ceiling: {ceiling_runs[-1]} records/s (load {os.getloadavg()[0]:.1f})", flush=True)

    ceiling()
    headers = {}
    if os.environ.get(cfg.serve.auth_token_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.serve.auth_token_env]}"
    variants = {"batched": {"max_batch_size": bs}, "unbatched": {"max_batch_size": 1}}
    port = _free_port()  # one port: Serve's proxy keeps the port it started with
    try:
        for name, upd in variants.items():
            s = cfg.serve.model_copy(update={**upd, "max_ongoing_requests": None, "min_replicas": 1,
                                             "max_replicas": 1, "num_cpus": 1.0, "torch_threads": cores,
                                             "access_log": False, "port": port})
            c = cfg.model_copy(update={"serve": s})
            url = start(c, artifact)
            print(f"{name} endpoint at {url} (max_batch_size {s.max_batch_size})", flush=True)
            results[name] = {"max_batch_size": s.max_batch_size, "max_ongoing_requests": s.ongoing_requests,
                             "levels": _levels(url, records, duration, headers)}
            serve.delete(s.app_name)
            ceiling()
    finally:
        serve.shutdown()
        tmp.cleanup()
    results["in_process"] = {"batch_size": bs, "torch_threads": torch.get_num_threads(), "runs_rps": ceiling_runs,
                             "throughput_rps": float(np.median(ceiling_runs))}
    best = max(lv["throughput_rps"] for lv in results["batched"]["levels"])
    results["batched_vs_in_process"] = round(best / results["in_process"]["throughput_rps"], 3)
    results["batched_vs_unbatched"] = round(
        best / max(max(lv["throughput_rps"] for lv in results["unbatched"]["levels"]), 1e-9), 3)
    results["errors_total"] = sum(lv["errors"] for v in ("batched", "unbatched") for lv in results[v]["levels"])
    emit(results, getattr(args, "out", None))
    return results
