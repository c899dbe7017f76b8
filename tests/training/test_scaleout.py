"""Scale-out pieces without Ray: strategy `auto`'s memory estimate, the GPU-path config
defaults, padding efficiency of the stages' batching, soft-label GPU actor settings, the
ZeRO-3 partitioned loader (one process) and the standalone GPU benchmark (CPU smoke run;
its CUDA run is marked `gpu`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ckd_ehr.config import SoftLabelsConfig, TeacherConfig, TrainerConfig
from ckd_ehr.training import (ModelSize, batch_tokens, choose_strategy, deepspeed_config, estimate_train_memory,
                              length_grouped_batches, padding_efficiency)

from helpers.paths import REPO
GIB = 2**30
# Qwen2.5-7B (no LM head) + LoRA r16 on q,k,v + head, bf16 weights.
SIZE_7B = ModelSize(total_params=7_080_000_000, trainable_params=10_000_000, param_bytes=2, hidden_size=3584,
                    num_layers=28)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# --- strategy auto ------------------------------------------------------------------------

def test_memory_estimate_picks_ddp_when_the_model_fits_and_zero3_when_not():
    need = estimate_train_memory(SIZE_7B, batch_size=4, seq_len=1024, checkpointing=True)
    # weights alone are 14.2 GB; checkpointed activations of 4 x 1024 tokens add a few GB
    assert 14e9 < need < 20e9
    assert choose_strategy(need, 141 * GIB, 0.8) == "ddp"             # H200
    assert choose_strategy(need, 16 * GIB, 0.8) == "zero3"            # a 16 GB card
    no_ckpt = estimate_train_memory(SIZE_7B, batch_size=4, seq_len=1024, checkpointing=False)
    assert no_ckpt > need + 10e9                                      # 28 layers of activations kept
    # full fine-tuning states (fp32 grad + 2 moments + master) scale with the trainable count
    full = ModelSize(SIZE_7B.total_params, SIZE_7B.total_params, 2, 3584, 28)
    assert estimate_train_memory(full, 1, 16, True) > 16 * SIZE_7B.total_params


def test_teacher_model_size_counts_what_build_teacher_builds(tiny_qwen_dir):
    from ckd_ehr.teacher.model import build_teacher, teacher_model_size

    tc = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, lora={"rank": 4})
    size = teacher_model_size(tc)
    model = build_teacher(tc, seed=0)
    assert size.total_params == sum(p.numel() for p in model.parameters())
    assert size.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (size.param_bytes, size.hidden_size, size.num_layers) == (4, 32, 2)


def test_gpu_path_defaults_and_cpu_defaults():
    cpu = TeacherConfig()
    assert (cpu.strategy, cpu.train_dtype(), cpu.use_gradient_checkpointing()) == ("auto", "float32", False)
    assert cpu.attn_implementation == "sdpa"
    gpu = TeacherConfig(use_gpu=True)
    assert (gpu.train_dtype(), gpu.use_gradient_checkpointing()) == ("bfloat16", True)
    assert TeacherConfig(use_gpu=True, gradient_checkpointing=False).use_gradient_checkpointing() is False
    # auto -> ZeRO-3 keeps the section's other settings; bf16 follows the GPU training dtype
    ds = deepspeed_config(gpu.model_copy(update={"deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}}),
                          world=8, zero_stage=3)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True} and ds["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(TrainerConfig(strategy="deepspeed"), world=2)
    assert deepspeed_config(gpu.model_copy(update={"deepspeed": {"fp16": {"enabled": True}}}), 1).get("bf16") is None


def test_full_configs_use_the_gpu_path():
    from ckd_ehr.config import PipelineConfig, load_config

    for name in ("teacher_qwen7b.yaml", "mimic3_full.yaml", "mimic4_full.yaml"):
        cfg = load_config(PipelineConfig, str(REPO / "jobs" / "configs" / name))
        t = cfg.teacher
        assert t.strategy == "auto" and t.train_dtype() == "bfloat16" and t.use_gradient_checkpointing()
        assert t.attn_implementation == "sdpa", name
    full = load_config(PipelineConfig, str(REPO / "jobs" / "configs" / "mimic3_full.yaml"))
    assert full.soft_labels.use_gpu and full.soft_labels.num_gpus_per_actor == 0.5


# --- padding ------------------------------------------------------------------------------

def test_batch_tokens_and_efficiency():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert batch_tokens({"input_ids": mask, "attention_mask": mask}) == (5, 8)
    assert batch_tokens({"input_ids": mask}) == (0, 0)
    assert padding_efficiency(5, 8) == 0.625 and np.isnan(padding_efficiency(0, 0))


def test_length_grouping_beats_its_random_floor():
    from ckd_ehr.bench.padding import stage_efficiencies
    from ckd_ehr.soft_labels.scoring import sub_batches

    lengths = np.random.default_rng(0).lognormal(5.5, 0.5, size=3000).astype(int) + 20
    eff = stage_efficiencies(lengths, batch_size=8, world=2, block=64)
    assert eff["random"] < 0.8 < 0.95 < eff["length_grouped"] <= 1.0   # the floor can fail the claim
    assert eff["sorted"] >= eff["length_grouped"] and eff["ray_data_blocks"] > eff["random"]
    assert stage_efficiencies(lengths, 1)["random"] == 1.0            # batch 1: trivially no padding
    parts = sub_batches(lengths[:20], 6)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20)) and [len(p) for p in parts] == [6, 6, 6, 2]
    # every rank of the training batches sees the same number of batches
    per_rank = [len(length_grouped_batches(lengths, 8, 0, 0, 2, r)) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]


# --- soft labels on GPUs ------------------------------------------------------------------

def test_soft_label_gpu_actors():
    assert SoftLabelsConfig(num_gpus_per_actor=0.25).use_gpu
    assert SoftLabelsConfig(gpus_per_actor=1).num_gpus_per_actor == 1.0       # the old key still reads
    assert not SoftLabelsConfig().use_gpu
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        SoftLabelsConfig(num_gpus_per_actor=1.5)


# --- ZeRO-3 partitioned loading in one process ---------------------------------------------

@pytest.mark.slow   # a DeepSpeed ZeRO-3 init in a fresh process: 10-90 s on 2 cores
def test_partitioned_loader_matches_from_pretrained(tiny_qwen_dir):
    """One gloo rank: load_backbone under an active HfDeepSpeedConfig (ZeRO-3) takes the
    partitioned path (every parameter a ZeRO-3 parameter) and loads the checkpoint's values."""
    code = f"""
import json, os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
from ckd_ehr.teacher.model import load_backbone
ref = load_backbone({str(tiny_qwen_dir)!r})
keep = HfDeepSpeedConfig({{"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_optimization": {{"stage": 3}}}})
part = load_backbone({str(tiny_qwen_dir)!r})
params = dict(part.named_parameters())
zero = all(hasattr(p, "ds_numel") for p in params.values())
with deepspeed.zero.GatheredParameters(list(params.values())):
    diff = max(float((params[n] - p).abs().max()) for n, p in ref.named_parameters())
print(json.dumps({{"zero": zero, "diff": diff, "n": len(params)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["zero"] and res["n"] > 10
    assert res["diff"] == 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the standalone GPU benchmark ----------------------------------------------------------

def test_gpu_bench_imports_without_ray():
    code = ("import sys, ckd_ehr.bench.deepspeed_gpu as m\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'pyarrow', 'pydantic', 'psutil'))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_flop_counts_of_the_7b_architecture():
    from transformers import AutoModel, Qwen2Config

    from ckd_ehr.bench.deepspeed_gpu import QWEN25_7B, flops_per_token, non_embedding_params, peak_tflops_of

    with torch.device("meta"):
        backbone = AutoModel.from_config(Qwen2Config(**QWEN25_7B))
    n = non_embedding_params(backbone)
    assert 6.4e9 < n < 6.6e9                         # 7.07e9 without LM head minus the 0.545e9 embedding
    assert flops_per_token(n, 28, 3584, 1024, training=True) == 4 * n + 6 * 28 * 3584 * 1024
    assert flops_per_token(n, 28, 3584, 1024, training=False) == 2 * n + 2 * 28 * 3584 * 1024
    assert peak_tflops_of("NVIDIA H200") == 989.4 and peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_of("Some GPU") is None


@pytest.mark.slow
def test_gpu_bench_cpu_smoke_run(tmp_path):
    """The standalone script end to end on CPU with a tiny model: sweep, scoring, ZeRO-3."""
    out_file = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "ckd_ehr.bench.deepspeed_gpu", "--device", "cpu", "--arch", "tiny", "--steps", "1",
           "--seq-len", "32", "--train-batch-sizes", "1,2", "--score-batch-sizes", "2", "--out", str(out_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out_file.read_text())
    assert res["ray_imported"] is False
    assert len(res["train"]["sweep"]) == 4 and 0 < res["train"]["best"]["mfu"]
    assert res["score"]["best"]["logits_finite"] and res["score"]["best"]["mfu"] > 0
    assert res["zero3"]["result"]["tokens_per_s"] > 0


@pytest.mark.gpu
def test_gpu_bench_cuda_path(tmp_path):
    """On a CUDA machine: the same script on the GPU (bf16, SDPA, NCCL), tiny model."""
    cmd = [sys.executable, "-m", "ckd_ehr.bench.deepspeed_gpu", "--device", "cuda", "--arch", "tiny", "--steps", "2",
           "--seq-len", "128", "--train-batch-sizes", "2", "--score-batch-sizes", "4", "--out", str(tmp_path / "g.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["dtype"] == "bfloat16" and res["ray_imported"] is False
    assert res["train"]["best"]["peak_gpu_mem_gib"] > 0 and res["zero3"]["result"]["tokens_per_s"] > 0
