"""`ckd-ehr study`: does EADF help, does distillation help, and by how much, over cohorts and seeds.

A cohort is one patient split and one EADF table: the config's data (RUN/base: `prepare` and
`eadf` once, with the control texts when a row reads them) and, on synthetic data, each
generator seed of `study.more_cohorts` (RUN/cohort_{g}/base). Per cohort and training seed k
(training varies, the test split does not):

1. when a row distils from a second teacher (SIDE_TEACHER_SETTINGS): from a plain-text teacher
   (`distill_plain_ablation`, the study's (c)), RUN/seed_k_plain_teacher trains a teacher on
   `text_plain`; from a generative teacher (`ckd_ehr_generative`), RUN/seed_k_generative_teacher
   trains the same LLM with `teacher.head: generative`. Either scores its soft labels, which are
   copied to RUN/seed_k/soft_labels/<source>/ with its teacher.json;
2. RUN/seed_k runs the pipeline from the teacher on (teacher.seed = student.seed = k) with
   student.variants = the study's rows (study.first_seed_rows too at the first cohort's first
   seed), through evaluate and report.

Every run directory is a normal pipeline run resumed with `--resume` semantics, so an
interrupted study picks up where it stopped. Then `collect` copies into RUN/study/ everything
the tables are built from (contracts.StudyFiles: every row's test predictions per cohort and
seed, the code each seed trained at, stage times, evaluate's figures), and `summarise` builds
results.json, study.md and forest.png from that directory alone, so a copy under docs/ rebuilds
with `ckd-ehr study --summarise-only --study-dir DIR`. The statistics (intervals over test
patients and seeds, cohorts pooled) are ckd_ehr.evaluation.contrasts'.
"""
from ckd_ehr.study.collect import collect
from ckd_ehr.study.run import run_study, study_command
from ckd_ehr.study.summary import summarise

__all__ = ["collect", "run_study", "study_command", "summarise"]
