"""Shared helpers for benchmarks: wall time, peak memory, machine description."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from contextlib import contextmanager

import psutil


def machine() -> dict:
    # not at module level: torch, loaded only when this runs
    import torch

    from ckd_ehr.student.model import cpu_has_amx

    info = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_amx": cpu_has_amx(),   # bf16 serving is fast only with AMX
        "cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
    }
    return info


def _cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux), e.g. 'AMD EPYC 9R14' or 'Intel(R) Xeon(R) ...'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@contextmanager
def measure(label: str, results: dict):
    """Record wall time, peak RSS (this process and its children, sampled) and CPU seconds
    (this process and its children; less sensitive than wall time to a loaded machine) under `label`."""
    proc = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                rss = 0
            peak[0] = max(peak[0], rss)
            stop.wait(0.05)

    def cpu_by_pid() -> dict[int, float]:
        out = {}
        for p in [proc, *proc.children(recursive=True)]:
            try:
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
            except psutil.Error:
                pass
        return out

    cpu0 = cpu_by_pid()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        wall = time.perf_counter() - start
        stop.set()
        t.join()
        cpu1 = cpu_by_pid()  # CPU seconds of this process and its children (Ray workers) alive at the end
        cpu = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
        self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results[label] = {"wall_s": round(wall, 3), "peak_rss_mib": round(max(peak[0], 0) / 2**20, 1),
                          "process_max_rss_mib": round(self_peak / 2**20, 1), "cpu_s": round(cpu, 3)}


def emit(results: dict, out: str | None = None) -> None:
    results.setdefault("machine", machine())
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if out:
        # not at module level: imported only on this branch
        from ckd_ehr.storage import write_text
        write_text(out, text + "\n")
