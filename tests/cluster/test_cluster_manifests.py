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
STALE_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
"""Fields the shipped CRDs still accept but current KubeRay ignores: the schema cannot catch them."""
CORE_KINDS = {"PersistentVolumeClaim": {"spec"}, "ServiceAccount": {"metadata"}}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _load(name: str) -> list[dict]:
    return _docs(REPO / "cluster" / "kuberay" / name)


def _cluster_specs() -> dict[str, dict]:
    """Every RayCluster spec shipped: the RayCluster's, the RayJob's and the RayService's."""
    [rc], [job], [svc] = _load("raycluster.yaml"), _load("rayjob.yaml"), _load("rayservice.yaml")
    return {"raycluster": rc["spec"], "rayjob": job["spec"]["rayClusterSpec"], "rayservice": svc["spec"]["rayClusterConfig"]}


def _pod_specs(spec: dict) -> dict[str, dict]:
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    out.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return out


def _keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_expected_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "storage.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_crd(path):
    assert path.read_text().startswith("# How to run"), f"{path.name}: start with a how-to-run comment"
    for doc in _docs(path):
        api_group, _, version = doc["apiVersion"].rpartition("/")
        if api_group == "ray.io":
            validator(crd_schema(doc["kind"], version)).validate(doc)
            stale = _keys(doc) & STALE_FIELDS
            assert not stale, f"{path.name}: {sorted(stale)} do nothing in current KubeRay"
        else:   # core objects: no CRD to validate against; the fields the pods rely on
            assert doc["apiVersion"] == "v1" and doc["kind"] in CORE_KINDS, (path.name, doc["kind"])
            assert CORE_KINDS[doc["kind"]] <= set(doc) and doc["metadata"]["name"]


def test_stale_fields_are_caught():
    [svc] = _load("rayservice.yaml")
    svc["spec"]["serviceUnhealthySecondThreshold"] = 900
    validator(crd_schema("RayService")).validate(svc)   # the CRD still accepts it ...
    assert _keys(svc) & STALE_FIELDS                     # ... so the deny-list has to


def test_every_cluster_has_token_auth_and_the_service_account():
    for name, spec in _cluster_specs().items():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: no token auth on the dashboard/job API"
        for group, pod in _pod_specs(spec).items():
            assert pod.get("serviceAccountName") == "ckd-ehr", f"{name}/{group}: no service account for s3://"
    [sa] = [d for d in _load("storage.yaml") if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["name"] == "ckd-ehr" and sa["metadata"]["annotations"]


def test_every_volume_is_defined_mounted_and_spills_to_its_own_disk():
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _load("storage.yaml")
              if d["kind"] == "PersistentVolumeClaim"}
    for name, spec in _cluster_specs().items():
        for group, pod in _pod_specs(spec).items():
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
                assert set(mounts) == set(volumes), f"{name}/{group}: mounts {sorted(mounts)}, volumes {sorted(volumes)}"
                assert any(m["mountPath"] == "/tmp/ray" for m in mounts.values()), f"{name}/{group}: /tmp/ray"
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    assert claim in claims, f"{name}/{group}: claim {claim} is not defined in storage.yaml"
                    # pods on several nodes mount each claim: a single-node access mode would not bind
                    assert set(claims[claim]) & {"ReadWriteMany", "ReadOnlyMany"}, (claim, claims[claim])


def test_the_training_cluster_mounts_mimic_read_only_and_the_config_from_a_configmap():
    mimic_dir = yaml.safe_load((REPO / "jobs/configs/mimic3_full.yaml").read_text())["data"]["mimic_dir"]
    for name in ("raycluster", "rayjob"):
        for group, pod in _pod_specs(_cluster_specs()[name]).items():
            mounts = {m["mountPath"]: m for c in pod["containers"] for m in c["volumeMounts"]}
            assert mounts[mimic_dir].get("readOnly") is True, f"{name}/{group}: MIMIC at {mimic_dir}, read-only"
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/etc/ckd-ehr"]["name"]]["configMap"]["name"] == "ckd-ehr-config"
    # the ConfigMap is made from a shipped config, as the how-to says
    how_to = (REPO / "cluster/kuberay/storage.yaml").read_text()
    made_from = how_to.split("--from-file=pipeline.yaml=")[1].split()[0]
    assert (REPO / made_from).exists()


def test_the_rayjob_retries_with_resume_on_the_shipped_cluster():
    [job] = _load("rayjob.yaml")
    [rc] = _load("raycluster.yaml")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "jobs/run.py", "pipeline"] and (REPO / entry[1]).exists()
    assert "--resume" in entry and entry[entry.index("--config") + 1].startswith("/etc/ckd-ehr/")
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


def test_raycluster_autoscales_gpus_from_zero_with_idle_head():
    [doc] = _load("raycluster.yaml")
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    # Ray Data's EADF tasks and other CPU work get CPU pods, not idle GPUs
    cpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "cpu"][0]
    assert cpu["minReplicas"] == 0 and "nvidia.com/gpu" not in str(cpu)


def test_a_misspelt_field_is_caught():
    doc = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validator(crd_schema("RayCluster")).validate(doc)


def test_launcher_yaml_validates_against_ray_schema():
    import ray

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    models = {yaml.safe_load((REPO / "jobs/configs" / f).read_text())[section]["model"]
              for f in ("mimic3_full.yaml", "mimic4_full.yaml") for section in ("teacher", "student")}
    for path in sorted((REPO / "cluster" / "launcher").glob("*.yaml")):
        assert path.read_text().startswith("# How to run")
        doc = yaml.safe_load(path.read_text())
        jsonschema.validate(doc, schema)
        # every node it starts gets the weights (the image runs offline) and the configs
        setup = " ".join(doc["setup_commands"])
        assert all(m in setup for m in models), f"{path.name}: setup_commands must fetch {sorted(models)}"
        assert any("jobs/configs" in src for src in doc["file_mounts"].values())


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
