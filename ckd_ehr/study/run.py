"""Running a study: its cohorts, the side teachers, one resumable pipeline run per cohort and
seed (the package docstring says what each does)."""
from __future__ import annotations

import logging
import posixpath
import time
import pyarrow.fs as pafs

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig
from ckd_ehr.contracts import (CONTROL_TEXTS, SPLITS, TEACHER_META, RunLayout,
                               StudyFiles, student_variant)
from ckd_ehr.study.cohorts import study_cohorts, with_sections
from ckd_ehr.study.collect import collect
from ckd_ehr.study.summary import summarise
from ckd_ehr.pipeline import run_pipeline

log = logging.getLogger(__name__)


BASE_PARTS = ("raw", "data", "eadf", "manifest.json")
"""What a seed's run directory takes from the base run: the cohort, the split, the EADF table."""

SIDE_TEACHER_SETTINGS = {
    "teacher_plain": {"text_column": "text_plain"},
    # the baseline the MLAPH is claimed to beat: no head, the answer read from the vocabulary;
    # everything else (backbone, LoRA, rows, token budget, steps) is the study's teacher section
    "teacher_generative": {"head": "generative", "head_init": "random", "best_metric": "val_loss",
                           "train_top_layers": None},   # the LM head reads the whole stack's output
}
"""Per side teacher (contracts.SIDE_TEACHERS): how its teacher section differs from the study's."""


# running ------------------------------------------------------------------------------------

def _copy_base(base: RunLayout, dest: RunLayout) -> None:
    """Give `dest` the base run's cohort, split and EADF outputs, once (again only when the base
    changed), so the pipeline's --resume sees unchanged inputs in a resumed study."""

    marker = dest.path("study_inputs.json")
    stamp = {"base": base.root, "efficacy_table": storage.fingerprint(base.efficacy_table)}
    if storage.exists(marker) and storage.read_json(marker) == stamp:
        return
    src_fs, _ = storage.resolve(base.root)
    for part in BASE_PARTS:
        src, dst = base.path(part), dest.path(part)
        if not storage.exists(src):
            continue
        if _is_dir(dst):
            _remove_tree(dst)
        elif storage.exists(dst):
            storage.remove(dst)
        dst_fs, dst_inner = storage.resolve(dst)
        if _is_dir(src):
            dst_fs.create_dir(dst_inner, recursive=True)
            pafs.copy_files(storage.resolve(src)[1], dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)
        else:
            storage.write_bytes(dst, storage.read_bytes(src))
    storage.write_json(marker, stamp)


def _is_dir(path: str) -> bool:

    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def _remove_tree(path: str) -> None:

    fs, inner = storage.resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def _seed_config(cfg: PipelineConfig, run_dir: str, seed: int, first: bool, **teacher) -> PipelineConfig:
    """The pipeline config of one of a seed's runs: seeded teacher (with `teacher` changes) and
    student, the seed's rows as the student variants, the control texts when a row reads them.
    What does not depend on the seed is kept once per cohort, in its base run (unless the config
    names a place): the frozen layers' states of teacher and student, and evaluate's reference rows."""
    base = RunLayout(RunLayout(posixpath.dirname(run_dir.rstrip("/"))).study_base)   # the cohort's base run
    return with_sections(cfg, run_dir,
                 teacher={"seed": seed, "frozen_cache_dir": cfg.teacher.frozen_cache_dir or base.teacher_frozen_cache,
                          **teacher},
                 student={"seed": seed, "variants": cfg.study.rows_at(first),
                          "frozen_cache_dir": cfg.student.frozen_cache_dir or base.student_frozen_cache},
                 evaluate={"reference_dir": cfg.evaluate.reference_dir or base.path("evaluate", "references")},
                 eadf={"control_texts": _control_texts(cfg)})


def side_teacher_config(cfg: PipelineConfig, run_dir: str, seed: int, source: str) -> PipelineConfig:
    """The pipeline config of a seed's side teacher: the study's, its teacher section changed
    as SIDE_TEACHER_SETTINGS says (a ConfigError names what does not fit, e.g. teacher.num_layers
    set for a generative teacher)."""
    return _seed_config(cfg, run_dir, seed, True, **SIDE_TEACHER_SETTINGS[source])


def _control_texts(cfg: PipelineConfig) -> bool:
    """eadf.control_texts for the study's runs: on when a row reads a control text."""
    return cfg.eadf.control_texts or any(student_variant(r).text_column in CONTROL_TEXTS
                                         for r in cfg.study.rows_at(first=True))


def run_side_teacher(cfg: PipelineConfig, base: RunLayout, root: RunLayout, seed: int, source: str) -> None:
    """Train and score a seed's side teacher (resumable) and copy its soft labels and
    teacher.json into the seed's run, each only when changed (a resumed study keeps the seed's
    students)."""

    side_dir = root.study_side_teacher(seed, source)
    _copy_base(base, RunLayout(side_dir))
    log.info("study: seed %d, %s in %s", seed, source, side_dir)
    run_pipeline(side_teacher_config(cfg, side_dir, seed, source), resume=True, from_stage="teacher",
                 to_stage="soft_labels")
    side, dest = RunLayout(side_dir), RunLayout(root.study_seed(seed))
    files = {dest.soft_labels(split, source): storage.read_bytes(side.soft_labels(split)) for split in SPLITS}
    files[dest.side_teacher_file(source, TEACHER_META)] = storage.read_bytes(side.teacher_meta)
    for dst, data in files.items():
        if not storage.exists(dst) or storage.read_bytes(dst) != data:
            storage.write_bytes(dst, data)


def run_study(cfg: PipelineConfig) -> dict:
    """Every cohort's base run, then every seed (resumable), then collect and summarise; see the
    module docstring."""

    started = time.time()
    st = cfg.study
    cohorts = study_cohorts(cfg)
    for source in st.side_teachers(first=True):   # a side teacher's config that cannot be built fails now
        side_teacher_config(cfg, RunLayout(cfg.run_dir).study_side_teacher(st.seeds[0], source), st.seeds[0], source)
    for cohort in cohorts:
        base = RunLayout(cohort.root.study_base)
        log.info("study: cohort %s, base run (split, EADF table) in %s", cohort.name, base.root)
        run_pipeline(with_sections(cohort.cfg, base.root, eadf={"control_texts": _control_texts(cfg)}), resume=True,
                     to_stage="eadf")
        for seed in cohort.seeds:
            first = cohort.first_seed(seed)
            run_dir = cohort.root.study_seed(seed)
            _copy_base(base, RunLayout(run_dir))
            for source in st.side_teachers(first):
                run_side_teacher(cohort.cfg, base, cohort.root, seed, source)
            log.info("study: cohort %s, seed %d in %s", cohort.name, seed, run_dir)
            run_pipeline(_seed_config(cohort.cfg, run_dir, seed, first), resume=True, from_stage="teacher")
    files = collect(cfg, wall_s=round(time.time() - started, 1))
    return summarise(files)


def study_command(cfg: PipelineConfig | None, study_dir: str | None = None, summarise_only: bool = False,
                  allow_mixed_commits: bool = False) -> dict:
    """`ckd-ehr study`: run (resumable) and summarise; `summarise_only`: collect the finished runs
    and summarise, no training; with `study_dir`: summarise that directory alone (no runs read)."""
    allow = allow_mixed_commits or None   # None: the study config's own setting
    if study_dir:
        return summarise(StudyFiles(study_dir), allow_mixed_commits=allow)
    if allow:
        cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"allow_mixed_commits": True})})
    return summarise(collect(cfg)) if summarise_only else run_study(cfg)
