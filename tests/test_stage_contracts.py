"""Stages see only the config they declare, and --resume reruns exactly what a change touches.

- Every leaf field of the config schema (about 230) is changed to another valid value and the
  resume planner's dry run (ckd_ehr.pipeline.plan_resume) must plan exactly the stages that
  declare the field (its section, or the field itself) and the stages downstream of them (that
  read a planned stage's output). Fields that cannot change alone get the paired change in
  PAIRED; none is skipped.
- A stage's config view (ckd_ehr.stages.stage_config) raises on an undeclared section or field,
  naming it and the stage; a stage that touches a file it does not declare (input, output or
  cache) fails naming it; the tiny pipeline (tests/helpers/tiny_run.py) runs every stage through both.
- Three fields go end to end: changed after a whole run, `pipeline --resume` reruns exactly
  the planned stages.
"""
import typing
from types import UnionType

import pytest
from pydantic import BaseModel, ValidationError

from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import RunLayout
from ckd_ehr.pipeline import plan_resume, stage_hash
from ckd_ehr.stages import ALWAYS_READABLE, STAGES, UndeclaredSectionError, stage, stage_config

# field -> the other fields it must change with (the validators tie them), as {path: value}
PAIRED = {
    "run_dir": None,   # another run directory is another run: nothing there to resume
    "split.train": {"split.train": 0.75, "split.test": 0.15},   # the fractions sum to 1
    "split.val": {"split.val": 0.15, "split.test": 0.15},
    "split.test": {"split.test": 0.15, "split.train": 0.75},
    "data.source": {"data.source": "mimic", "data.mimic_dir": "/tmp/mimic"},
    "data.synth.acute_persistence": {"data.synth.acute_persistence": 0.8, "data.synth.chronic_persistence": 0.99},
    "teacher.head": {"teacher.head": "generative", "teacher.best_metric": "val_loss"},
    "student.distill.label_attention": {"student.distill.label_attention": 0.1, "teacher.pooling": "label_attention"},
    "student.variants": {"student.variants": ["hard_plain", "ckd_ehr"], "student.probe_only_variants": []},
    "student.probe_only_variants": {"student.probe_only_variants": ["hard_plain"], "student.head_init": "probe"},
    "serve.max_ongoing_requests": {"serve.max_ongoing_requests": 32},
    "serve.max_pending_requests": {"serve.max_pending_requests": 12},
    "study.first_seed_rows": {"study.first_seed_rows": ["distill_plain"]},
}
"""Fields that cannot change alone (or whose other valid values the generic candidates miss),
with the change that makes a valid config: {path: value} including the field itself; `None`: a
field no resume can follow (said why in its comment)."""


def _leaves(model: BaseModel, prefix: str = ""):
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value, field.annotation


def _set(data: dict, path: str, value) -> dict:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return data


def _candidates(value, annotation) -> list:
    args = typing.get_args(annotation)
    literals = [a for a in (args if typing.get_origin(annotation) in (typing.Union, UnionType) else (annotation,))
                if typing.get_origin(a) is typing.Literal]
    out = [x for lit in literals for x in typing.get_args(lit)]
    if bool in args:
        out += [True, False]
    if isinstance(value, bool):
        out.append(not value)
    elif isinstance(value, int):
        out += [value + 1, value - 1, value * 2, 1, 2]
    elif isinstance(value, float):
        out += [value * 2, value / 2, value + 0.1, min(0.99, value + 0.01), 0.5]
    elif isinstance(value, str):
        out += [value + "_other", "/tmp/other"]
    elif isinstance(value, list):
        out += [value[:-1], value[1:], [], value + value[:1], [1], [0, 1], ["hard_names"]]
    elif isinstance(value, dict):
        out += [{**value, "other": 1}, {}, {"zero_optimization": {"stage": 3}}, {"admittime": "%d/%m/%Y %H:%M"}]
    elif value is None:
        out += [2, 0.5, True, "/tmp/other", 1, "val_macro_f1", 0.1, 64]
    return [c for c in out if c != value]


def _changed(base: PipelineConfig, path: str, value, annotation) -> PipelineConfig | None:
    dumped = base.model_dump(mode="json")
    pairs = PAIRED.get(path) or {}
    for candidate in [pairs[path]] if path in pairs else _candidates(value, annotation):
        data = _set(base.model_dump(mode="json"), path, candidate)
        for other, v in pairs.items():
            _set(data, other, v)
        try:
            cfg = PipelineConfig.model_validate(data)
        except (ValidationError, ValueError, TypeError):
            continue
        if cfg.model_dump(mode="json") != dumped:
            return cfg
    return None


