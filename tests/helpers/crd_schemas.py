"""KubeRay CRD schemas for the manifest tests, made strict.

Kubernetes silently prunes unknown fields: here every object with declared properties
forbids others, so a misspelt field fails a test instead of vanishing on `kubectl apply`.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[2] / "cluster" / "kuberay" / "crds"
KIND_TO_CRD = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
               "RayService": "ray.io_rayservices.yaml"}


def strict(schema):
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                    and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str = "v1"):
    # The CRDs are large (pod templates): parse each once, with libyaml where available.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / KIND_TO_CRD[kind]).read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind}: no version {version}")


def validator(schema):
    # Draft 7 without re-checking the 1 MB schema against the meta-schema on every call.
    return jsonschema.Draft7Validator(schema)
