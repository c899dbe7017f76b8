"""Ray Serve endpoint of the student: `run_serve` (CLI `ckd-ehr serve`) and `build_app`.

`api` holds the HTTP API as plain functions (no Ray); `app` the Serve deployment. Imported
lazily so `ckd_ehr.serve.api` can be used without importing Ray Serve.
"""
from __future__ import annotations


def run_serve(cfg, artifact=None, blocking=True):
    # not at module level: fastapi, ray, starlette, torch, loaded only when this runs
    from ckd_ehr.serve.app import run_serve as _run

    return _run(cfg, artifact=artifact, blocking=blocking)


def build_app(cfg, artifact=None, token_sha256=None):
    # not at module level: fastapi, ray, starlette, torch, loaded only when this runs
    from ckd_ehr.serve.app import build_app as _build

    return _build(cfg, artifact, token_sha256)


__all__ = ["run_serve", "build_app"]
