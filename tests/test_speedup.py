"""`bench speedup --arch-only` with tiny dims; the published dims checked by parameter count.
No timing is asserted: timings are only printed."""
from __future__ import annotations

import argparse
import json

import pytest

from ckd_ehr.bench import speedup as S
from ckd_ehr.config import PipelineConfig, load_config

TINY_TEACHER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000)
TINY_STUDENT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=500, max_position_embeddings=512)
# Counted on the meta device only: an embedding this large can never be allocated.
HUGE_TEACHER = {**TINY_TEACHER, "vocab_size": 10**11}


def test_published_dims_give_the_published_parameter_counts():
    head = lambda hidden: hidden * 25 + 25  # noqa: E731
    bert, _ = S.count_params("student", S.BERT_BASE)
    assert bert - head(768) == 108_891_648          # bert-base-uncased without its pooler
    qwen, embedding = S.count_params("teacher", S.QWEN_SIZES["qwen2.5-0.5b"])
    assert qwen - head(896) == 494_032_768          # Qwen2.5-0.5B (tied embeddings)
    assert embedding == 151936 * 896


def test_forward_flops_by_hand():
    size = {"num_hidden_layers": 2, "hidden_size": 8}
    assert S.forward_flops(1000, 200, size, 4) == 2 * 800 * 4 + 4 * 2 * 16 * 8


def test_arch_only_measures_tiny_models_and_skips_what_does_not_fit(tmp_path):
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path}"])
    out = tmp_path / "speedup.json"
    args = argparse.Namespace(arch_only=True, samples=2, out=str(out))
    results = S.bench_speedup(cfg, args, sizes={"tiny": TINY_TEACHER, "huge": HUGE_TEACHER},
                              student_size=TINY_STUDENT, seq_len=16, batch_sizes=(1, 2))
    assert json.loads(out.read_text())["speedup"] == results["speedup"]
    student, tiny, huge = results["student"], results["teachers"]["tiny"], results["teachers"]["huge"]
    for entry in (student, tiny):
        assert set(entry["throughput"]) == {1, 2}
        assert entry["best_samples_per_s"] == max(r["samples_per_s"] for r in entry["throughput"].values())
        assert entry["throughput"][1]["samples"] >= 2
    assert results["speedup"]["tiny"] == pytest.approx(student["best_samples_per_s"] / tiny["best_samples_per_s"],
                                                       rel=0.01)
    assert "does not fit" in huge["skipped"] and "huge" not in results["speedup"]
    assert results["compute_ratio"]["tiny"] == pytest.approx(tiny["flops_per_sample"] / student["flops_per_sample"],
                                                             rel=0.01)
    assert results["paper_speedup"] == 22.2 and results["machine"]["cores"] >= 1


def test_slow_batch_sizes_are_skipped_not_run():
    calls = []
    results = S.time_batches(lambda bs: calls.append(bs), (1, 10**9), min_samples=1, max_measure_s=0.5,
                             device="cpu")
    assert "skipped" in results[10**9] and 10**9 not in calls
