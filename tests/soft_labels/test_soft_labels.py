"""Soft labels: Ray Data batch inference equals in-process prediction, and it is complete.

The teacher artifact is written by the teacher package itself (`build_teacher` on the tiny
random Qwen, LoRA B randomised so merging matters, `write_weights` + `write_artifact`):
untrained, but real weights, a real tokenizer and chat template, loaded via from_pretrained.
The instruction alone is about 210 tokens, so max_length 320 keeps the sample text in every
prompt (identical prompts would give identical logits and hide a row mix-up) and still
truncates the longest ones.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from ckd_ehr import storage
from ckd_ehr.contracts import SOFT_LABELS, SPLITS, ContractError, RunLayout
from ckd_ehr.phenotypes import NUM_PHENOTYPES

SIZES = {"train": 7, "val": 3, "test": 5}


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["hypertension", "sepsis", "heparin", "insulin", "furosemide", "pneumonia", "acute", "renal"]
    # Lengths vary a lot so that length sorting and padding matter; some exceed max_length.
    return [f"The patient-acquired disease is {', '.join(rng.choice(words, size=int(rng.integers(1, 60))))}."
            for _ in range(n)]


@pytest.fixture(scope="module")
def run_with_teacher(tmp_path_factory, tiny_qwen_dir):
    """A run directory with eadf/samples/{split}.parquet and teacher/artifact/."""
    import torch
    from transformers import AutoTokenizer

    from ckd_ehr.config import TeacherConfig
    from ckd_ehr.teacher import build_teacher, write_artifact
    from ckd_ehr.teacher.artifact import write_weights
    from ckd_ehr.teacher.model import trainable_parameters

    root = tmp_path_factory.mktemp("soft_run")
    layout = RunLayout(str(root))
    rng = np.random.default_rng(0)
    for i, split in enumerate(SPLITS):
        n = SIZES[split]
        labels = rng.integers(0, 2, size=(n, NUM_PHENOTYPES)).astype(np.int8)
        labels[0] = 1 - labels[1]  # every phenotype has both classes in every split (AUROC defined)
        texts = _texts(n, seed=i)
        table = pa.table({
            "sample_id": [f"{split}-{j:03d}" for j in range(n)],
            "text_plain": texts,
            "text_eadf": [t + " The medications that maybe have therapeutic effect on Sepsis are heparin;" for t in texts],
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.ravel(), pa.int8()), NUM_PHENOTYPES),
        })
        storage.write_parquet(table, layout.augmented(split))

    cfg = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, max_length=320, pooling="last")
    model = build_teacher(cfg, seed=0)
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state = {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k or k.startswith("head.")}
    weights = root / "weights"
    write_weights(model, state, weights)
    write_artifact(weights, AutoTokenizer.from_pretrained(tiny_qwen_dir), cfg, {}, layout.teacher_artifact)
    return layout


def _soft_table(ids, probs):
    from ckd_ehr.soft_labels.scoring import soft_label_table

    t = soft_label_table(ids, np.zeros((len(ids), NUM_PHENOTYPES), np.float32), "t")
    return t.set_column(2, "probs", pa.FixedSizeListArray.from_arrays(
        pa.array(np.asarray(probs, np.float32).ravel()), NUM_PHENOTYPES))


def test_check_complete_catches_dropped_duplicated_and_bad_probs():
    from ckd_ehr.soft_labels.scoring import check_complete

    ids = [f"s{i}" for i in range(10)]
    ok = _soft_table(ids, np.full((10, NUM_PHENOTYPES), 0.5))
    check_complete(ids, ok, "ok")

    dropped = ok.slice(0, 9)  # s9 lost
    with pytest.raises(ContractError, match=r"1 of 10 sample_id\(s\) missing \(e\.g\. s9\)"):
        check_complete(ids, dropped, "x.parquet")

    duplicated = pa.concat_tables([ok, ok.slice(3, 1)])
    with pytest.raises(ContractError, match=r"duplicated in the output \(e\.g\. s3\)"):
        check_complete(ids, duplicated, "x.parquet")

    # a dropped row hidden by a duplicate: the row count is right, the ids are not
    swapped = pa.concat_tables([ok.slice(0, 9), ok.slice(0, 1)])
    with pytest.raises(ContractError, match=r"duplicated in the output \(e\.g\. s0\).*missing \(e\.g\. s9\)"):
        check_complete(ids, swapped, "x.parquet")

    probs = np.full((10, NUM_PHENOTYPES), 0.5)
    probs[4, 7] = np.nan
    probs[6, 0] = 1.5
    with pytest.raises(ContractError, match=r"2 row\(s\) with probabilities not finite or outside \[0, 1\] \(e\.g\. s4, s6\)"):
        check_complete(ids, _soft_table(ids, probs), "x.parquet")


def test_quality_measures_on_known_values():
    from ckd_ehr.soft_labels.quality import binary_entropy_bits, expected_calibration_error, teacher_metrics

    assert binary_entropy_bits(np.array([0.5, 0.0, 1.0])) == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    # Calibrated: in the 0.25 bin a quarter are positive, in the 0.75 bin three quarters.
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(p, y) == pytest.approx(0.0)
    # Over-confident: p = 0.95 but only half are positive -> ECE 0.45.
    assert expected_calibration_error(np.full(4, 0.95), np.array([1, 0, 1, 0])) == pytest.approx(0.45)
    yy = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    m = teacher_metrics(np.where(yy == 1, 0.9, 0.1), yy)
    assert m["macro_f1"] == pytest.approx(1.0) and m["macro_auroc"] == pytest.approx(1.0)
    m = teacher_metrics(np.where(yy == 1, 0.1, 0.9), yy)
    assert m["macro_f1"] == pytest.approx(0.0) and m["macro_auroc"] == pytest.approx(0.0)


def test_ray_data_soft_labels_equal_in_process_prediction(ray_local, run_with_teacher):
    from ckd_ehr.config import PipelineConfig
    from ckd_ehr.soft_labels.run import run_soft_labels
    from ckd_ehr.teacher import load_teacher, predict_logits

    layout = run_with_teacher
    # Small Ray batches and sub-batches: rows of one split spread over several batches.
    cfg = PipelineConfig(run_dir=layout.root, soft_labels={"batch_size": 4, "sub_batch_size": 3,
                                                           "cpus_per_actor": 0.5, "num_actors": 1})
    summary = run_soft_labels(cfg)

    model, tok, meta = load_teacher(layout.teacher_artifact)
    for split in SPLITS:
        inp = storage.read_parquet(layout.augmented(split))
        out = storage.read_parquet(layout.soft_labels(split))
        assert out.schema.equals(SOFT_LABELS)
        assert out.column("sample_id").to_pylist() == inp.column("sample_id").to_pylist()
        assert set(out.column("teacher_id").to_pylist()) == {meta["artifact_id"]}
        ref = predict_logits(model, tok, inp.column("text_eadf").to_pylist(), batch_size=16, max_length=320)
        logits = np.asarray(out.column("logits").to_pylist(), np.float32)
        probs = np.asarray(out.column("probs").to_pylist(), np.float32)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-ref)), rtol=1e-4, atol=1e-5)
        assert summary["splits"][split]["rows"] == SIZES[split]
    # The teacher tells samples apart (so a row mix-up could not pass unnoticed).
    assert np.std(logits, axis=0).max() > 1e-2

    q = storage.read_json(storage.join(layout.soft_label_quality, "quality.json"))
    assert q["teacher_id"] == meta["artifact_id"]
    assert {s: q["splits"][s]["n"] for s in SPLITS} == SIZES
    assert q["overall"]["n"] == sum(SIZES.values())
    assert 0 <= q["overall"]["ece"] <= 1 and len(q["overall"]["entropy_bits"]) == NUM_PHENOTYPES
    assert q["splits"]["train"]["auroc_phenotypes"] == NUM_PHENOTYPES
    assert storage.read_bytes(storage.join(layout.soft_label_quality, "reliability.png"))[:4] == b"\x89PNG"

    # A rerun on a smaller input replaces the file, never appends.
    small = storage.read_parquet(layout.augmented("val")).slice(0, 2)
    storage.write_parquet(small, layout.augmented("val"))
    run_soft_labels(cfg)
    assert storage.read_parquet(layout.soft_labels("val")).column("sample_id").to_pylist() == ["val-000", "val-001"]


@pytest.mark.parametrize("kept_step", [0, 1])
def test_a_teacher_that_kept_its_probe_scores_its_probe_rows_from_their_features(ray_local, run_with_teacher,
                                                                                 tiny_qwen_dir, tmp_path, kept_step):
    """A teacher whose checkpoint selection kept step 0 IS its frozen backbone plus the probe:
    the rows whose features the probe cached (its training and validation rows, tokenised by
    the training path) get their soft labels from those features, the rest (test) from Ray
    Data, and every row equals the loaded teacher's own forward pass. Null control: the same
    weights reported as a later step reuse nothing."""
    import shutil

    from transformers import AutoTokenizer

    from ckd_ehr.config import PipelineConfig, TeacherConfig
    from ckd_ehr.soft_labels.run import run_soft_labels
    from ckd_ehr.teacher import load_teacher, predict_logits, write_artifact
    from ckd_ehr.teacher.train import teacher_task
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext

    layout = RunLayout(str(tmp_path / "run"))
    for split in SPLITS:
        os.makedirs(os.path.dirname(layout.augmented(split)), exist_ok=True)
        shutil.copy(run_with_teacher.augmented(split), layout.augmented(split))
    tc = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, max_length=320, pooling="mean", head_init="probe",
                       epochs=1, max_steps=1, batch_size=2, num_workers=1, strategy="ddp", cpus_per_worker=1)
    task = teacher_task(tc, layout.augmented("train"), layout.augmented("val"),
                        feature_cache=layout.teacher_probe_features)
    reporter = LocalReporter(str(tmp_path / "train"))
    loop = TrainLoop(tc, task, WorkerContext(), reporter)   # fits the probe, caching its rows' features
    loop.save_and_report({"step": 0}, None)   # the step-0 checkpoint: backbone, LoRA at init, the probe as head
    step0 = reporter.checkpoints[0][0]
    write_artifact(step0, AutoTokenizer.from_pretrained(tiny_qwen_dir), tc, {"step": kept_step},
                   layout.teacher_artifact)

    cfg = PipelineConfig(run_dir=layout.root, soft_labels={"batch_size": 4, "sub_batch_size": 3,
                                                           "cpus_per_actor": 0.5, "num_actors": 1})
    summary = run_soft_labels(cfg)
    reused = {split: summary["splits"][split]["rows_from_probe_features"] for split in SPLITS}
    rows = {split: storage.parquet_num_rows(layout.augmented(split)) for split in SPLITS}   # (an earlier test cuts val)
    assert reused == ({"train": rows["train"], "val": rows["val"], "test": 0} if kept_step == 0 else
                      {"train": 0, "val": 0, "test": 0})
    model, tok, _ = load_teacher(layout.teacher_artifact)
    for split in SPLITS:
        inp = storage.read_parquet(layout.augmented(split))
        out = storage.read_parquet(layout.soft_labels(split))
        assert out.column("sample_id").to_pylist() == inp.column("sample_id").to_pylist()
        ref = predict_logits(model, tok, inp.column("text_eadf").to_pylist(), batch_size=16, max_length=320)
        np.testing.assert_allclose(np.asarray(out.column("logits").to_pylist(), np.float32), ref, rtol=0, atol=2e-5)
        # rows differ by far more than the tolerance: a row mix-up could not pass
        assert np.std(ref, axis=0).max() > 1e-3


def test_scoring_input_comes_in_small_blocks(ray_local, tmp_path):
    """Ray Data's default block size read three files as ONE block: one actor scored every row
    and no progress showed until the end. The soft-label Dataset reads in blocks of a few rows,
    so a pool's actors share the rows and scored batches stream back."""
    from ckd_ehr.soft_labels.ray_scoring import read_scoring_input

    paths = {}
    for split, n in (("train", 40), ("val", 10), ("test", 30)):
        paths[split] = str(tmp_path / f"{split}.parquet")
        storage.write_parquet(pa.table({"sample_id": [f"{split}-{i}" for i in range(n)],
                                        "text_eadf": ["a visit with sepsis and heparin " * 40] * n}), paths[split])
    ds, by_path = read_scoring_input(paths, "text_eadf")
    blocks = ds.materialize()
    assert sorted(by_path.values()) == sorted(paths)
    assert blocks.count() == 80 and blocks.num_blocks() >= 20, blocks.num_blocks()


