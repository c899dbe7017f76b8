"""Every command the README prints works as printed.

Each fenced `bash` block of README.md is cut into commands (a trailing backslash continues a
line), and each command must match exactly one check below, or the test fails: a new command
in the README needs a check here. Cheap commands run for real (`ckd-ehr --help`, `prepare` on
the vendored MIMIC-III demo, `study --summarise-only` on a study directory built here, the
token export and both `curl` calls against the HTTP API served in-process). Expensive ones are
parsed: the CLI accepts their arguments and builds their config (the library call it would make
is replaced by one that records its arguments), the files, configs, services and ports they
name exist and agree with the manifests. The pipeline recipe also runs for real up to
`prepare` on the vendored demo (slow: the pipeline starts Ray).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ckd_ehr.config import PipelineConfig, load_config

from helpers.paths import REPO

README = REPO / "README.md"
DEMO3 = "tests/data/mimic3_demo"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def block_commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blanks and comments dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1].strip() + " "
            continue
        current += line.strip()
        if current and not current.startswith("#"):
            commands.append(current)
        current = ""
    if current.strip():
        commands.append(current.strip())
    return commands


def readme_commands() -> list[str]:
    return [c for lang, body in fenced_blocks(README.read_text()) if lang == "bash" for c in block_commands(body)]


def argv_of(command: str) -> list[str]:
    """The words of a command, without a trailing `&` and comments."""
    words = shlex.split(command, comments=True)
    return words[:-1] if words and words[-1] == "&" else words


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    assert option in argv, f"{option} not in {argv}"
    out = list(argv)
    out[out.index(option) + 1] = value
    return out


# --- the checks: (pattern, function(command, request)) ------------------------------------

CHECKS: list[tuple[re.Pattern, object]] = []


def check(pattern: str):
    def register(fn):
        CHECKS.append((re.compile(pattern), fn))
        return fn
    return register


def _record_call(monkeypatch, module: str, name: str) -> dict:
    """Replace ckd_ehr.<module>.<name> (what a CLI handler calls) by a recorder of its arguments."""
    import importlib

    calls: dict = {}

    def fake(*args, **kwargs):
        calls["args"], calls["kwargs"] = args, kwargs
        return {}

    monkeypatch.setattr(importlib.import_module(f"ckd_ehr.{module}"), name, fake)
    return calls


def _cli(argv: list[str]) -> int:
    from ckd_ehr.cli import main

    return main(argv)


@check(r"^make (demo|test|test-fast|lint|docs)$")
def _make(command, request):
    target = command.split()[1]
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    assert target in phony and re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # a dry run: the recipe make would run, without installing or running anything
    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", target], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    expected = {"demo": "ckd-ehr pipeline --config jobs/configs/demo.yaml --set run_dir=runs/demo",
                "test": "pytest -q tests", "test-fast": '-m "not slow and not gpu"', "lint": "ruff check",
                "docs": "mkdocs build --strict"}[target]
    assert expected in out.stdout, out.stdout


@check(r"^source \.venv/bin/activate$")
def _activate(command, request):
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^VENV \?= \.venv$", makefile, re.M) and "-m venv $(VENV)" in makefile


@check(r"^ckd-ehr --help$")
def _help(command, request):
    capsys = request.getfixturevalue("capsys")
    with pytest.raises(SystemExit) as exit_:
        _cli(argv_of(command)[1:])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for sub in ("pipeline", "prepare", "serve", "study"):
        assert sub in out


@check(r"^ckd-ehr prepare .*--mimic-dir tests/data/")
def _prepare_demo(command, request):
    """Real: prepare on the vendored demo, into a temporary run directory."""
    from ckd_ehr import storage
    from ckd_ehr.contracts import RunLayout

    tmp = request.getfixturevalue("tmp_path")
    argv = argv_of(command)
    mimic_dir = argv[argv.index("--mimic-dir") + 1]
    assert (REPO / mimic_dir).is_dir()
    argv = replace_option(replace_option(argv, "--mimic-dir", str(REPO / mimic_dir)), "--run-dir", str(tmp / "run"))
    config = argv[argv.index("--config") + 1]
    argv = replace_option(argv, "--config", str(REPO / config))
    assert _cli(argv[1:]) == 0
    assert storage.parquet_num_rows(RunLayout(str(tmp / "run")).visits) > 0


@check(r"^ckd-ehr pipeline ")
def _pipeline(command, request):
    """Parsed: the CLI builds the config the pipeline would run (a MIMIC source at --mimic-dir)."""
    from ckd_ehr.storage import is_uri

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(REPO)
    argv = argv_of(command)
    assert (REPO / argv[argv.index("--config") + 1]).is_file()
    calls = _record_call(monkeypatch, "pipeline", "run_pipeline")
    assert _cli(argv[1:]) == 0
    cfg = calls["args"][0]
    if "--mimic-dir" in argv:
        assert cfg.data.source == "mimic" and cfg.data.mimic_dir == argv[argv.index("--mimic-dir") + 1]
    if "--run-dir" in argv:
        run_dir = argv[argv.index("--run-dir") + 1]
        assert cfg.run_dir == (run_dir if is_uri(run_dir) else os.path.abspath(run_dir))


@check(r"^kubectl apply -f \S+$")
def _kubectl_apply(command, request):
    path = REPO / command.split()[-1]
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {"ray.io/v1": {"RayCluster", "RayJob", "RayService"}, "v1": {"PersistentVolumeClaim", "ServiceAccount"}}
    assert docs and all(d["kind"] in kinds.get(d["apiVersion"], ()) for d in docs), path


@check(r"^kubectl create configmap \S+ --from-file=\S+$")
def _kubectl_configmap(command, request):
    """The ConfigMap the manifests mount (ckd-ehr-config, key pipeline.yaml), from a shipped config."""
    name, source = argv_of(command)[3], argv_of(command)[4].removeprefix("--from-file=")
    key, path = source.split("=", 1)
    cluster = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    mounted = {v["configMap"]["name"] for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
               if "configMap" in v}
    assert name in mounted and key == "pipeline.yaml" and (REPO / path).exists()
    load_config(PipelineConfig, REPO / path)


@check(r"^kubectl port-forward svc/\S+ \d+:\d+ &$")
def _port_forward(command, request):
    """The service is the RayCluster's head service (KubeRay names it <cluster>-head-svc) and
    the port its dashboard's, the one `ray job submit --address` talks to."""
    service, ports = argv_of(command)[2:4]
    local, remote = ports.split(":")
    cluster = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    assert service == f"svc/{cluster['metadata']['name']}-head-svc"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": int(remote), "name": "dashboard"} in head["ports"]
    assert f"ray job submit --address http://127.0.0.1:{local} " in README.read_text().replace("\\\n", " ")


