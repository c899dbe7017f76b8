"""Search spaces kept in YAML (tune_spaces/*.yaml) and their conversion to Ray Tune samplers.

A space file:

    target: student            # or teacher
    metric: val_macro_f1       # optional; else tune.metric from the config
    params:
      student.distill.alpha: {uniform: [0.5, 1.0]}
      student.distill.schedule: {choice: [constant, linear, cosine, curriculum]}

Keys are config paths, as in `--set`. Derived keys (not config fields) are translated per
trial by `trial_overrides`: `teacher.lora.alpha_over_rank` sets `teacher.lora.alpha`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
import json
import copy

from ckd_ehr.config import ConfigError, PipelineConfig, apply_overrides, build, load_yaml
from ckd_ehr.contracts import STUDENT_VARIANTS

SAMPLERS = ("choice", "uniform", "loguniform", "randint", "quniform", "grid_search")
DERIVED = {"teacher.lora.alpha_over_rank"}


@dataclass(frozen=True)
class Space:
    target: str
    metric: str | None
    params: dict[str, dict[str, Any]]
    source: str
    variant: str = "ckd_ehr"
    """The student variant a student search trains (ckd_ehr: distilled, needs the run's soft
    labels; hard_eadf: hard labels on EADF text, needs only the EADF stage)."""


def _check_entry(key: str, entry: Any, source: str) -> tuple[str, Any]:
    where = f"{source}: params.{key}"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{where}: expected one sampler like {{choice: [...]}}, got {entry!r}")
    kind, args = next(iter(entry.items()))
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler '{kind}' (one of {', '.join(SAMPLERS)})")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: '{kind}' needs a non-empty list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"{where}: '{kind}' needs [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: 'loguniform' needs low > 0, got {args!r}")
    if kind == "quniform" and (len(args) != 3 or not args[0] < args[1] or args[2] <= 0):
        raise ConfigError(f"{where}: 'quniform' needs [low, high, q] with low < high and q > 0, got {args!r}")
    return kind, args


def load_space(path: str | Path) -> Space:
    """Read and validate a space file; every key must be a config path (or a derived key)."""
    data = load_yaml(path)
    source = str(path)
    unknown = set(data) - {"target", "metric", "params", "variant"}
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    target = data.get("target")
    if target not in ("teacher", "student"):
        raise ConfigError(f"{source}: key 'target' = {target!r}: must be 'teacher' or 'student'")
    params = data.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{source}: key 'params' must be a non-empty mapping")
    for key, entry in params.items():
        kind, args = _check_entry(key, entry, source)
        if not key.startswith(f"{target}."):
            raise ConfigError(f"{source}: params.{key}: a {target} search may only set {target}.* keys")
        if key in DERIVED:
            continue
        # Every sampled value must be valid for the config field: try each listed value
        # (choice/grid) or both ends of a range on a default config.
        probe = args if kind in ("choice", "grid_search") else args[:2]
        for value in probe:
            try:
                build(PipelineConfig, apply_overrides(dict(PROBE_CONTEXT.get(key, {})), [f"{key}={_yaml(value)}"]),
                      source=f"{source}: params")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
    variant = data.get("variant", "ckd_ehr")

    if target != "student" and "variant" in data or variant not in STUDENT_VARIANTS:
        raise ConfigError(f"{source}: key 'variant' = {variant!r}: a student search's variant, one of "
                          f"{', '.join(STUDENT_VARIANTS)}")
    return Space(target=target, metric=data.get("metric"), params=params, source=source, variant=variant)


PROBE_CONTEXT = {"student.distill.label_attention": {"teacher": {"pooling": "label_attention"}}}
"""What a key's values are checked against besides the defaults: the label-attention term is
only valid with a teacher that pools by label attention (the run's config says so, not the space)."""


def _yaml(value: Any) -> str:
    return "null" if value is None else json.dumps(value)


def to_tune(space: Space) -> dict[str, Any]:
    """The param_space for ray.tune.Tuner (flat dotted keys)."""
    # not at module level: ray, loaded only when this runs
    from ray import tune

    out = {}
    for key, entry in space.params.items():
        kind, args = next(iter(entry.items()))
        if kind == "choice":
            out[key] = tune.choice(args)
        elif kind == "grid_search":
            out[key] = tune.grid_search(args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(int(args[0]), int(args[1]))
        elif kind == "quniform":
            out[key] = tune.quniform(*args)
    return out


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """`key=value` overrides of one trial's sampled params, derived keys translated."""
    params = dict(params)
    ratio = params.pop("teacher.lora.alpha_over_rank", None)
    if ratio is not None:
        rank = params.get("teacher.lora.rank", PipelineConfig().teacher.lora.rank)
        params["teacher.lora.alpha"] = float(rank) * float(ratio)
    return [f"{k}={_yaml(v)}" for k, v in params.items()]


def apply_trial(base: dict[str, Any], params: dict[str, Any]) -> PipelineConfig:

    return build(PipelineConfig, apply_overrides(copy.deepcopy(base), trial_overrides(params)), source="trial")
