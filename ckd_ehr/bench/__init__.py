"""Benchmarks that print figures (`ckd-ehr bench WHAT`). Never asserted as timings in tests.

Each `bench_<what>(cfg, args)` lives in the submodule of its stage and is imported lazily.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "synth": "data", "prepare": "data", "eadf": "eadf", "teacher": "teacher",
    "soft_labels": "soft_labels", "speedup": "speedup", "serve": "serve",
    "padding": "padding", "zero3_load": "teacher",
    "ceiling": "ceiling", "synth_signal": "ceiling", "train": "train",
}


def __getattr__(name: str):
    if name.startswith("bench_") and name[6:] in _WHERE:
        module = importlib.import_module(f"ckd_ehr.bench.{_WHERE[name[6:]]}")
        return getattr(module, name)
    raise AttributeError(name)
