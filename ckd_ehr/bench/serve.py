"""`ckd-ehr bench serve`: HTTP throughput and latency of the served student on 127.0.0.1.

Per serve.precision (fp32, int8, bf16): (1) the ceiling, in-process render + tokenise + batched
forward of the same records; (2) the endpoint (`--replicas`, by default one per core with one
torch thread each; `--replicas config`: the serve section as `ckd-ehr serve` starts it;
`@serve.batch`) at 1, 16, 64 and 400 closed-loop clients (`--levels`), one
record per request (the online case), `--records long|short`, driven by wrk (compiled, niced;
`--load-generator python` for the aiohttp one) whose clients honour a 503's Retry-After or retry
at once (`--retry honour,at-once`), with, per level, the server's own latency histogram (Ray
Serve's proxy, by status code: ckd_ehr.bench.server_latency) beside what the clients saw:
records/s answered, p50/p99, share shed (503), other errors; at 64 and 400 clients retrying at
once, the overload targets (`overload_targets`). (3) The largest probability difference between
each other precision and fp32 on at least 1,000 samples. `--url` measures an endpoint already
running instead (a before/after table against other code; no server histogram).

Without a trained student in RUN/student/ckd_ehr/artifact, an artifact with an untrained
head on cfg.student.model (MiniLM-L6 by default) is built: throughput does not depend on the
head's weights. Its diagnosis title map holds placeholder titles of realistic length.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa

from ckd_ehr.config import PipelineConfig, TextConfig
from ckd_ehr.contracts import EFFICACY, SERVE_PRECISIONS, STUDENT_META, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotypes, phenotypes_of_code
from ckd_ehr.storage import exists
from ckd_ehr.bench import server_latency, wrk
from ckd_ehr.bench.common import emit, machine
from ckd_ehr.modeling.paths import resolve_model_path
from ckd_ehr.student.precision import run_texts

LEVELS = (1, 16, 64, 400)
LOAD_GENERATORS = ("wrk", "python")
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
                            titles: dict[str, str] | None = None,
                            vocabulary: dict[str, list[str]] | None = None) -> dict:
    """A student artifact (real layout, written by student.artifact.write_artifact) with an
    untrained head on encoder `model`: for benchmarks and tests of the serving path."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer

    from ckd_ehr.student.artifact import write_artifact
    from ckd_ehr.student.model import build_student, save_student

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
                              Path(tmp) / "staging", vocabulary=vocabulary)
    if titles:
        (Path(dest) / "diagnosis_titles.json").write_text(json.dumps(titles))
    return meta


RECORD_SHAPES = {
    # (phenotypes drawn, codes per phenotype, drugs, procedures) as [low, high) ranges
    "long": ((2, 6), 3, (15, 25), (0, 4)),   # a full inpatient stay: often past 512 tokens with clauses
    "short": ((4, 5), 1, (2, 3), (1, 2)),    # issue 21's records: 4 diagnoses, 2 drugs, 1 procedure
}


def bench_records(n: int, seed: int = 0, shape: str = "long") -> tuple[list[dict], dict[str, str]]:
    """n structured records and placeholder titles of realistic length for their codes.
    `long`: codes of 2-5 phenotypes (up to 3 each), 15-24 drugs, 0-3 procedures; `short`: 4
    diagnosis codes of 4 phenotypes, 2 drugs, 1 procedure."""
    if shape not in RECORD_SHAPES:
        raise ValueError(f"record shape '{shape}': one of {sorted(RECORD_SHAPES)}")
    (ph_lo, ph_hi), per_ph, (d_lo, d_hi), (p_lo, p_hi) = RECORD_SHAPES[shape]
    rng = np.random.default_rng(seed)
    ph = phenotypes()
    titles: dict[str, str] = {}
    records = []
    for _ in range(n):
        codes = []
        for p in rng.choice(len(ph), size=int(rng.integers(ph_lo, ph_hi)), replace=False):
            codes += [str(c) for c in rng.choice(ph[p].codes, size=min(per_ph, len(ph[p].codes)), replace=False)]
        for c in codes:
            titles.setdefault(c, f"{ph[phenotypes_of_code(c)[0]].name.split(';')[0]}, unspecified ({c})")
        drugs = [str(d) for d in rng.choice(_DRUGS, size=int(rng.integers(d_lo, d_hi)), replace=False)]
        procs = [str(p) for p in rng.choice(_PROCS, size=int(rng.integers(p_lo, p_hi)), replace=False)]
        records.append({"diagnoses": codes, "medications": drugs, "procedures": procs})
    return records, titles


