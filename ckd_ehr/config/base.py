"""Config base class, YAML loading and `--set key.path=value` overrides.

Every config class in this package derives from `Section`: unknown keys are rejected
(`extra="forbid"`), field docstrings become the field descriptions (one source for CLI
help, YAML and docs), and validation lives in the class.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ckd_ehr.storage import is_uri

T = TypeVar("T", bound=BaseModel)

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a submitted job's entrypoint (a JobConfig whose metadata holds
the submission id): how a process knows it runs under `ray job submit`."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the value."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        protected_namespaces=(),
    )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            lines.append(f"{source}: key '{key}' = {shown}: {e['msg']}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (so 7 is an int, [1,2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def build(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from an optional YAML file plus `key.path=value` overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path else "config"
    run_dir = data.get("run_dir", cls.model_fields["run_dir"].default if "run_dir" in cls.model_fields else None)
    if isinstance(run_dir, str) and not is_uri(run_dir) and not os.path.isabs(run_dir) \
            and os.environ.get(JOB_CONFIG_ENV):
        # validation makes run_dir absolute against the working directory, which under `ray job
        # submit` is the job's own temporary copy, on one node: refused while it is still as written
        raise ConfigError(f"{source}: key 'run_dir' = {json.dumps(run_dir)}: relative under `ray job submit`, it "
                          "would land in the job's temporary working directory on one node: use an absolute "
                          "path on storage every node shares, or s3://... (--run-dir or --set run_dir=...)")
    return build(cls, data, source=source)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(cfg: BaseModel | dict) -> str:
    # not at module level: `ckd-ehr --help` imports this module, and it stays light
    import hashlib

    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
