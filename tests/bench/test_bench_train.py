"""`ckd-ehr bench train` runs every lever on a run's texts and prints figures (never asserted as
timings): a smoke test on tiny models, and the FLOP count it divides by."""
from types import SimpleNamespace

import pytest

from ckd_ehr.config import PipelineConfig

from helpers.student_run import build_run_dir


def test_step_flops_count_the_layers_that_run():
    from transformers import BertConfig

    from ckd_ehr.bench.train import layer_flops, step_flops

    cfg = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
    per_token, attn, layers = layer_flops(cfg)
    assert per_token == 2 * (4 * 384 * 384 + 2 * 384 * 1536) and layers == 6
    full = step_flops(cfg, [100, 80], 512, 6, True, False)
    top2 = step_flops(cfg, [100, 80], 512, 2, True, True)
    layer = 200 * (per_token + attn * 100)      # 2 rows padded to 100 tokens, one layer's forward
    assert full == pytest.approx(6 * layer * 3) and top2 == pytest.approx(2 * layer * 3)


@pytest.mark.slow
def test_bench_train_prints_every_lever(tmp_path, tiny_bert_dir):
    from ckd_ehr.bench.train import bench_train

    build_run_dir(tmp_path)
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path), "student": {
        "model": str(tiny_bert_dir), "num_workers": 1, "cpus_per_worker": 1, "batch_size": 4, "max_length": 128}})
    out = bench_train(cfg, SimpleNamespace(model="student", steps=2, samples=16, levers=None,
                                           out=str(tmp_path / "bench.json")))
    assert set(out) >= {"today", "compact", "top_layers", "bf16", "all", "peak_gflops", "machine"}
    assert out["peak_gflops"]["fp32"] > 0 and out["machine"]["cpu"]
    for lever in ("today", "compact", "top_layers", "bf16", "all"):
        figures = out[lever]
        assert figures["samples_per_s"] > 0 and figures["epoch_s"] >= 0 and figures["gflops"] >= 0   # tiny: rounds to 0
        assert figures["computed_tokens_per_s"] >= figures["real_tokens_per_s"]
    assert out["today"]["train_top_layers"] is None and out["top_layers"]["train_top_layers"] == 2
    assert out["top_layers"]["frozen_cache_rows"] > 0 and out["bf16"]["autocast_bf16"] is True
    assert out["compact"]["mean_tokens"] < out["today"]["mean_tokens"]   # the same items in fewer tokens
    assert out["today"]["epoch_speedup_vs_today"] == 1.0
