"""Config of `ckd-ehr study`: seeds, the rows trained per seed, and the contrasts stated before the run."""
from __future__ import annotations

from pydantic import Field, model_validator

from ckd_ehr.config.base import Section
from ckd_ehr.contracts import REFERENCE_ROWS, SIDE_TEACHERS, STUDENT_VARIANTS, TEACHER_ROWS, student_variant


class StudyConfig(Section):
    seeds: list[int] = [0, 1, 2]
    """Training seeds of the first cohort (the config's data): each seed trains its own
    teacher(s) and students (teacher.seed and student.seed, which also draws the capped training
    subset); within a cohort the split and the EADF table are fixed, so its test split is the same
    for every seed."""
    more_cohorts: list[int] = []
    """Generator seeds (data.synth.seed) of further synthetic cohorts: each is its own cohort,
    patient split and EADF table (RUN/cohort_{g}/), trained at `more_cohort_seeds`. Rows and
    contrasts are reported per cohort and pooled over cohorts (fixed effect: one true value
    assumed; two cohorts cannot estimate the variance between cohorts)."""
    more_cohort_seeds: list[int] = [0]
    """Training seeds of each further cohort."""
    first_seed_rows: list[str] = []
    """Rows trained only at the first cohort's first seed (controls whose one run is enough to
    read; their contrasts carry test patients only and say so)."""
    allow_mixed_commits: bool = False
    """Summarise seeds that trained at different code (ckd_ehr's content hash differs between
    their stages); the summary then names every code state. Off: such a study refuses."""
    rows: list[str] = ["hard_plain", "hard_eadf", "hard_names", "hard_random", "distill_plain_ablation",
                       "ckd_ehr", "oracle_distill"]
    """Student variants trained per seed (the teacher is always a row): (a), (b), (b-names),
    (b-random), (c) from a plain-text teacher, (d) CKD-EHR, (d-oracle). A row distilled from a
    generative teacher (ckd_ehr_generative) brings that teacher in as a row too (teacher_rows)."""
    contrasts: list[tuple[str, str]] = [
        ("hard_eadf", "hard_names"), ("ckd_ehr", "distill_plain_ablation"), ("distill_plain_ablation", "hard_plain"),
        ("ckd_ehr", "hard_plain"), ("oracle_distill", "hard_plain")]
    """The primary contrasts (new, base) on test macro AUROC, stated before the run: does the
    drug content of the clauses help beyond naming the phenotypes, does EADF help a distilled
    student, does distillation help, CKD-EHR against the paper's baseline, and distillation
    from the best possible teacher."""
    bootstrap: int = Field(1000, ge=10)
    """Patient-bootstrap draws for the contrasts (each draw scores every row and seed)."""
    level: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence level of the simultaneous (max-T) intervals."""
    alpha: float = Field(0.05, gt=0.0, lt=0.5)
    """Family-wise error rate of the Holm-adjusted tests and of the detectable-effect figure."""

    def side_teachers(self, first: bool = True) -> list[str]:
        """The second teachers (contracts.SIDE_TEACHERS) a row of a seed's run distils from,
        trained in that seed (`first`: the study's first run, which also has first_seed_rows)."""
        sources = {student_variant(r).soft_labels for r in self.rows_at(first) if student_variant(r).distills}
        return [t for t in SIDE_TEACHERS if t in sources]

    def rows_at(self, first: bool) -> list[str]:
        """The student rows of one seed's run: `rows`, and `first_seed_rows` at the first seed."""
        return [*self.rows, *(self.first_seed_rows if first else [])]

    def teacher_rows(self, first: bool = True) -> list[str]:
        """The teachers scored as rows of a seed's run: always `teacher`, and each side teacher
        with a row of its own (TEACHER_ROWS)."""
        return ["teacher", *[t for t in self.side_teachers(first) if t in TEACHER_ROWS]]

    @model_validator(mode="after")
    def _known_rows(self):
        unknown = [r for r in [*self.rows, *self.first_seed_rows] if r not in STUDENT_VARIANTS]
        if unknown:
            raise ValueError(f"study.rows: unknown variant(s) {', '.join(unknown)} (one of {', '.join(STUDENT_VARIANTS)})")
        if "ckd_ehr" not in self.rows:
            raise ValueError("study.rows must include ckd_ehr")
        teachers = self.teacher_rows()
        for new, base in self.contrasts:
            for r in (new, base):
                if r not in self.rows and r not in self.first_seed_rows and r not in teachers \
                        and r not in REFERENCE_ROWS:
                    raise ValueError(f"study.contrasts: '{r}' is not a row of the study (study.rows, "
                                     f"{' / '.join(teachers)} or a reference row: {', '.join(REFERENCE_ROWS)})")
        for name in ("seeds", "more_cohort_seeds"):
            seeds = getattr(self, name)
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"study.{name} must be distinct and non-empty, got {seeds}")
        if len(set(self.more_cohorts)) != len(self.more_cohorts):
            raise ValueError(f"study.more_cohorts must be distinct, got {self.more_cohorts}")
        both = set(self.rows) & set(self.first_seed_rows)
        if both:
            raise ValueError(f"study.first_seed_rows repeats rows of study.rows: {', '.join(sorted(both))}")
        return self