def _differing(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Leaf paths whose values differ: the field changed, its pair, and what validators derive
    from them (e.g. the soft labels' unit targets follow the student's distillation terms)."""
    out = []
    for k in a:
        if isinstance(a[k], dict) and isinstance(b[k], dict) and k not in ("deepspeed", "date_formats"):
            out += _differing(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b[k]:
            out.append(f"{prefix}{k}")
    return out


def _declares(s, path: str) -> bool:
    return any(path == entry or path.startswith(entry + ".") for entry in s.sections)


def _expected(cfg: PipelineConfig, paths: list[str]) -> set[str]:
    """Stages declaring any of `paths`, then those reading an output of a stage already in."""
    layout = RunLayout(cfg.run_dir)
    out: set[str] = set()
    written: set[str] = set()
    for s in STAGES:
        if any(_declares(s, p) for p in paths) or written & {*s.inputs(cfg, layout), *s.optional_inputs(cfg, layout),
                                                             *s.caches(cfg, layout)}:
            out.add(s.name)
            written |= {*s.outputs(cfg, layout), *s.caches(cfg, layout)}
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> PipelineConfig:
    return PipelineConfig(run_dir=str(tmp_path_factory.mktemp("run")))


def test_every_config_field_reruns_exactly_its_stages_and_downstream(base):
    done = {"stages": {s.name: {"status": "done", "config_hash": stage_hash(s, base)} for s in STAGES}}
    assert plan_resume(base, done) == {}
    leaves = list(_leaves(base))
    assert len(leaves) > 200
    walked, unchangeable = 0, []
    for path, value, annotation in leaves:
        if path in PAIRED and PAIRED[path] is None:
            continue
        cfg = _changed(base, path, value, annotation)
        if cfg is None:
            unchangeable.append(path)
            continue
        paths = _differing(base.model_dump(mode="json"), cfg.model_dump(mode="json"))
        assert path in paths or any(path.startswith(p + ".") for p in paths), (path, paths)
        planned = set(plan_resume(cfg, done))
        assert planned == _expected(cfg, paths), (path, sorted(planned))
        walked += 1
    assert not unchangeable, f"no valid other value found for {unchangeable}: add them to PAIRED"
    assert walked == len(leaves) - sum(v is None for v in PAIRED.values())


def test_a_stage_sees_only_what_it_declares(base):
    view = stage_config(base, stage("soft_labels"))
    assert view.soft_labels.batch_size == base.soft_labels.batch_size
    assert view.student.seed == base.student.seed and view.run_dir == base.run_dir
    with pytest.raises(UndeclaredSectionError, match="stage soft_labels read student.lr"):
        _ = view.student.lr
    with pytest.raises(UndeclaredSectionError, match="stage soft_labels read config section 'serve'"):
        _ = view.serve.precision
    evaluate = stage_config(base, stage("evaluate"))
    assert evaluate.serve.precision == base.serve.precision   # declared: a precision change reruns it
    with pytest.raises(UndeclaredSectionError, match="'tune'"):
        _ = evaluate.tune.metric
    assert set(ALWAYS_READABLE) == {"run_dir", "ray"}


def test_a_stage_touching_a_file_it_does_not_declare_fails(tmp_path, monkeypatch):
    """Stage.run records every path the stage resolves through ckd_ehr.storage (reads, writes,
    listings; a look for an absent optional file is not a read) and fails naming any that is
    neither an input, an output nor a cache of the stage, or under one of them."""
    from ckd_ehr import storage
    from ckd_ehr.stages import Stage, UndeclaredFileError

    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    layout = RunLayout(cfg.run_dir)
    storage.write_json(layout.metrics, {"models": {}})
    stray = str(tmp_path / "run" / "soft_labels" / "stray.json")
    storage.write_json(stray, {})
    report = stage("report")

    def reads(*paths):
        def run(view):
            for p in paths:
                storage.read_json(p)
            storage.exists(str(tmp_path / "run" / "absent.json"))   # an optional file not there: no read
            storage.write_text(layout.report_md, "# report")
            return {}
        return run

    monkeypatch.setattr(Stage, "function_ref", lambda self: reads(layout.metrics))
    assert report.run(cfg) == {}
    monkeypatch.setattr(Stage, "function_ref", lambda self: reads(layout.metrics, stray))
    with pytest.raises(UndeclaredFileError, match="stage report touched 1 path.*stray.json"):
        report.run(cfg)
    with storage.recording() as outer:   # recordings nest: the stage's does not hide the file from an outer one
        with pytest.raises(UndeclaredFileError):
            report.run(cfg)
    assert storage.canonical(stray) in outer and storage.canonical(str(tmp_path / "run" / "absent.json")) not in outer


@pytest.mark.parametrize("field, value, reruns", [
    ("evaluate.bootstrap", 10, {"evaluate", "report"}),
    ("serve.precision", "int8", {"evaluate", "report"}),
    ("student.lr", 2e-3, {"student", "evaluate", "report"}),
])
def test_a_changed_field_reruns_its_stages_end_to_end(tiny_run_copy, ray_local, field, value, reruns):
    """Three fields through the tiny pipeline (student on, resumed): after one whole run, the
    field changed and `pipeline --resume` reruns exactly what the dry run planned, and that is
    the stages declaring the field and those downstream; the others are skipped."""
    from ckd_ehr import storage
    from ckd_ehr.pipeline import read_manifest, run_pipeline

    base_dict = {**tiny_run_copy, "student": {**tiny_run_copy["student"], "variants": ["ckd_ehr"]}}
    cfg = PipelineConfig(**base_dict)
    run_pipeline(cfg, resume=True, from_stage="student")
    section, name = field.split(".")
    changed = PipelineConfig(**{**base_dict, section: {**base_dict.get(section, {}), name: value}})
    layout = RunLayout(cfg.run_dir)
    planned = set(plan_resume(changed, read_manifest(layout), [s for s in STAGES if s.name in
                                                                 ("student", "evaluate", "report")]))
    assert planned == reruns == _expected(changed, [field]) & {"student", "evaluate", "report"}
    manifest = run_pipeline(changed, resume=True, from_stage="student")
    ran = {s for s in ("student", "evaluate", "report") if not manifest["stages"][s].get("skipped")}
    assert ran == reruns, (field, ran)
    if field == "serve.precision":   # the row the change asked for is there
        assert "ckd_ehr_int8" in storage.read_json(layout.metrics)["models"]
