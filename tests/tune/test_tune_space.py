"""Search spaces: every shipped space loads; bad entries name their key."""

import pytest
import yaml

from ckd_ehr.config import ConfigError, PipelineConfig, build
from ckd_ehr.tune.space import apply_trial, load_space, to_tune, trial_overrides

from helpers.paths import REPO
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def test_both_spaces_are_shipped():
    assert {p.name for p in SPACES} >= {"teacher_lora.yaml", "student_distill.yaml"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_loads_and_converts(path):
    assert path.read_text().startswith("# How to run")
    space = load_space(path)
    tune_space = to_tune(space)
    assert set(tune_space) == set(space.params)
    # A sampled point becomes a valid pipeline config.
    point = {k: (v.sample() if hasattr(v, "sample") else v["grid_search"][0]) for k, v in tune_space.items()}
    # the label-attention term needs a teacher that pools by label attention (its config's)
    base = {"teacher": {"pooling": "label_attention"}} if "student.distill.label_attention" in space.params else {}
    cfg = apply_trial(base, point)
    assert isinstance(cfg, PipelineConfig)


def test_every_sampler_kind_converts(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"target": "student", "params": {
        "student.distill.alpha": {"uniform": [0.1, 0.9]},
        "student.lr": {"loguniform": [1e-5, 1e-3]},
        "student.batch_size": {"randint": [4, 16]},
        "student.distill.temperature": {"quniform": [1.0, 4.0, 0.5]},
        "student.distill.schedule": {"choice": ["constant", "linear"]},
        "student.epochs": {"grid_search": [1, 2]},
    }}))
    ts = to_tune(load_space(p))
    assert isinstance(ts["student.distill.alpha"], Float)
    assert isinstance(ts["student.batch_size"], Integer)
    assert isinstance(ts["student.distill.schedule"], Categorical)
    assert ts["student.epochs"] == {"grid_search": [1, 2]}
    assert ts["student.distill.temperature"].sample() % 0.5 == 0


@pytest.mark.parametrize("params, fragment", [
    ({"student.distill.alpha": {"uniform": [0.9, 0.1]}}, "params.student.distill.alpha"),
    ({"student.distill.alpha": {"normal": [0, 1]}}, "unknown sampler 'normal'"),
    ({"student.distill.nope": {"choice": [1]}}, "student.distill.nope"),
    ({"student.distill.schedule": {"choice": ["constant", "zigzag"]}}, "zigzag"),
    ({"teacher.lora.rank": {"choice": [4]}}, "only set student.*"),
    ({"student.lr": {"loguniform": [0, 1]}}, "low > 0"),
])
def test_bad_entries_name_the_key(tmp_path, params, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"target": "student", "params": params}))
    with pytest.raises(ConfigError) as err:
        load_space(p)
    assert fragment in str(err.value) and "bad.yaml" in str(err.value)


def test_alpha_over_rank_is_translated():
    over = trial_overrides({"teacher.lora.rank": 16, "teacher.lora.alpha_over_rank": 2})
    cfg = apply_trial({}, {"teacher.lora.rank": 16, "teacher.lora.alpha_over_rank": 2})
    assert "teacher.lora.alpha=32.0" in over and cfg.teacher.lora.alpha == 32.0


def test_trial_config_fits_the_trial_resources_and_reports_per_epoch():
    """A trial is one Train worker that, with the trial process's token CPU, fits exactly in
    tune.cpus_per_trial (else two 1-CPU trials do not fit on 2 CPUs); it reports once per
    epoch and keeps the checkpoint best on the searched metric."""
    from ckd_ehr.tune.run import TRIAL_PROCESS_CPU, _trial_config

    base = build(PipelineConfig, {"student": {"num_workers": 4, "checkpoint_every_steps": 5},
                                  "tune": {"cpus_per_trial": 1.0, "gpus_per_trial": 0.5}}).model_dump(mode="json")
    cfg = _trial_config(base, {"student.distill.alpha": 0.7}, "student", "val_macro_auroc")
    s = cfg.student
    assert s.num_workers == 1 and s.distill.alpha == 0.7
    assert s.cpus_per_worker + TRIAL_PROCESS_CPU == 1.0
    assert s.use_gpu and s.gpus_per_worker == 0.5
    assert s.checkpoint_every_steps is None and s.best_metric == "val_macro_auroc"