def test_a_teacher_trained_on_its_top_layers_scores_its_cached_rows_through_them(ray_local, run_with_teacher,
                                                                                tiny_qwen_dir, tmp_path):
    """teacher.train_top_layers: the frozen layers' states the training cached for its training
    and validation rows give those rows' soft labels through the top layers only; test rows go
    through the bottom (added to the cache) and the top; every row equals the loaded (merged)
    teacher's own forward pass. Evaluate's probe row then reads val and test from the cache.
    Null control: without the cache directory nothing is read from it, and the numbers agree."""
    import shutil

    from transformers import AutoTokenizer

    from ckd_ehr.config import PipelineConfig, TeacherConfig
    from ckd_ehr.evaluation.probe_rows import teacher_probe_row
    from ckd_ehr.soft_labels.run import run_soft_labels
    from ckd_ehr.stages import stage, undeclared_files
    from ckd_ehr.teacher import load_teacher, predict_logits, write_artifact
    from ckd_ehr.teacher.train import teacher_feature_key, teacher_task
    from ckd_ehr.training import LocalReporter, TrainLoop, WorkerContext

    layout = RunLayout(str(tmp_path / "run"))
    for split in SPLITS:   # with the patients' ids, which evaluate's probe row reads
        table = storage.read_parquet(run_with_teacher.augmented(split))
        storage.write_parquet(table.append_column("subject_id", pa.array(range(table.num_rows), pa.int64())),
                              layout.augmented(split))
    tc = TeacherConfig(model=str(tiny_qwen_dir), gguf_file=None, max_length=320, pooling="mean", epochs=1,
                       max_steps=3, batch_size=2, num_workers=1, strategy="ddp", cpus_per_worker=1, lr=5e-2,
                       head_lr=5e-2, warmup_ratio=0.0, train_top_layers=1, keep_checkpoint="last", autocast="off",
                       head_init="probe")
    task = teacher_task(tc, layout.augmented("train"), layout.augmented("val"))
    task.frozen_cache = layout.teacher_frozen_cache
    task.frozen_key = teacher_feature_key({**tc.model_dump(mode="json"), "pooling": "any"}, tc.train_dtype())
    reporter = LocalReporter(str(tmp_path / "train"))
    last = TrainLoop(tc, task, WorkerContext(), reporter).run()
    assert last["step"] == 3 and last["frozen_rows_computed"] > 0
    write_artifact(reporter.checkpoints[-1][0], AutoTokenizer.from_pretrained(tiny_qwen_dir), tc, {"step": 3},
                   layout.teacher_artifact)

    cfg = PipelineConfig(run_dir=layout.root, soft_labels={"batch_size": 4, "sub_batch_size": 3,
                                                           "cpus_per_actor": 0.5, "num_actors": 1})
    model, tok, _ = load_teacher(layout.teacher_artifact)
    rows = {split: storage.parquet_num_rows(layout.augmented(split)) for split in SPLITS}
    probe_rows = []
    for with_cache in (True, False):
        if not with_cache:
            shutil.rmtree(layout.teacher_frozen_cache)
        summary = run_soft_labels(cfg)
        with storage.recording() as touched:
            (frame, _, details), _ = teacher_probe_row(cfg, layout)
        assert not undeclared_files(stage("evaluate"), cfg, touched)   # evaluate declares what its probe row reads
        assert details["rows_from_frozen_cache"] == (rows["val"] + rows["test"] if with_cache else 0)
        probe_rows.append(np.stack(frame["probs"]))
        from_cache = {split: summary["splits"][split]["rows_from_frozen_cache"] for split in SPLITS}
        assert from_cache == ({"train": rows["train"], "val": rows["val"], "test": 0} if with_cache else
                              {"train": 0, "val": 0, "test": 0})
        for split in SPLITS:
            inp = storage.read_parquet(layout.augmented(split))
            out = storage.read_parquet(layout.soft_labels(split))
            assert out.column("sample_id").to_pylist() == inp.column("sample_id").to_pylist()
            ref = predict_logits(model, tok, inp.column("text_eadf").to_pylist(), batch_size=16, max_length=320)
            np.testing.assert_allclose(np.asarray(out.column("logits").to_pylist(), np.float32), ref, atol=1e-4)
            assert np.std(ref, axis=0).max() > 1e-3
    np.testing.assert_allclose(probe_rows[0], probe_rows[1], atol=1e-5)
    assert np.std(probe_rows[0], axis=0).max() > 1e-4
