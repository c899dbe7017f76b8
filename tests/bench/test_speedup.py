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


def test_artifact_mode_times_the_trained_teacher_and_student(tmp_path, tiny_qwen_dir, tiny_bert_dir):
    """Artifacts written by the teacher and student stages' own writers (random tiny weights),
    timed on the test split's EADF texts through their predict functions."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from ckd_ehr import storage
    from ckd_ehr.config import TeacherConfig, TextConfig
    from ckd_ehr.contracts import EFFICACY, RunLayout
    from ckd_ehr.student.artifact import write_artifact as write_student
    from ckd_ehr.student.model import build_student, save_student
    from ckd_ehr.teacher.artifact import write_artifact as write_teacher
    from ckd_ehr.teacher.artifact import write_weights
    from ckd_ehr.teacher.model import build_teacher

    layout = RunLayout(str(tmp_path / "run"))
    teacher_cfg = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, max_length=96)
    teacher = build_teacher(teacher_cfg)
    write_weights(teacher, teacher.state_dict(), tmp_path / "tw")
    write_teacher(tmp_path / "tw", AutoTokenizer.from_pretrained(tiny_qwen_dir), teacher_cfg, {},
                  layout.teacher_artifact)
    save_student(build_student(str(tiny_bert_dir), pooling="mean"), tmp_path / "sw")
    meta = {"max_length": 64, "pooling": "mean",
            "text": {"column": "text_eadf", "config": TextConfig().model_dump(mode="json"), "top_k": 5},
            "thresholds": {"fixed": [0.5] * 25, "tuned": [0.5] * 25, "served": "tuned"}}
    write_student(layout.student_artifact("ckd_ehr"), tmp_path / "sw", AutoTokenizer.from_pretrained(tiny_bert_dir),
                  meta, EFFICACY.empty_table(), tmp_path / "stage")
    texts = [f"The patient-acquired disease is sepsis{', pneumonia' * i}." for i in range(6)]
    storage.write_parquet(pa.table({"text_eadf": texts}), layout.augmented("test"))

    cfg = load_config(PipelineConfig, None, [f"run_dir={layout.root}"])
    args = argparse.Namespace(arch_only=False, samples=4, out=None)
    results = S.bench_speedup(cfg, args, batch_sizes=(1, 4))
    assert results["samples"] == 4 and results["teacher_max_length"] == 96 and results["student_max_length"] == 64
    for who in ("student", "teacher"):
        assert set(results[who]["throughput"]) == {1, 4}
        assert all(r["samples"] == 4 for r in results[who]["throughput"].values())
    assert results["speedup"] == pytest.approx(
        results["student"]["best_samples_per_s"] / results["teacher"]["best_samples_per_s"], rel=0.01)
