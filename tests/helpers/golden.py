"""The tiny pipeline's test predictions against a committed golden file: a refactor that should
not change behaviour must leave them bitwise equal.

Bitwise holds only where the floating-point kernels are the same: the same CPU model and torch.
On another machine the comparison falls back to a tolerance and says so (oneDNN picks kernels by
instruction set, so sums round differently). `CKD_EHR_UPDATE_GOLDEN=1` rewrites the file: only
for a change that is meant to alter the predictions, and said so in its commit.
"""
from __future__ import annotations

import json
import os
import platform

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout

from helpers.paths import REPO

GOLDEN = REPO / "tests" / "golden" / "tiny_run_predictions.npz"
OTHER_MACHINE_ATOL = 1e-3
"""Probabilities on a CPU or torch other than the golden file's: tiny models, a few steps."""


def machine() -> dict:
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "torch": torch.__version__}


def tiny_run_predictions(run_dir, variants) -> dict[str, np.ndarray]:
    """Test-split probabilities, rows in sample_id order: every student variant's, and the teacher's
    soft labels."""
    layout = RunLayout(str(run_dir))
    paths = {f"student_{v}": layout.predictions(v) for v in variants}
    paths["teacher_soft_labels"] = layout.soft_labels("test")
    out = {}
    for name, path in paths.items():
        table = storage.read_parquet(path, columns=["sample_id", "probs"])
        order = np.argsort(np.asarray(table.column("sample_id").to_pylist()), kind="stable")
        out[name] = np.asarray(table.column("probs").to_pylist(), dtype=np.float32)[order]
    return out


def compare_with_golden(current: dict[str, np.ndarray]) -> str:
    """Raise AssertionError naming what differs; return how it compared."""
    if os.environ.get("CKD_EHR_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        np.savez(GOLDEN, __machine__=np.array(json.dumps(machine())), **current)
        return f"wrote {GOLDEN}"
    assert GOLDEN.exists(), f"{GOLDEN} missing: write it with CKD_EHR_UPDATE_GOLDEN=1 (and commit it)"
    golden = np.load(GOLDEN)
    made_on = json.loads(str(golden["__machine__"]))
    names = sorted(k for k in golden.files if k != "__machine__")
    assert names == sorted(current), f"golden file holds {names}, the run {sorted(current)}"
    bitwise = made_on == machine()
    for name in names:
        want, got = golden[name], current[name]
        assert want.shape == got.shape, f"{name}: shape {got.shape}, golden {want.shape}"
        if bitwise:
            assert np.array_equal(want.view(np.uint32), got.view(np.uint32)), (
                f"{name}: not bitwise equal to the golden file (max |diff| {np.abs(want - got).max():.3g})")
        else:
            assert np.allclose(want, got, atol=OTHER_MACHINE_ATOL, rtol=0), (
                f"{name}: max |diff| {np.abs(want - got).max():.3g} > {OTHER_MACHINE_ATOL} (golden file from "
                f"{made_on}, this machine {machine()})")
    return "bitwise" if bitwise else f"within {OTHER_MACHINE_ATOL} (golden file from {made_on})"