@check(r"^ray job submit ")
def _ray_job_submit(command, request):
    """Parsed by Ray's own CLI (click, nothing sent); the entrypoint by ckd-ehr's."""
    from ray.scripts.scripts import cli

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(REPO)
    argv = argv_of(command)
    root = cli.make_context("ray", argv[1:])
    job = cli.get_command(root, "job")
    job_ctx = job.make_context("job", argv[2:], parent=root)
    submit = job.get_command(job_ctx, "submit")
    params = submit.make_context("submit", argv[3:], parent=job_ctx).params
    assert params["working_dir"] == "." and (REPO / params["runtime_env"]).is_file()
    entry = list(params["entrypoint"])
    assert entry[:2] == ["python", "jobs/run.py"] and (REPO / entry[1]).is_file()
    assert entry[2] == "pipeline"
    _pipeline(shlex.join(["ckd-ehr", *entry[2:]]), request)


@check(r"^export CKD_EHR_TOKEN=")
def _export_token(command, request):
    from ckd_ehr.config import ServeConfig

    assert ServeConfig().auth_token_env == "CKD_EHR_TOKEN"
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = subprocess.run(["bash", "-c", f'{command}\nprintf %s "$CKD_EHR_TOKEN"'], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and re.fullmatch(r"[0-9a-f]{32}", out.stdout), (out.stdout, out.stderr)


@check(r"^ckd-ehr serve ")
def _serve(command, request):
    """Parsed: the student `make demo` writes, on the address the curl calls use."""
    from ckd_ehr.contracts import RunLayout

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(REPO)
    calls = _record_call(monkeypatch, "serve", "run_serve")
    assert _cli(argv_of(command)[1:]) == 0
    cfg, artifact = calls["args"][0], calls["kwargs"]["artifact"]
    assert artifact is None or Path(artifact).resolve() == REPO / "runs/demo/student/ckd_ehr/artifact"
    assert Path(RunLayout(cfg.run_dir).student_artifact("ckd_ehr")) == REPO / "runs/demo/student/ckd_ehr/artifact"
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.auth_token_env) == ("127.0.0.1", 8000, "CKD_EHR_TOKEN")


