"""A study's cohorts: the config's own and one per further generator seed, each with its root
and training seeds."""
from __future__ import annotations

from dataclasses import dataclass

from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import RunLayout


class StudyError(RuntimeError):
    """A study that cannot be summarised as asked (e.g. seeds trained at different code)."""


def with_sections(cfg: PipelineConfig, run_dir: str, **sections) -> PipelineConfig:
    """`cfg` with another run directory and `sections` merged into its sections."""
    data = cfg.model_dump(mode="json")
    data["run_dir"] = run_dir
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return build(PipelineConfig, data, source="study")


# cohorts ------------------------------------------------------------------------------------

@dataclass
class StudyCohort:
    """One cohort of a study: its name, its study root (base/ and seed_k/ under it), its
    training seeds and the config its runs start from (the study's, with this cohort's data)."""

    name: str
    root: RunLayout
    seeds: list[int]
    cfg: PipelineConfig
    first: bool

    def first_seed(self, seed: int) -> bool:
        """Whether `seed` is the study's first run (the first cohort's first seed)."""
        return self.first and seed == self.seeds[0]


def _cohort_name(cfg: PipelineConfig) -> str:
    return f"synth_{cfg.data.synth.seed}" if cfg.data.source == "synthetic" else cfg.data.source


def study_cohorts(cfg: PipelineConfig) -> list[StudyCohort]:
    """The config's own cohort, then one per generator seed of study.more_cohorts."""
    st, root = cfg.study, RunLayout(cfg.run_dir)
    out = [StudyCohort(_cohort_name(cfg), root, list(st.seeds), cfg, True)]
    if st.more_cohorts and cfg.data.source != "synthetic":
        raise StudyError(f"study.more_cohorts {st.more_cohorts} needs data.source: synthetic (each is a generator "
                         f"seed), not {cfg.data.source!r}")
    for g in st.more_cohorts:
        cohort_root = root.study_cohort(g)
        data = cfg.model_dump(mode="json")["data"]
        c = with_sections(cfg, cohort_root, data={"synth": {**data["synth"], "seed": g}})
        if _cohort_name(c) == out[0].name:
            raise StudyError(f"study.more_cohorts repeats the config's own generator seed {g}")
        out.append(StudyCohort(_cohort_name(c), RunLayout(cohort_root), list(st.more_cohort_seeds), c, False))
    return out
