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
from __future__ import annotations

import gzip
import io
import logging
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import (CONTROL_TEXTS, REFERENCE_ROWS, SPLITS, TEACHER_META, TEACHER_ROWS, RunLayout,
                               StudyFiles, student_variant)
from ckd_ehr.evaluation.report import fmt, fmt_p

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


class StudyError(RuntimeError):
    """A study that cannot be summarised as asked (e.g. seeds trained at different code)."""


def _with(cfg: PipelineConfig, run_dir: str, **sections) -> PipelineConfig:
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
        c = _with(cfg, cohort_root, data={"synth": {**data["synth"], "seed": g}})
        if _cohort_name(c) == out[0].name:
            raise StudyError(f"study.more_cohorts repeats the config's own generator seed {g}")
        out.append(StudyCohort(_cohort_name(c), RunLayout(cohort_root), list(st.more_cohort_seeds), c, False))
    return out


# running ------------------------------------------------------------------------------------

def _fingerprint(layout: RunLayout) -> str | None:
    from ckd_ehr.pipeline import file_fingerprint as fp

    return fp(layout.efficacy_table)


def _copy_base(base: RunLayout, dest: RunLayout) -> None:
    """Give `dest` the base run's cohort, split and EADF outputs, once (again only when the base
    changed), so the pipeline's --resume sees unchanged inputs in a resumed study."""
    import pyarrow.fs as pafs

    marker = dest.path("study_inputs.json")
    stamp = {"base": base.root, "efficacy_table": _fingerprint(base)}
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
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def _remove_tree(path: str) -> None:
    import pyarrow.fs as pafs

    fs, inner = storage.resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)


def _seed_config(cfg: PipelineConfig, run_dir: str, seed: int, first: bool, **teacher) -> PipelineConfig:
    """The pipeline config of one of a seed's runs: seeded teacher (with `teacher` changes) and
    student, the seed's rows as the student variants, the control texts when a row reads them.
    What does not depend on the seed is kept once per cohort, in its base run (unless the config
    names a place): the frozen layers' states of teacher and student, and evaluate's reference rows."""
    base = RunLayout(RunLayout(posixpath.dirname(run_dir.rstrip("/"))).study_base)   # the cohort's base run
    return _with(cfg, run_dir,
                 teacher={"seed": seed, "frozen_cache_dir": cfg.teacher.frozen_cache_dir or base.teacher_frozen_cache,
                          **teacher},
                 student={"seed": seed, "variants": cfg.study.rows_at(first),
                          "frozen_cache_dir": cfg.student.frozen_cache_dir or base.student_frozen_cache},
                 evaluate={"reference_dir": cfg.evaluate.reference_dir or base.path("evaluate", "references")},
                 eadf={"control_texts": _control_texts(cfg)})