@check(r"^(until )?curl .*http://127\.0\.0\.1:8000/")
def _curl(command, request):
    """Real: the command through bash, against the API (ckd_ehr.serve.api) served in-process
    with a bearer token and a stand-in model; a wrong token gets 401."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port, token = request.getfixturevalue("served_api")
    local = command.replace("http://127.0.0.1:8000/", f"http://127.0.0.1:{port}/")

    def run(tok):
        out = subprocess.run(["bash", "-c", local], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CKD_EHR_TOKEN": tok})
        assert out.returncode == 0, out.stderr
        return out.stdout

    if "/v1/predict" in command:
        result = json.loads(run(token))["results"][0]
        assert len(result["probabilities"]) == 25
        assert "wrong bearer token" in run("not-the-token")
    else:
        assert json.loads(run(token))["status"] == "ok"


@check(r"^ckd-ehr study --config \S+$")
def _study(command, request):
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.chdir(REPO)
    argv = argv_of(command)
    assert (REPO / argv[-1]).is_file()
    calls = _record_call(monkeypatch, "study", "study_command")
    assert _cli(argv[1:]) == 0
    assert calls["args"][0].study.seeds and not calls["kwargs"]["summarise_only"]


@check(r"^ckd-ehr study --summarise-only --study-dir \S+$")
def _study_summarise(command, request):
    """Real: the tables rebuilt from a copy of a study directory alone. The directory the README
    names is where the study recipe above writes it."""
    from ckd_ehr.contracts import RunLayout, StudyFiles

    argv = argv_of(command)
    study_cfg = load_config(PipelineConfig, REPO / "jobs/configs/synthetic_study.yaml")
    assert Path(RunLayout(study_cfg.run_dir).study_dir) == REPO / argv[-1]
    root, cfg_file = request.getfixturevalue("two_cohort_study")
    assert _cli(["study", "--config", str(cfg_file), "--summarise-only"]) == 0
    copy = request.getfixturevalue("tmp_path") / "sent_to_you"
    shutil.copytree(root.study_dir, copy)
    for name in ("results.json", "study.md", "forest.png"):
        (copy / name).unlink()
    assert _cli(replace_option(argv, "--study-dir", str(copy))[1:]) == 0
    assert json.loads(Path(StudyFiles(str(copy)).results).read_text())["rows"]


# --- fixtures ----------------------------------------------------------------------------

class _StandInModel:
    """A backend with the API's contract (ckd_ehr.serve.api.Backend): fixed probabilities."""

    def __init__(self):
        from ckd_ehr.config import TextConfig
        from ckd_ehr.phenotypes import phenotype_names
        from ckd_ehr.serve.api import ModelInfo

        self.info = ModelInfo(artifact_id="readme-test", label_names=phenotype_names(), thresholds=[0.5] * 25,
                              text_config=TextConfig())

    async def predict(self, records):
        from ckd_ehr.serve.api import render_and_predict

        return render_and_predict(records, self.info, lambda texts: np.full((len(texts), 25), 0.2))


@pytest.fixture(scope="module")
def served_api():
    """The HTTP API on a free port of 127.0.0.1, with a bearer token; yields (port, token)."""
    import socket

    import uvicorn

    from ckd_ehr.config import ServeConfig
    from ckd_ehr.serve.api import create_app, token_digest

    token = "0123456789abcdef0123456789abcdef"
    app = create_app(_StandInModel(), ServeConfig(), token_sha256=token_digest(token))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port, token
    server.should_exit = True
    thread.join(10)


# --- the tests ---------------------------------------------------------------------------

COMMANDS = readme_commands()


def test_readme_has_commands_and_only_bash_fences():
    blocks = fenced_blocks(README.read_text())
    assert blocks and {lang for lang, _ in blocks} <= {"bash", "text"}, \
        "README code blocks are `bash` (checked here) or `text` (output)"
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:60] for c in COMMANDS])
def test_readme_command_works_as_printed(command, request):
    matches = [fn for pattern, fn in CHECKS if pattern.search(command)]
    assert len(matches) == 1, (f"README command {command!r} matches {len(matches)} checks in tests/test_readme.py: "
                               "every command needs exactly one")
    matches[0](command, request)


def test_readme_report_path_is_where_the_demo_writes_it():
    from ckd_ehr.contracts import RunLayout

    text = README.read_text()
    assert RunLayout("runs/demo").report_html.endswith("runs/demo/report/report.html")
    assert "RUN/report/report.html" in text and "runs/demo" in text


@pytest.mark.slow
def test_pipeline_recipe_runs_to_prepare_on_the_vendored_demo(ray_local, tmp_path):
    """The own-MIMIC recipe for real, as far as prepare, on the MIMIC-III demo (pipeline starts Ray)."""
    from ckd_ehr import storage
    from ckd_ehr.contracts import RunLayout

    [command] = [c for c in COMMANDS if c.startswith("ckd-ehr pipeline ")]
    argv = replace_option(argv_of(command), "--mimic-dir", str(REPO / DEMO3))
    argv = replace_option(argv, "--run-dir", str(tmp_path / "run"))
    argv = replace_option(argv, "--config", str(REPO / argv[argv.index("--config") + 1]))
    assert _cli([*argv[1:], "--to", "prepare"]) == 0
    layout = RunLayout(str(tmp_path / "run"))
    manifest = storage.read_json(layout.manifest)
    assert manifest["stages"]["prepare"]["status"] == "done"
    assert manifest["config"]["data"]["source"] == "mimic"
    assert storage.parquet_num_rows(layout.visits) > 0
