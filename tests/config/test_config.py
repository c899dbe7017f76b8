"""Config classes: every shipped YAML validates; bad keys, types and values name themselves."""

import pytest
import yaml

from ckd_ehr.config import ConfigError, PipelineConfig, build, load_config

from helpers.paths import REPO
SHIPPED = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_says_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "ckd-ehr" in first + path.read_text().splitlines()[1], \
        f"{path.name} must start with a comment saying how to run it"
    cfg = load_config(PipelineConfig, path)
    assert isinstance(cfg, PipelineConfig)


@pytest.mark.parametrize("name, own", [
    # a study trains every row: no probe-only variants (the demo's plain-text students keep their probe)
    ("synthetic_study.yaml", {"eadf": {"control_texts"}, "student": {"probe_only_variants"}}),
    # the two teacher studies keep the teacher recipe they were measured with (docs/results.md)
    ("multigranularity_study.yaml", {"teacher": {"pooling", "query_lr", "keep_checkpoint", "early_stopping_patience",
                                                 "eval_every_steps"}, "evaluate": {"baseline"},
                                     "student": {"max_steps", "keep_checkpoint", "query_lr", "train_top_layers",
                                                 "probe_only_variants"}}),
    # full depth for both heads, and fewer rows: what a generative teacher costs on 2 cores
    ("teacher_heads_study.yaml", {"teacher": {"num_layers", "max_steps", "max_train_samples", "train_top_layers",
                                              "batch_size", "pooling", "query_lr", "early_stopping_patience",
                                              "eval_every_steps"},
                                  "student": {"max_train_samples", "probe_only_variants"}}),
])
def test_studies_train_the_demo_recipe(name, own):
    """A study answers its question for the recipe the demo ships: the same cohort, split, texts
    and models. Only the run directory, the variants (the study's rows) and what the study's
    extra rows need (`own`) may differ."""
    demo = load_config(PipelineConfig, REPO / "jobs" / "configs" / "demo.yaml").model_dump()
    study = load_config(PipelineConfig, REPO / "jobs" / "configs" / name).model_dump()
    own = {**own, "student": {"variants", *own.get("student", set())}}
    for section in ("data", "split", "text", "eadf", "teacher", "soft_labels", "student", "evaluate"):
        def keep(d, section=section):
            return {k: v for k, v in d[section].items() if k not in own.get(section, set())}
        assert keep(study) == keep(demo), f"{name}'s {section} drifted from demo.yaml"


def test_every_field_has_a_docstring():
    from pydantic import BaseModel

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, f in cls.model_fields.items():
            assert f.description, f"{cls.__name__}.{name} has no docstring"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann)

    walk(PipelineConfig)


def test_override_sets_nested_value():
    cfg = load_config(PipelineConfig, None, ["split.seed=7", "teacher.lora.rank=16", "run_dir=/tmp/x"])
    assert cfg.split.seed == 7 and cfg.teacher.lora.rank == 16 and cfg.run_dir == "/tmp/x"


def test_autocast_on_and_off_read_as_written():
    # YAML reads a bare on/off as a boolean; the field takes them as the words they are
    cfg = load_config(PipelineConfig, None, ["teacher.autocast=on", "student.autocast=off"])
    assert (cfg.teacher.autocast, cfg.student.autocast) == ("on", "off")


@pytest.mark.parametrize("override, fragment", [
    (["split.bogus=1"], "unknown key 'split.bogus'"),
    (["split.train=0.9"], "sum to 1"),
    (["teacher.batch_size=-2"], "teacher.batch_size"),
    (["teacher.epochs=many"], "'teacher.epochs' = \"many\""),
    (["data.source=mimic"], "mimic_dir"),
    (["nonsense"], "key.path=value"),
])
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(PipelineConfig, None, override)
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"eadf": {"top_kk": 5}}))
    with pytest.raises(ConfigError) as err:
        load_config(PipelineConfig, p)
    assert "bad.yaml" in str(err.value) and "eadf.top_kk" in str(err.value)


def test_student_variants_come_from_one_table():
    """contracts.STUDENT_VARIANT_TABLE is the one definition: config, data and evaluation derive theirs."""
    from ckd_ehr.contracts import PRIMARY_VARIANTS, STUDENT_VARIANT_TABLE, student_variant
    from ckd_ehr.evaluation.evaluate import ROLES
    from ckd_ehr.student.data import variant_spec

    assert PipelineConfig().student.variants == list(PRIMARY_VARIANTS) == [
        "hard_plain", "hard_eadf", "distill_plain", "ckd_ehr"]   # the paper's four arms by default
    for v in STUDENT_VARIANT_TABLE:
        assert variant_spec(v.name) == (v.text_column, v.distills)
        assert ROLES[v.name] == v.role
        build(PipelineConfig, {"evaluate": {"baseline": v.name}}, source="t")
    assert [v.distills for v in STUDENT_VARIANT_TABLE if v.primary] == [False, False, True, True]
    with pytest.raises(ValueError, match="unknown student variant 'bogus'"):
        student_variant("bogus")
    with pytest.raises(ConfigError, match="student.variants"):
        build(PipelineConfig, {"student": {"variants": ["hard_plain", "bogus"]}}, source="t")


def test_probe_only_variants_must_be_trained_variants():
    """A probe-only variant the run does not train is a typo, not a silent no-op (the demo once
    named the study's distill_plain_ablation for the paper's distill_plain)."""
    with pytest.raises(ConfigError, match="probe_only_variants names distill_plain_ablation, not among"):
        build(PipelineConfig, {"student": {"head_init": "probe", "probe_only_variants": ["distill_plain_ablation"]}})
    with pytest.raises(ConfigError, match="head_init: probe"):
        build(PipelineConfig, {"student": {"probe_only_variants": ["hard_plain"]}})
    assert build(PipelineConfig, {"student": {"head_init": "probe", "probe_only_variants": ["hard_plain"]}})