def _side_teacher_config(cfg: PipelineConfig, run_dir: str, seed: int, source: str) -> PipelineConfig:
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
    from ckd_ehr.pipeline import run_pipeline

    side_dir = root.study_side_teacher(seed, source)
    _copy_base(base, RunLayout(side_dir))
    log.info("study: seed %d, %s in %s", seed, source, side_dir)
    run_pipeline(_side_teacher_config(cfg, side_dir, seed, source), resume=True, from_stage="teacher",
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
    from ckd_ehr.pipeline import run_pipeline

    started = time.time()
    st = cfg.study
    cohorts = study_cohorts(cfg)
    for source in st.side_teachers(first=True):   # a side teacher's config that cannot be built fails now
        _side_teacher_config(cfg, RunLayout(cfg.run_dir).study_side_teacher(st.seeds[0], source), st.seeds[0], source)
    for cohort in cohorts:
        base = RunLayout(cohort.root.study_base)
        log.info("study: cohort %s, base run (split, EADF table) in %s", cohort.name, base.root)
        run_pipeline(_with(cohort.cfg, base.root, eadf={"control_texts": _control_texts(cfg)}), resume=True,
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


# collecting: the runs -> RUN/study (contracts.StudyFiles) -------------------------------------

TRAINING_STAGES = ("prepare", "eadf", "teacher", "soft_labels", "student", "evaluate")
"""The stages whose code a seed's figures depend on (their manifest records are compared)."""


def _write_csv_gz(path: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:   # mtime 0: the same bytes for the same table
        f.write(frame.to_csv(index=False, float_format="%.7g").encode())
    storage.write_bytes(path, buf.getvalue())


def _read_csv_gz(path: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(gzip.decompress(storage.read_bytes(path))))


def _test_predictions(seed_dir: str, row: str) -> pd.DataFrame:
    """A row's test predictions in one seed's run (PREDICTIONS rows, sorted by sample_id)."""
    from ckd_ehr.evaluation.predictions import read_predictions, teacher_predictions_from_soft_labels

    layout = RunLayout(seed_dir)
    if row in TEACHER_ROWS:
        df = teacher_predictions_from_soft_labels(layout, "test", row)
        if df is None:
            raise FileNotFoundError(f"{layout.soft_labels('test', row)}: no {row} test predictions in {seed_dir}")
        return df
    return read_predictions(layout.predictions(row))


def _stage_records(run_dir: str) -> dict:
    from ckd_ehr.pipeline import read_manifest

    layout = RunLayout(run_dir)
    return read_manifest(layout)["stages"] if storage.exists(layout.manifest) else {}


def _stage_seconds(stages: dict, skip: tuple[str, ...] = ("prepare", "eadf")) -> float | None:
    """Seconds of a run's own stages (a seed's manifest starts as a copy of the base's: `skip`)."""
    if not stages:
        return None
    return round(sum(float(v.get("seconds") or 0.0) for k, v in stages.items() if k not in skip), 1)


def _evaluate_figures(metrics: dict) -> dict:
    """What the summary reads of a seed's evaluate: per model its kept step and the paper's
    secondary metrics; the reference rows (floors, ceilings, probes) with intervals."""
    models = {r: {"kept_step": e.get("kept_step"),
                  "accuracy_fixed": e["modes"]["fixed"]["metrics"].get("accuracy"),
                  "macro_f1_fixed": e["modes"]["fixed"]["metrics"].get("macro_f1"),
                  "macro_f1_tuned": e["modes"]["tuned"]["metrics"].get("macro_f1")
                  if "tuned" in e["modes"] else None}
              for r, e in (metrics.get("models") or {}).items()}
    refs = {n: {"role": e["role"], "macro_auroc": e["modes"]["fixed"]["metrics"].get("macro_auroc"),
                "interval": (e["modes"]["fixed"]["intervals"] or {}).get("macro_auroc"),
                "accuracy": e["modes"]["fixed"]["metrics"].get("accuracy")}
            for n, e in (metrics.get("baselines") or {}).items()}
    return {"models": models, "references": refs}


def collect(cfg: PipelineConfig, wall_s: float | None = None) -> StudyFiles:
    """Copy what the summary needs from the finished runs into RUN/study (StudyFiles): the
    config, per cohort the test labels, per cohort and seed every row's test predictions and a
    record (the code each stage ran at, stage times, evaluate's figures, the teachers' side-by-side
    figures). Returns the study's files."""
    st = cfg.study
    files = StudyFiles(RunLayout(cfg.run_dir).study_dir)
    storage.write_json(files.config, {"config": cfg.model_dump(mode="json"), "wall_s": wall_s})
    for cohort in study_cohorts(cfg):
        reference = None
        for seed in cohort.seeds:
            seed_dir = cohort.root.study_seed(seed)
            layout = RunLayout(seed_dir)
            rows = [*st.rows_at(cohort.first_seed(seed)), *st.teacher_rows(cohort.first_seed(seed)),
                    *[r for r in REFERENCE_ROWS if storage.exists(layout.predictions(r))]]
            frames = []
            for r in rows:
                df = _test_predictions(seed_dir, r)
                if reference is None:
                    reference = df[["sample_id", "subject_id", "labels"]]
                    labels = np.stack(reference["labels"].to_numpy())
                    _write_csv_gz(files.labels(cohort.name), pd.concat(
                        [reference[["sample_id", "subject_id"]],
                         pd.DataFrame(labels, columns=[f"y_{j}" for j in range(labels.shape[1])])], axis=1))
                elif df["sample_id"].tolist() != reference["sample_id"].tolist():
                    raise StudyError(f"cohort {cohort.name}, seed {seed}, row {r}: test samples differ from the "
                                     f"cohort's first seed (a cohort's test split must be fixed)")
                probs = np.stack(df["probs"].to_numpy())
                frames.append(pd.concat([pd.DataFrame({"sample_id": df["sample_id"], "row": r}),
                                         pd.DataFrame(probs, columns=[f"p_{j}" for j in range(probs.shape[1])])],
                                        axis=1))
            _write_csv_gz(files.predictions(cohort.name, seed), pd.concat(frames, ignore_index=True))
            own = _stage_records(seed_dir)
            sides = {s: _stage_records(cohort.root.study_side_teacher(seed, s))
                     for s in st.side_teachers(cohort.first_seed(seed))}
            code = {name: rec.get("code") for name, rec in own.items() if name in TRAINING_STAGES}
            for s, recs in sides.items():
                code.update({f"{s}/{name}": rec.get("code") for name, rec in recs.items() if name in TRAINING_STAGES})
            record = {"cohort": cohort.name, "seed": seed, "run_dir": seed_dir, "rows": rows, "code": code,
                      "seed_wall_s": None if not own else round(
                          _stage_seconds(own) + sum(_stage_seconds(r) or 0.0 for r in sides.values()), 1),
                      **_evaluate_figures(storage.read_json(layout.metrics) if storage.exists(layout.metrics) else {})}
            teachers = st.teacher_rows(cohort.first_seed(seed))
            if len(teachers) > 1:
                record["teachers"] = teacher_comparison(cohort.cfg, layout, seed, teachers, own,
                                                        {s: sides[s] for s in sides})
            storage.write_json(files.seed_record(cohort.name, seed), record)
        base = _stage_records(cohort.root.study_base)
        storage.write_json(files.base_record(cohort.name), {
            "stage_seconds": _stage_seconds(base, skip=()),
            "code": {name: rec.get("code") for name, rec in base.items() if name in TRAINING_STAGES}})
    return files


TEACHER_METRICS = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc")
"""The ranking metrics the teachers are compared on (issue 19), validation and test."""


def teacher_comparison(cfg: PipelineConfig, layout: RunLayout, seed: int, teachers: list[str], own: dict,
                       sides: dict) -> dict:
    """One seed's teachers side by side: validation metrics (its soft labels on the validation
    rows the student reads, patient-bootstrap intervals), test metrics and calibration (the
    seed's evaluate), soft-label throughput (rows the teacher computed per second, Ray Data's
    start-up included) and training time (from the manifest of the run that trained it)."""
    from ckd_ehr.evaluation.predictions import teacher_predictions_from_soft_labels
    from ckd_ehr.metrics import evaluate_predictions, macro_label_set, to_matrix

    evaluated = storage.read_json(layout.metrics)
    out = {}
    for t in teachers:
        val = teacher_predictions_from_soft_labels(layout, "val", t)
        y = to_matrix(val["labels"], np.int8)
        v = evaluate_predictions(y, to_matrix(val["probs"]), val["subject_id"].to_numpy(), bootstrap=cfg.study.bootstrap,
                                 seed=cfg.evaluate.seed, label_set=macro_label_set(y, 1))
        test = evaluated["models"][t]
        fixed = test["modes"]["fixed"]
        stages = own if t == "teacher" else sides[t]
        out[t] = {"role": TEACHER_ROWS[t],
                  "val": {"n_samples": v["n_samples"], **{m: v["metrics"][m] for m in TEACHER_METRICS},
                          "intervals": {m: v["intervals"].get(m) for m in TEACHER_METRICS}},
                  "test": {"n_samples": test["n_samples"], **{m: fixed["metrics"][m] for m in TEACHER_METRICS},
                           "intervals": {m: (fixed["intervals"] or {}).get(m) for m in TEACHER_METRICS},
                           "ece": test["calibration"]["ece"]},
                  "calibration": test["calibration"], "kept_step": test.get("kept_step"),
                  "soft_labels": (stages["soft_labels"].get("summary") or {}).get("scoring"),
                  "teacher_train_s": stages["teacher"]["seconds"]}
    return out


# summarising: RUN/study (or a copy) -> results.json, study.md, forest.png ----------------------

def _code_states(records: dict, bases: dict) -> dict[str, list[str]]:
    """ckd_ehr content hash -> the (cohort, seed, stage) runs that trained at it."""
    states: dict[str, list[str]] = {}
    for (cohort, seed), rec in records.items():
        for stage, code in rec.get("code", {}).items():
            states.setdefault((code or {}).get("ckd_ehr_sha256") or "unknown", []).append(f"{cohort}/seed_{seed}/{stage}")
    for cohort, rec in bases.items():
        for stage, code in rec.get("code", {}).items():
            states.setdefault((code or {}).get("ckd_ehr_sha256") or "unknown", []).append(f"{cohort}/base/{stage}")
    return states


def summarise(files: StudyFiles, allow_mixed_commits: bool | None = None) -> dict:
    """results.json, study.md and forest.png from a study directory alone (what `collect`
    wrote): rows and contrasts per cohort and pooled (ckd_ehr.evaluation.contrasts), references,
    secondary metrics, teachers side by side, the code every seed trained at. Refuses seeds that
    trained at different code unless allow_mixed_commits (None: the study config's)."""
    from ckd_ehr.evaluation.contrasts import Cohort, study_contrasts
    from ckd_ehr.evaluation.report import plot_contrasts, render_markdown

    saved = storage.read_json(files.config)
    cfg = build(PipelineConfig, saved["config"], source=files.config)
    st = cfg.study
    allow = st.allow_mixed_commits if allow_mixed_commits is None else allow_mixed_commits
    cohorts, records, bases = [], {}, {}
    for cohort in study_cohorts(cfg):
        labels = _read_csv_gz(files.labels(cohort.name))
        y = labels[[c for c in labels.columns if c.startswith("y_")]].to_numpy(np.int8)
        probs: dict[str, dict[int, np.ndarray]] = {}
        for seed in cohort.seeds:
            preds = _read_csv_gz(files.predictions(cohort.name, seed))
            for r, df in preds.groupby("row", sort=False):
                if df["sample_id"].tolist() != labels["sample_id"].tolist():
                    raise StudyError(f"{files.predictions(cohort.name, seed)}: row {r} is not on the cohort's test samples")
                probs.setdefault(r, {})[seed] = df[[c for c in df.columns if c.startswith("p_")]].to_numpy(np.float64)
            records[(cohort.name, seed)] = storage.read_json(files.seed_record(cohort.name, seed))
        bases[cohort.name] = storage.read_json(files.base_record(cohort.name))
        cohorts.append(Cohort(cohort.name, y, labels["subject_id"].to_numpy(), probs,
                              label_set=np.sum(y > 0, axis=0) >= cfg.evaluate.min_test_positives))
    states = _code_states(records, bases)
    if len(states) > 1 and not allow:
        raise StudyError("the study's runs trained at different code (ckd_ehr content hashes: "
                         + "; ".join(f"{h[:12]}: {', '.join(v[:4])}{' ...' if len(v) > 4 else ''}"
                                     for h, v in states.items())
                         + "); rerun them at one commit, or summarise with --allow-mixed-commits")
    result = study_contrasts(cohorts, [tuple(c) for c in st.contrasts], resamples=st.bootstrap,
                             seed=cfg.evaluate.seed, level=st.level, alpha=st.alpha)
    rows = [*st.rows, *st.first_seed_rows, *st.teacher_rows(True),
            *[r for r in REFERENCE_ROWS if any(r in c.probs for c in cohorts)]]
    result.update({
        "cohorts_trained": {c.name: c.seeds for c in study_cohorts(cfg)},
        "wall_s": saved.get("wall_s"),
        "base_wall_s": {c: b.get("stage_seconds") for c, b in bases.items()},
        "seed_wall_s": {f"{c}/seed_{s}": r.get("seed_wall_s") for (c, s), r in records.items()},
        "code": {"states": states, "mixed": len(states) > 1,
                 "per_seed": {f"{c}/seed_{s}": r.get("code") for (c, s), r in records.items()}},
        "config": saved["config"],
        "references": {c.name: records[(c.name, c.seeds[0])].get("references") or {} for c in study_cohorts(cfg)},
        "roles": {r: _role(r) for r in rows},
        "secondary": secondary_metrics(records, rows),
    })
    teachers = {f"{c}/seed_{s}": r["teachers"] for (c, s), r in records.items() if r.get("teachers")}
    if teachers:
        result["teachers"] = teachers
    storage.write_json(files.results, result)
    storage.write_bytes(files.path("forest.png"), plot_contrasts(result))
    blocks = [("h1", "CKD-EHR study"), ("p", study_summary_line(result)),
              ("h2", "Rows: test macro AUROC"), ("table", *row_table(result)),
              *reference_blocks(result), ("h2", "Contrasts"), *contrast_blocks(result),
              ("img", "forest.png", "contrasts"), *teacher_blocks(result, files),
              ("h2", "Code the runs trained at"), ("table", *code_table(result))]
    if {"ckd_ehr", "hard_plain"} <= set(rows):   # the paper's claim is (d) against plain BERT, (a)
        blocks += [("h2", "The paper's claim beside this study"), ("table", *paper_claim_table(result))]
    storage.write_text(files.markdown, render_markdown(blocks))
    log.info("study: %s", ", ".join(f"{c['name']} identical predictions" if c.get("identical") else
                                    f"{c['name']} {c['delta']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] "
                                    f"p_holm={fmt_p(c['p_holm'])}" for c in result["contrasts"]))
    return result


def _role(row: str) -> str:
    from ckd_ehr.evaluation.evaluate import BASELINE_ROLES
    from ckd_ehr.evaluation.probe_rows import PROBE_ROLES

    if row in TEACHER_ROWS:
        return TEACHER_ROWS[row]
    if row in REFERENCE_ROWS:
        return {**BASELINE_ROLES, **PROBE_ROLES}[row]
    return student_variant(row).role


def secondary_metrics(records: dict, rows) -> dict:
    """Per row, over every (cohort, seed) that trained it: the paper's element-wise accuracy and
    macro-F1 at 0.5 (never the headline: all-negative scores about 0.84 on that accuracy),
    macro-F1 at the thresholds tuned on validation, and the checkpoint step each kept (0: the
    probe, no update applied). A figure some run lacks gives None, not a guess."""
    out: dict[str, dict] = {}
    for r in rows:
        entries = [rec["models"][r] for rec in records.values() if r in rec.get("rows", []) and r in rec["models"]]
        trained = sum(r in rec.get("rows", []) for rec in records.values())
        out[r] = {"kept_step": [e.get("kept_step") for e in entries]}
        for key in ("accuracy_fixed", "macro_f1_fixed", "macro_f1_tuned"):
            vals = [e.get(key) for e in entries]
            out[r][key] = float(np.mean(vals)) if entries and len(entries) == trained and None not in vals else None
    return out


def paper_claim_table(result: dict, new: str = "ckd_ehr", base: str = "hard_plain") -> tuple[list[str], list]:
    """(header, rows): the paper's claimed gains of CKD-EHR over plain BERT next to this study's
    (d) - (a) on the same metrics, in points and relative (the paper does not say which it means)."""
    from ckd_ehr.evaluation.evaluate import PAPER_CLAIMS

    sec = result.get("secondary", {})
    rows = []
    for label, key, claim in (("element-wise accuracy at 0.5", "accuracy_fixed", PAPER_CLAIMS["accuracy_gain"]),
                              ("macro-F1 at 0.5", "macro_f1_fixed", PAPER_CLAIMS["f1_gain"]),
                              ("macro-F1, thresholds tuned on validation", "macro_f1_tuned", None)):
        a, d = sec.get(base, {}).get(key), sec.get(new, {}).get(key)
        ours = "-" if a is None or d is None else \
            f"{d - a:+.3f} points ({'-' if not a else f'{(d - a) / a:+.1%}'} relative)"
        rows.append([label, "-" if claim is None else f"+{claim:.0%}", ours])
    a, d = result["rows"].get(base), result["rows"].get(new)
    rows.append(["macro AUROC (this study's primary metric)", "not reported",
                 "-" if a is None or d is None else f"{d['value'] - a['value']:+.3f}"])
    return ["metric", f"paper: {new} vs BERT", f"this study: {new} - {base}, mean over runs"], rows


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _interval(iv) -> str:
    return "-" if not iv or iv[0] is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def _df(df: float) -> str:
    return "inf" if not np.isfinite(df) else f"{df:.1f}"


def study_summary_line(result: dict) -> str:
    """Cohorts, seeds, test splits, code and times of a results.json, in a few sentences."""
    parts = []
    for name, seeds in result["cohorts_trained"].items():
        c = result["cohorts"][name]
        parts.append(f"cohort {name}: {c['test_samples']} test pairs of {c['test_patients']} patients, seeds "
                     f"{', '.join(map(str, seeds))}")
    code = result["code"]
    commits = sorted({(s or {}).get("commit") or "no git" for seed in code["per_seed"].values()
                      for s in (seed or {}).values()})
    times = ", ".join(f"{k} {_minutes(v)}" for k, v in result.get("seed_wall_s", {}).items())
    return (f"{'; '.join(parts)}. Trained at commit(s) {', '.join(c[:7] for c in commits)}"
            f"{' (MIXED CODE: see the table at the end)' if code['mixed'] else ''}. Wall time of the last "
            f"invocation {_minutes(result.get('wall_s'))}; stage time per seed: {times or '-'}. "
            f"Intervals: {result['level']:.0%}, test patients (bootstrap, {result['resamples']} draws) and "
            f"training seeds together; method: {result['method']}.")


def row_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each row's value pooled over cohorts, its interval and degrees of freedom,
    its value per cohort and per seed, kept steps and the secondary metrics."""
    names = list(result["cohorts"])
    header = ["row", "role", "macro AUROC", "interval", "df", *[f"{n}: per seed" for n in names],
              "kept step", "accuracy (0.5)", "macro-F1 (tuned)"]
    rows = []
    for r, role in result["roles"].items():   # the study's order
        if r not in result["rows"]:
            continue
        e, sec = result["rows"][r], result.get("secondary", {}).get(r, {})
        per = [", ".join(f"{v:.3f}" for v in result["cohorts"][n]["rows"][r]["per_seed"])
               if r in result["cohorts"][n]["rows"] else "-" for n in names]
        rows.append([r, role, f"{e['value']:.3f}", _interval(e["interval"])
                     + ("" if e["seed_noise_estimated"] else " (test patients only: one seed)"), _df(e["df"]), *per,
                     ", ".join(str(k) for k in sec.get("kept_step", [])) or "-",
                     fmt(sec.get("accuracy_fixed")), fmt(sec.get("macro_f1_tuned"))])
    return header, rows


def reference_blocks(result: dict) -> list[tuple]:
    """Per cohort, the floors, ceilings and probe rows of its first seed's evaluate."""
    out = []
    for name, refs in result["references"].items():
        out += [("h2", f"Reference and probe rows, cohort {name} (its first seed's evaluate)"),
                ("table", ["row", "role", "macro AUROC", "interval", "accuracy (0.5)"],
                 [[n, e["role"], fmt(e["macro_auroc"]), _interval(e["interval"]), fmt(e.get("accuracy"))]
                  for n, e in refs.items()])]
    return out


def contrast_blocks(result: dict) -> list[tuple]:
    """The contrasts pooled over cohorts (when there are several) and per cohort, with the method."""
    header = ["contrast", "difference", "95% interval", "simultaneous interval", "p (Holm)", "detectable (80%)",
              "se test / seed", "df", "per seed"]

    def table(contrasts: list[dict]) -> tuple:
        rows = []
        for c in contrasts:
            if c.get("identical"):
                rows.append([c["name"], "identical predictions in every seed: nothing compared", "-", "-", "-", "-",
                             "-", "-", ", ".join(fmt(d) for d in c["per_seed"])])
                continue
            rows.append([c["name"], fmt(c["delta"]), _interval(c["marginal_interval"]), _interval(c["interval"]),
                         ("< " if c.get("p_at_floor") else "") + fmt_p(c["p_holm"]), fmt(c["detectable"]),
                         f"{c['se_test']:.4f} / {c['se_seed']:.4f}"
                         + ("" if c["seed_noise_estimated"] else " (one seed: seed noise not estimated)"),
                         _df(c["df"]), ", ".join(fmt(d) for d in c["per_seed"])])
        return ("table", header, rows)

    names = list(result["cohorts"])
    out = []
    if len(names) > 1:
        out += [("p", f"Pooled over cohorts {', '.join(names)} (fixed effect: inverse-variance weights, one true "
                      "value assumed; with two cohorts the variance between cohorts cannot be estimated, so these "
                      "intervals do not carry it)."), table(result["contrasts"])]
    for n in names:
        out += [("p", f"Cohort {n}:"), table(result["cohorts"][n]["contrasts"])]
    out.append(("p", f"Method: {result['method']}. p is never reported below {result['p_floor']:g} (1 / bootstrap "
                     "draws; '<' marks the floor). Detectable: the difference found with 80% power at the "
                     "Bonferroni level, given that contrast's standard error."))
    return out


def teacher_blocks(result: dict, files: StudyFiles) -> list[tuple]:
    """The teachers side by side (validation and test with intervals, ECE, soft-label
    throughput, training time) and their test reliability diagram (teachers_reliability.png)."""
    from ckd_ehr.plots import plot_reliability_curves

    teachers = result.get("teachers")
    if not teachers:
        return []
    header = ["teacher", "run", "split", *TEACHER_METRICS, "ECE", "soft labels: rows/s", "training"]
    rows, curves = [], {}
    for run, entry in teachers.items():
        for t, e in entry.items():
            sl = e["soft_labels"] or {}
            for split in ("val", "test"):
                m = e[split]
                rows.append([t, run, f"{split} ({m['n_samples']})",
                             *[f"{fmt(m[k])} {_interval(m['intervals'].get(k))}" for k in TEACHER_METRICS],
                             fmt(m.get("ece")) if split == "test" else "-",
                             f"{fmt(sl.get('rows_per_s'))} ({sl.get('rows')} rows)" if split == "test" else "-",
                             _minutes(e["teacher_train_s"]) if split == "test" else "-"])
            curves.setdefault(t, e["calibration"])   # the first run's curve per teacher
    storage.write_bytes(files.path("teachers_reliability.png"),
                        plot_reliability_curves(curves, "Teachers: reliability on the test split", highlight="teacher"))
    return [("h2", "Teachers side by side (the MLAPH claim)"), ("table", header, rows),
            ("p", "Validation: each teacher's soft labels on the validation rows the student reads; a generative "
                  "teacher's per-phenotype calibration is fitted on the first validation rows (its macro AUROC "
                  "does not depend on it, its micro metrics do). Test: the seed's evaluate, thresholds at 0.5 for "
                  "ECE. Soft labels: rows the teacher computed per second, Ray Data's start-up included. "
                  "Intervals: 95% patient bootstrap."),
            ("img", "teachers_reliability.png", "teachers' reliability diagram")]


def code_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per cohort and seed, the commit, dirty state and ckd_ehr content hash of
    each of its stages (one line when they agree)."""
    from ckd_ehr.provenance import short

    rows = []
    for run, stages in result["code"]["per_seed"].items():
        distinct = {short(c) for c in (stages or {}).values()}
        if len(distinct) <= 1:
            rows.append([run, "all stages", next(iter(distinct), "unknown")])
        else:
            rows += [[run, stage, short(c)] for stage, c in stages.items()]
    return ["run", "stages", "commit, ckd_ehr content hash"], rows
