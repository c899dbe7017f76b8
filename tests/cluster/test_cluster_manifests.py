"""Every shipped cluster manifest validates against its schema, strictly.

KubeRay manifests: the CRDs' OpenAPI v3 schemas (cluster/kuberay/crds, copied from
KubeRay). Kubernetes would silently prune unknown fields, so here every object with
declared properties forbids others: a misspelt field fails the test instead of vanishing
on `kubectl apply`. The launcher YAML: the schema that the ray package ships.
"""
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers.crd_schemas import crd_schema, validator

from helpers.paths import REPO


MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def test_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_crd(path):
    assert path.read_text().startswith("# How to run"), f"{path.name}: start with a how-to-run comment"
    doc = yaml.safe_load(path.read_text())
    api_group, version = doc["apiVersion"].split("/")
    assert api_group == "ray.io"
    validator(crd_schema(doc["kind"], version)).validate(doc)


def test_raycluster_autoscales_gpus_from_zero_with_idle_head():
    doc = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def test_rayjob_runs_the_shipped_full_scale_pipeline():
    doc = yaml.safe_load((REPO / "cluster/kuberay/rayjob.yaml").read_text())
    entry = doc["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "jobs/run.py", "pipeline"]
    assert (REPO / entry[1]).exists() and (REPO / entry[entry.index("--config") + 1]).exists()


def test_a_misspelt_field_is_caught():
    doc = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validator(crd_schema("RayCluster")).validate(doc)


def test_launcher_yaml_validates_against_ray_schema():
    import ray

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    for path in sorted((REPO / "cluster" / "launcher").glob("*.yaml")):
        assert path.read_text().startswith("# How to run")
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_dockerfile_matches_pyproject_versions():
    import tomllib

    text = (REPO / "cluster/docker/Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = [d for d in project["dependencies"] if d.startswith("ray[")][0]
    base = [line for line in text.splitlines() if line.startswith("FROM ")][0]
    assert "rayproject/ray:2.60." in base and ">=2.60,<2.61" in ray_pin
    py = base.split("-py")[1][:3]  # e.g. 311
    major, minor = int(py[0]), int(py[1:])
    assert project["requires-python"] == ">=3.10,<3.13"
    assert (3, 10) <= (major, minor) < (3, 13), base