def _free_port() -> int:

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _python_level(url: str, records_file: str, clients: int, duration: float, token: str | None, nice: int) -> dict:
    """One level from the Python generator (ckd_ehr.bench.load, aiohttp): honours Retry-After."""
    env = {**os.environ, **({"CKD_EHR_TOKEN": token} if token else {})}
    r = subprocess.run([sys.executable, "-m", "ckd_ehr.bench.load", url, records_file, str(clients), str(duration),
                        "--nice", str(nice)], capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed ({r.returncode}): {r.stderr[-2000:]}")
    return {**json.loads(r.stdout), "retry": "honour"}


def run_levels(url: str, records: list[dict], duration: float, token: str | None, nice: int,
               levels=LEVELS, generator: str = "wrk", retries=("honour",), application: str | None = None) -> list[dict]:
    """Each load level (and Retry-After behaviour) in its own niced load-generator process;
    with `application`, beside the server's own latency histogram of that level."""
    if generator not in LOAD_GENERATORS:
        raise ValueError(f"load generator '{generator}': one of {', '.join(LOAD_GENERATORS)}")
    if generator == "python" and tuple(retries) != ("honour",):
        raise ValueError("the python load generator only honours Retry-After: --retry honour, or --load-generator wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(records, f)
    bodies = wrk.bodies_tempfile(records) if generator == "wrk" else None
    urls = server_latency.metrics_urls() if application else []
    out = []
    try:
        for i, (clients, retry) in enumerate([(4, retries[0]), *((c, r) for c in levels for r in retries)]):
            warm = i == 0   # the first: warm-up, not reported
            d = min(3.0, duration) if warm else duration
            before = server_latency.settled(application, urls) if urls and not warm else None
            level = (wrk.run_wrk(url, bodies, clients, d, retry, token, nice) if generator == "wrk"
                     else _python_level(url, f.name, clients, d, token, nice))
            if warm:
                continue
            if before is not None:
                seen = server_latency.total(before) + level["answered"] + level["shed"]   # answers the clients read
                level["server"] = server_latency.summary(
                    server_latency.difference(server_latency.settled(application, urls, seen), before))
            out.append(level)
            shown = {k: level.get(k) for k in ("retry", "records_per_s", "share_shed", "errors")}
            print(f"  {clients} clients: client {json.dumps(shown)}; server {json.dumps(level.get('server'))}",
                  flush=True)
    finally:
        os.unlink(f.name)
        if bodies:
            os.unlink(bodies)
    return out


def overload_targets(levels: list[dict]) -> dict | None:
    """Issue 43's judgement on the server's histogram: at 400 clients that retry at once, p99 of
    answered requests under 5 s, 503s answered within 50 ms at p99, and goodput at least 90% of
    the 64-client rate (same clients). None without those two levels."""
    by = {(lv["concurrency"], lv.get("retry")): lv for lv in levels}
    flood, calm = by.get((400, "at-once")), by.get((64, "at-once"))
    if not flood or not calm or "server" not in flood:
        return None
    answered, shed = flood["server"].get("200", {}), flood["server"].get("503", {})
    goodput = flood["records_per_s"] / max(calm["records_per_s"], 1e-9)
    return {"p99_answered_ms": answered.get("p99_ms"), "p99_answered_under_5s": (answered.get("within_5s") or 0) >= 0.99,
            "p99_shed_ms": shed.get("p99_ms"), "p99_shed_within_50ms": (shed.get("within_50ms") or 0) >= 0.99 if shed else None,
            "goodput_vs_64": round(goodput, 3), "goodput_at_least_90pct": goodput >= 0.9}


def ceiling(artifact: str, records: list[dict], precision: str, batch_size: int, threads: int,
            compile: bool = False) -> dict:
    """In-process records/s of what a replica does per batch (render, tokenise, forward), same
    records, no HTTP: the most the endpoint can serve on these cores. bench_serve runs it in
    a Ray task, at the niceness of Ray's workers (15), like the replica."""
    # not at module level: fastapi, starlette, loaded only when this runs
    from ckd_ehr.serve.api import Record, render_and_predict
    from ckd_ehr.serve.app import load_predictor

    predictor, info = load_predictor(artifact, threads, precision, compile)
    recs = [Record(**r) for r in records]
    m = min(len(recs), 2 * batch_size)
    run = lambda rs: render_and_predict(rs, info, lambda t: predictor.predict_proba(t, batch_size))  # noqa: E731
    run(recs[:batch_size])  # warm-up
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        for s in range(0, m, batch_size):
            run(recs[s:s + batch_size])
        rates.append(m / (time.perf_counter() - t))
    return {"precision": precision, "compiled": compile, "records_per_s": round(max(rates), 2), "batch_size": batch_size,
            "torch_threads": threads, "load_avg_1m": round(os.getloadavg()[0], 1)}


def precision_agreement(cfg: PipelineConfig, artifact: str, records: list[dict], min_samples: int = 1000,
                        precision: str = "int8", compile: bool = False) -> dict:
    """Largest |p - p_fp32| over every phenotype between the student at `precision` (compiled
    or not) and the eager fp32 student: on the run's samples (every split, texts fitted as
    training did) when the run has them, else on rendered bench records."""
    # not at module level: fastapi, starlette, loaded only when this runs
    from ckd_ehr.serve.api import Record, render_record
    from ckd_ehr.student import load_student

    fp32 = load_student(artifact, precision="fp32")
    texts, source = run_texts(cfg, fp32, min_samples)
    if len(texts) < min_samples:
        # not at module level: imported only on this branch
        from ckd_ehr.serve.app import model_info

        info = model_info(fp32, artifact) if "://" not in artifact else None
        more = [render_record(Record(**r), info)[0] for r in records] if info else []
        texts, source = texts + more, f"{source} + {len(more)} bench records"
    other = load_student(artifact, precision=precision, compile=compile)
    p32, p_other = fp32.predict_proba(texts, 32), other.predict_proba(texts, 32)
    diff = np.abs(p_other - p32)
    return {"compared": f"{precision}{' compiled' if compile else ''} vs fp32", "samples": len(texts),
            "source": source, "max_abs_diff": round(float(diff.max()), 7),
            "mean_abs_diff": round(float(diff.mean()), 6), "p99_abs_diff": round(float(np.quantile(diff, 0.99)), 5),
            "decisions_changed": int(((p_other >= fp32.thresholds) != (p32 >= fp32.thresholds)).sum()),
            "cells": int(diff.size)}


def _load_options(args) -> dict:
    """run_levels' keyword arguments from the command line."""
    generator = getattr(args, "load_generator", None) or "wrk"
    retries = tuple(r for r in (getattr(args, "retry", None) or "honour").split(",") if r)
    if unknown := [r for r in retries if r not in wrk.RETRY_MODES]:
        raise ValueError(f"--retry: unknown {', '.join(unknown)} (one of {', '.join(wrk.RETRY_MODES)})")
    levels = tuple(int(c) for c in (getattr(args, "levels", None) or ",".join(map(str, LEVELS))).split(",") if c)
    if generator == "wrk":
        wrk.wrk_binary()   # before anything starts: a clear error when it is missing
    return {"generator": generator, "retries": retries, "levels": levels}


def _measure_precision(cfg: PipelineConfig, artifact: str, records: list[dict], precision: str, replicas: int | None,
                       port: int, duration: float, token: str | None, nice: int, load: dict) -> dict:
    """One precision: the in-process ceiling (a Ray task), then the endpoint under each level;
    `replicas` None: the serve section as configured (what `ckd-ehr serve` starts)."""
    # not at module level: ray, loaded only when this runs
    import ray
    from ray import serve

    from ckd_ehr.serve.app import start

    cores = os.cpu_count() or 1
    c = ray.get(ray.remote(num_cpus=1)(ceiling).remote(artifact, records, precision, cfg.serve.max_batch_size,
                                                      cores, cfg.serve.compile))
    run = {"ceiling": c}
    print(f"in-process ceiling {precision}: {c}", flush=True)
    fixed = {} if replicas is None else {"min_replicas": replicas, "max_replicas": replicas, "num_cpus": 1.0,
                                         "torch_threads": cfg.serve.torch_threads or max(1, cores // replicas)}
    s = cfg.serve.model_copy(update={"precision": precision, "access_log": False, "port": port, **fixed})
    url = start(cfg.model_copy(update={"serve": s}), artifact)
    shown = f"{replicas} replica(s)" if replicas else f"{s.min_replicas}-{s.max_replicas} replica(s) (serve section)"
    print(f"{precision} endpoint at {url} ({shown} x {s.torch_threads or round(s.num_cpus)} torch thread(s), "
          f"{s.num_cpus} CPU each, batch {s.max_batch_size}, {s.pending_requests} pending at most per replica)",
          flush=True)
    run.update(replicas=replicas or [s.min_replicas, s.max_replicas], max_batch_size=s.max_batch_size,
               max_ongoing_requests=s.ongoing_requests,
               max_pending_requests=s.pending_requests, torch_threads=s.torch_threads, num_cpus=s.num_cpus,
               levels=run_levels(url, records, duration, token, nice, application=s.app_name, **load))
    best = max(lv["records_per_s"] for lv in run["levels"])
    run["best_vs_ceiling"] = round(best / max(c["records_per_s"], 1e-9), 3)
    if targets := overload_targets(run["levels"]):
        run["overload_targets"] = targets
        print(f"overload targets (server histogram, 400 clients retrying at once): {json.dumps(targets)}", flush=True)
    serve.delete(s.app_name)
    return run


def bench_serve(cfg: PipelineConfig, args) -> dict:
    """Records/s, client and server latency and the share shed per load level, for each
    serve.precision (fp32, int8, bf16), next to the in-process ceiling; or, with --url, of an
    endpoint already running (e.g. another version of the code, for a before/after table)."""
    # not at module level: ray, loaded only when this runs
    from ray import serve

    cores = os.cpu_count() or 1
    n = int(getattr(args, "samples", None) or 512)
    duration = float(getattr(args, "duration", None) or 20.0)
    nice = int(getattr(args, "client_nice", None) if getattr(args, "client_nice", None) is not None else 19)
    url_given = getattr(args, "url", None)
    precisions = [p for p in (getattr(args, "precisions", None) or ",".join(SERVE_PRECISIONS)).split(",") if p]
    if unknown := [p for p in precisions if p not in SERVE_PRECISIONS]:
        raise ValueError(f"--precisions: unknown {', '.join(unknown)} (one of {', '.join(SERVE_PRECISIONS)})")
    load = _load_options(args)
    shape = getattr(args, "records", None) or "long"
    records, titles = bench_records(n, shape=shape)
    # one replica per core, one torch thread each, by default: measured on 2 cores (short
    # records, 64 clients) 30 records/s int8 against 20 for one replica with two threads
    given = getattr(args, "replicas", None)
    replicas = None if given == "config" else int(given or cores)
    tmp = tempfile.TemporaryDirectory(prefix="ckd-ehr-bench-serve-")
    artifact = getattr(args, "artifact", None) or RunLayout(cfg.run_dir).student_artifact("ckd_ehr")
    trained = exists(str(Path(artifact) / STUDENT_META)) if "://" not in artifact else exists(artifact)
    if not trained:
        artifact = str(Path(tmp.name) / "artifact")
        make_untrained_artifact(cfg.student.model, artifact, cfg.student.max_length, titles)
    token = os.environ.get(cfg.serve.auth_token_env)
    generator = ("wrk (compiled), one per level" if load["generator"] == "wrk"
                 else "python -m ckd_ehr.bench.load (aiohttp), one per level")
    results: dict = {"artifact": artifact, "trained_student": trained, "records": n, "record_shape": shape,
                     "replicas": None if url_given else (replicas or "config"), "levels": list(load["levels"]),
                     "duration_s_per_level": duration, "auth": bool(token), "machine": machine(),
                     "load_generator": {"process": generator, "nice": nice, "retry_after": list(load["retries"])},
                     "server_histogram": None if url_given else "Ray Serve proxy, serve_http_request_latency_ms",
                     "uptime_load_avg": [round(x, 1) for x in os.getloadavg()], "runs": {}}
    try:
        if url_given:
            print(f"endpoint at {url_given} (given)", flush=True)
            results["runs"]["given_url"] = {"url": url_given,
                                            "levels": run_levels(url_given, records, duration, token, nice, **load)}
        else:
            # not at module level: imported only on this branch
            from ckd_ehr.ray_utils import init_ray

            if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
                server_latency.fine_buckets()   # before Ray starts: its proxy reads them once
            init_ray(cfg.ray)
            port = _free_port()  # one port: Serve's proxy keeps the port it started with
            for precision in precisions:
                results["runs"][precision] = _measure_precision(cfg, artifact, records, precision, replicas, port,
                                                                duration, token, nice, load)
            _agreement(cfg, args, artifact, records, results)
    finally:
        if not url_given:
            serve.shutdown()
        tmp.cleanup()
    results["errors_total"] = sum(lv["errors"] for r in results["runs"].values() for lv in r["levels"])
    emit(results, getattr(args, "out", None))
    return results


def _agreement(cfg: PipelineConfig, args, artifact: str, records: list[dict], results: dict) -> None:
    """Each other precision's (and the compiled model's) largest probability difference from fp32."""
    agree = int(getattr(args, "agreement_samples", None) if getattr(args, "agreement_samples", None) is not None else 1000)
    others = [p for p in results["runs"] if p != "fp32"] if agree > 0 else []
    if others:
        results["precision_agreement"] = {p: precision_agreement(cfg, artifact, records, agree, p) for p in others}
        print(f"vs fp32: {results['precision_agreement']}", flush=True)
    if cfg.serve.compile and "fp32" in results["runs"] and agree > 0:   # compiled vs eager, same weights
        results["compile_agreement"] = precision_agreement(cfg, artifact, records, agree, "fp32", True)
