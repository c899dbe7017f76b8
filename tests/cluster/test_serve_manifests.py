"""Deployment files of the served student: the RayService manifest against KubeRay's CRD
schema (strict: unknown fields fail instead of being pruned), and both Serve configs
against Ray Serve's own schema, pointing at a builder that exists."""
from __future__ import annotations

import copy
import importlib

import jsonschema
import pytest
import yaml
from helpers.crd_schemas import crd_schema, validator

from helpers.paths import REPO
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = REPO / "cluster" / "serve" / "serve_config.yaml"


@pytest.fixture(scope="module")
def rayservice():
    return yaml.safe_load(RAYSERVICE.read_text())


def test_rayservice_validates_against_the_crd(rayservice):
    assert RAYSERVICE.read_text().startswith("# How to run")
    assert rayservice["kind"] == "RayService"
    group, version = rayservice["apiVersion"].split("/")
    assert group == "ray.io"
    validator(crd_schema("RayService", version)).validate(rayservice)
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        validator(crd_schema("RayService", version)).validate(bad)


def _check_serve_config(doc: dict) -> dict:
    from ray.serve.schema import ServeDeploySchema

    from ckd_ehr.config import ServeConfig

    ServeDeploySchema.model_validate(doc)  # Ray Serve's own schema for `serve deploy`
    [app] = doc["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    [dep] = app["deployments"]
    assert dep["name"] == "StudentDeployment"
    assert dep["max_ongoing_requests"] >= ServeConfig().max_batch_size  # else batches never fill
    assert dep["autoscaling_config"]["min_replicas"] <= dep["autoscaling_config"]["max_replicas"]
    # scale out before the replica's admission limit (serve.pending_requests) sheds
    assert dep["autoscaling_config"]["target_ongoing_requests"] < ServeConfig().pending_requests
    assert dep["backpressure_config"]["retry_after_s"] >= 1  # a shed client is told when to retry
    return app


def test_rayservice_serve_config(rayservice):
    app = _check_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert "://" in app["args"]["artifact"]  # read from object storage on a cluster
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    env = {e["name"]: e for g in workers for c in g["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert "secretKeyRef" in env["CKD_EHR_TOKEN"]["valueFrom"]  # the token comes from a Secret
    assert rayservice["spec"]["serveService"]["spec"]["type"] == "ClusterIP"
    assert all("nvidia.com/gpu" not in str(g) for g in workers)


def test_local_serve_config_binds_loopback_and_builds():
    doc = yaml.safe_load(SERVE_CONFIG.read_text())
    assert SERVE_CONFIG.read_text().startswith("# How to run")
    assert doc["http_options"]["host"] == "127.0.0.1"
    app = _check_serve_config(doc)
    from ray.serve.deployment import Application

    from ckd_ehr.serve.app import app_builder

    built = app_builder(app["args"])  # binds the deployment; loads nothing until deployed
    assert isinstance(built, Application)
