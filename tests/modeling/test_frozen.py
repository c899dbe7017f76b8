"""Training only the top layers on cached frozen-layer states (ckd_ehr.modeling.frozen): the
cached model is the uncached one (logits and gradients), the cache round-trips and is shared,
the training loop trains only the top and the checkpoint loads back; the autocast choice is
measured and stated."""
import numpy as np
import pytest
import torch

from ckd_ehr.config import PipelineConfig
from ckd_ehr.modeling.frozen import LayerCache, compute_bottom, pad_cached

from helpers.student_run import build_run_dir


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (4, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:], mask[2, 33:], mask[3, 5:] = 0, 0, 0
    return ids * mask, mask


@pytest.mark.parametrize("top", [1, 2, 3])
def test_cached_training_gives_the_uncached_logits_and_gradients(windowed_bert, top):
    from ckd_ehr.student.model import build_student

    cached_model, plain = build_student(windowed_bert), build_student(windowed_bert)
    plain.head.load_state_dict(cached_model.head.state_dict())
    cached_model.freeze_below(top)
    cached_model.eval()
    plain.eval()   # the frozen part runs without dropout, as it does when cached
    ids, mask = _batch()
    states = compute_bottom(cached_model, [i[m.bool()].tolist() for i, m in zip(ids, mask)], 2, torch.float32,
                            torch.device("cpu"))
    got = cached_model(attention_mask=mask, cached=pad_cached(states, ids.shape[1]))
    want = plain(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    (got * torch.arange(25)).sum().backward()
    (want * torch.arange(25)).sum().backward()
    frozen = trained = 0
    for (name, p), (_, q) in zip(cached_model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
            trained += 1
        else:
            assert p.grad is None and ("embeddings" in name or int(name.split(".")[3]) < 3 - top), name
            frozen += 1
    assert trained > 2 and frozen > 0


def test_layer_cache_round_trips_and_is_keyed(tmp_path):
    rows = [[1, 2, 3], [4, 5], [9], [4, 5]]
    states = [torch.randn(len(r), 8) for r in rows[:3]]
    for dtype in (torch.float32, torch.bfloat16):
        cache = LayerCache(str(tmp_path / "c"), f"model|top2|{dtype}", dtype)
        assert cache.lookup(rows) == [None] * 4
        cache.add(rows[:2], states[:2])
        got = cache.lookup(rows)
        assert got[2] is None and got[0].dtype == dtype and torch.equal(got[3], got[1])   # a repeated row too
        torch.testing.assert_close(got[1].float(), states[1].to(dtype).float(), rtol=0, atol=0)
    assert LayerCache(str(tmp_path / "c"), "another model", torch.float32).lookup(rows) == [None] * 4


@pytest.mark.slow
@pytest.mark.parametrize("token_bag", [False, True])
def test_loop_trains_only_the_top_layers_and_the_checkpoint_loads_back(tmp_path, tiny_bert_dir, token_bag):
    """In-process TrainLoop with train_top_layers 1 on a 2-layer BERT: the embeddings and layer 0
    never move, the top layer and head do (and the bag head, with student.token_bag); the
    validation the loop reports is the checkpoint's (loaded with student_from_checkpoint); a
    second run reads every row from the frozen cache."""
    from ckd_ehr.student.model import predict_ids
    from ckd_ehr.student.train import build_student_task
    from ckd_ehr.student.train import student_from_checkpoint
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext

    build_run_dir(tmp_path)
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path), "student": {
        "model": str(tiny_bert_dir), "variants": ["hard_eadf", "ckd_ehr"], "num_workers": 1, "batch_size": 4,
        "max_length": 128, "cpus_per_worker": 1, "epochs": 2, "lr": 1e-2, "train_top_layers": 1,
        "autocast": "auto", "token_bag": token_bag}})
    built = build_student_task(cfg, "hard_eadf")
    loop = TrainLoop(cfg.student, built.task, WorkerContext(), LocalReporter(str(tmp_path / "train")))
    before = {n: p.detach().clone() for n, p in loop.engine.module.named_parameters()} if hasattr(
        loop.engine, "module") else None
    metrics = loop.run()
    model = loop.engine.module
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(n.startswith(("encoder.encoder.layer.1.", "head.", "bag_head.")) for n in moved), moved
    assert ("bag_head.weight" in moved) == token_bag
    assert metrics["frozen_rows_computed"] == len(loop.train) + len(loop.val) and metrics["frozen_cache_s"] >= 0
    assert isinstance(metrics["autocast_bf16"], bool) and metrics["autocast_step_s_fp32"] > 0

    last = loop.reporter.checkpoints[-1][0]
    loaded = student_from_checkpoint(last, built.model_path, "mean", token_bag=built.token_bag)
    val = built.prep.splits["val"]
    logits = np.load(f"{last}/val_logits.npy")
    probs = predict_ids(loaded, val.input_ids, built.pad_id)
    # the loop validated on cached states under the chosen autocast; the artifact runs fp32
    tol = 2e-2 if metrics["autocast_bf16"] else 1e-5
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), rtol=0, atol=tol)

    again = TrainLoop(cfg.student, build_student_task(cfg, "ckd_ehr").task, WorkerContext(),
                      LocalReporter(str(tmp_path / "train2")))
    assert again.setup_metrics["frozen_rows_computed"] == 0   # the sibling variant reads the same texts' states


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_cached_teacher_gives_the_uncached_logits_and_gradients(tmp_path, family):
    """The teacher's decoder run over a slice of its layers (the bottom once, cached; the top every
    step) is the whole decoder: causal mask, rotary positions and right padding included; the
    frozen part's LoRA and embeddings get no gradient."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.teacher.model import build_teacher

    torch.manual_seed(0)
    kw = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    (Qwen2Model(Qwen2Config(**kw)) if family == "qwen2" else LlamaModel(LlamaConfig(**kw))).save_pretrained(tmp_path / "d")
    tc = TeacherConfig(model=str(tmp_path / "d"), gguf_file=None, pooling="mean", lora={"dropout": 0.0})
    cached_model, plain = build_teacher(tc, seed=1), build_teacher(tc, seed=1)
    with torch.no_grad():   # LoRA B starts at 0: move it, so the adapters matter in the comparison
        for (n, p), (_, q) in zip(cached_model.named_parameters(), plain.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    cached_model.freeze_below(1)
    cached_model.eval()
    plain.eval()
    ids, mask = _batch()
    states = compute_bottom(cached_model, [i[m.bool()].tolist() for i, m in zip(ids, mask)], 2, torch.float32,
                            torch.device("cpu"))
    got = cached_model(attention_mask=mask, cached=pad_cached(states, ids.shape[1]))
    want = plain(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    for (name, p), (_, q) in zip(cached_model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
        elif q.requires_grad:   # frozen by freeze_below: LoRA of layers 0-1
            assert p.grad is None and ("layers.0." in name or "layers.1." in name), name


@pytest.mark.slow
def test_test_rows_go_through_the_top_layers_on_cached_states(tmp_path, tiny_bert_dir):
    """After training on its top layer, the student stage predicts the test rows through the
    bottom once (added to the frozen cache) and the top: the same probabilities as the whole
    checkpoint (1e-5, no autocast); a second pass finds every test row in the cache. Evaluate's
    probe row then reads val and test from it, and agrees with the uncached frozen encoder."""
    import shutil

    from ckd_ehr import storage
    from ckd_ehr.contracts import RunLayout
    from ckd_ehr.evaluation.probe_rows import student_probe_row
    from ckd_ehr.stages import stage, undeclared_files
    from ckd_ehr.modeling.frozen import CACHE_DTYPES, LayerCache, layer_cache_key
    from ckd_ehr.student.model import predict_ids
    from ckd_ehr.student.run import _predict_remote
    from ckd_ehr.student.train import build_student_task
    from ckd_ehr.student.train import student_from_checkpoint
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext

    build_run_dir(tmp_path)
    cfg = PipelineConfig.model_validate({"run_dir": str(tmp_path), "student": {
        "model": str(tiny_bert_dir), "variants": ["ckd_ehr"], "num_workers": 1, "batch_size": 4, "max_length": 128,
        "cpus_per_worker": 1, "epochs": 1, "lr": 1e-2, "train_top_layers": 1, "autocast": "off",
        "token_bag": True, "head_init": "probe"}})
    built = build_student_task(cfg, "ckd_ehr")
    reporter = LocalReporter(str(tmp_path / "train"))
    TrainLoop(cfg.student, built.task, WorkerContext(), reporter).run()
    last = reporter.checkpoints[-1][0]
    s = cfg.student
    cache = LayerCache(built.task.frozen_cache, layer_cache_key(s.model, 1, s.frozen_cache_dtype),
                       CACHE_DTYPES[s.frozen_cache_dtype])
    test = built.prep.splits["test"]

    class Checkpoint:   # what Ray Train's Checkpoint offers the stage
        @staticmethod
        def as_directory():
            import contextlib

            return contextlib.nullcontext(last)

    got = _predict_remote(Checkpoint, built.model_path, "mean", built.pad_id, {"test": test}, 8, False,
                          built.token_bag, cache)["test"]
    whole = predict_ids(student_from_checkpoint(last, built.model_path, "mean", token_bag=built.token_bag),
                        test.input_ids, built.pad_id)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)
    assert sum(st is not None for st in cache.lookup(test.input_ids)) == len(test.input_ids)

    # evaluate's probe row: the artifact's probe over cached val + test states = over the frozen encoder
    layout = RunLayout(str(tmp_path))
    art = layout.student_artifact("ckd_ehr")
    shutil.copytree(last, art)   # a stand-in artifact: the probe head is all the probe row reads
    with storage.recording() as touched:
        (frame, _, details), _ = student_probe_row(cfg, layout, "ckd_ehr")
    assert details["rows_from_frozen_cache"] > len(test.input_ids)
    assert not undeclared_files(stage("evaluate"), cfg, touched)   # evaluate declares what its probe row reads
    shutil.rmtree(built.task.frozen_cache)
    (plain, _, details), _ = student_probe_row(cfg, layout, "ckd_ehr")
    assert details["rows_from_frozen_cache"] == 0
    np.testing.assert_allclose(np.stack(frame["probs"]), np.stack(plain["probs"]), rtol=0, atol=1e-5)
