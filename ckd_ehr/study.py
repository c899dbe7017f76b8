"""`ckd-ehr study`: does EADF help, does distillation help, and by how much, over seeds.

One cohort, one patient split and one EADF table (RUN/base: `prepare` and `eadf` once, with the
control texts when a row reads them); then per seed k (training varies, the test split does not):

1. when a row distils from a second teacher (SIDE_TEACHER_SETTINGS): from a plain-text teacher
   (`distill_plain_ablation`, the study's (c)), RUN/seed_k_plain_teacher trains a teacher on
   `text_plain`; from a generative teacher (`ckd_ehr_generative`, the MLAPH claim of issue 19),
   RUN/seed_k_generative_teacher trains the same LLM with `teacher.head: generative`. Either
   scores its soft labels, which are copied to RUN/seed_k/soft_labels/<source>/ with its
   teacher.json;
2. RUN/seed_k runs the pipeline from the teacher on (teacher.seed = student.seed = k) with
   student.variants = study.rows, through evaluate and report.

Every run directory is a normal pipeline run resumed with `--resume` semantics, so an
interrupted study picks up where it stopped. Finally the contrasts stated in the config
(ckd_ehr.evaluation.contrasts: patient bootstrap with seeds averaged in each draw, Holm,
max-T simultaneous intervals) -> RUN/study/results.json (with the commit, the config and the
wall time), forest.png and study.md: every row with its interval, per-seed values, kept step and the
paper's secondary metrics, and every baseline and probe row of seed 0.
"""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import (CONTROL_TEXTS, SIDE_TEACHERS, SPLITS, TEACHER_META, TEACHER_ROWS, RunLayout,
                               student_variant)
from ckd_ehr.evaluation.report import fmt

log = logging.getLogger(__name__)

BASE_PARTS = ("raw", "data", "eadf", "manifest.json")
"""What a seed's run directory takes from the base run: the cohort, the split, the EADF table."""

SIDE_TEACHER_SETTINGS = {
    "teacher_plain": {"text_column": "text_plain"},
    # the baseline the MLAPH is claimed to beat: no head, the answer read from the vocabulary;
    # everything else (backbone, LoRA, rows, token budget, steps) is the study's teacher section
    "teacher_generative": {"head": "generative", "head_init": "random", "best_metric": "val_loss"},
}
"""Per side teacher (contracts.SIDE_TEACHERS): how its teacher section differs from the study's."""


def _with(cfg: PipelineConfig, run_dir: str, **sections) -> PipelineConfig:
    data = cfg.model_dump(mode="json")
    data["run_dir"] = run_dir
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    return build(PipelineConfig, data, source="study")


def _fingerprint(layout: RunLayout) -> str | None:
    from ckd_ehr.pipeline import _fingerprint as fp

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


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _test_predictions(seed_dir: str, row: str) -> pd.DataFrame:
    """A row's test predictions in one seed's run (PREDICTIONS rows, sorted by sample_id)."""
    from ckd_ehr.evaluation.evaluate import read_predictions, teacher_predictions_from_soft_labels

    layout = RunLayout(seed_dir)
    if row in TEACHER_ROWS:
        df = teacher_predictions_from_soft_labels(layout, "test", row)
        if df is None:
            raise FileNotFoundError(f"{layout.soft_labels('test', row)}: no {row} test predictions in {seed_dir}")
        return df
    return read_predictions(layout.predictions(row))


def _stage_seconds(run_dir: str, skip: tuple[str, ...] = ("prepare", "eadf")) -> float | None:
    """Seconds the run's own stages took (manifest.json), the base run's `skip` left out (a seed's
    manifest starts as a copy of the base's); None without a manifest."""
    from ckd_ehr.pipeline import read_manifest

    layout = RunLayout(run_dir)
    if not storage.exists(layout.manifest):
        return None
    stages = read_manifest(layout)["stages"]
    return round(sum(float(v.get("seconds") or 0.0) for k, v in stages.items() if k not in skip), 1)


def seed_wall_seconds(root: RunLayout, seed: int) -> float | None:
    """A seed's training cost: its run's stages plus its side teachers', when it has them."""
    own = _stage_seconds(root.study_seed(seed))
    sides = [_stage_seconds(root.study_side_teacher(seed, source)) for source in SIDE_TEACHERS]
    return None if own is None else round(own + sum(s or 0.0 for s in sides), 1)


def summarise(cfg: PipelineConfig, wall_s: float | None = None) -> dict:
    """The contrasts over the finished seeds -> RUN/study/{results.json, forest.png, study.md}."""
    from ckd_ehr.evaluation.contrasts import seed_averaged_contrasts
    from ckd_ehr.evaluation.metrics import macro_label_set, to_matrix
    from ckd_ehr.evaluation.report import contrast_blocks, plot_contrasts, render_markdown

    root, st = RunLayout(cfg.run_dir), cfg.study
    rows = [*st.rows, *st.teacher_rows()]
    probs: dict[str, list[np.ndarray]] = {r: [] for r in rows}
    reference = None
    for seed in st.seeds:
        for r in rows:
            df = _test_predictions(root.study_seed(seed), r)
            if reference is None:
                reference = df[["sample_id", "subject_id", "labels"]]
            elif df["sample_id"].tolist() != reference["sample_id"].tolist():
                raise ValueError(f"seed {seed}, row {r}: test samples differ from the first seed's "
                                 f"(the study's test split must be fixed)")
            probs[r].append(to_matrix(df["probs"]))
    y = to_matrix(reference["labels"], np.int8)
    result = seed_averaged_contrasts(y, reference["subject_id"].to_numpy(), probs, [tuple(c) for c in st.contrasts],
                                     resamples=st.bootstrap, seed=cfg.evaluate.seed, level=st.level, alpha=st.alpha,
                                     label_set=macro_label_set(y, cfg.evaluate.min_test_positives))
    # each seed's evaluate, read once: seed 0's references, every seed's secondary metrics
    evaluated = [storage.read_json(path) if storage.exists(path := RunLayout(root.study_seed(k)).metrics) else {}
                 for k in st.seeds]
    seed0 = evaluated[0]
    base_s = _stage_seconds(root.study_base, skip=())
    result.update({
        "test_samples": int(len(y)), "test_patients": int(reference["subject_id"].nunique()),
        "seeds": st.seeds, "commit": _commit(), "wall_s": wall_s,
        # from the stage timings in each run's manifest, so a resumed study still reports them
        "base_wall_s": base_s, "seed_wall_s": {str(k): seed_wall_seconds(root, k) for k in st.seeds},
        "config": cfg.model_dump(mode="json"),
        "references": {name: {"role": e["role"], "macro_auroc": e["modes"]["fixed"]["metrics"].get("macro_auroc"),
                              "interval": (e["modes"]["fixed"]["intervals"] or {}).get("macro_auroc"),
                              "accuracy": e["modes"]["fixed"]["metrics"].get("accuracy")}
                       for name, e in (seed0.get("baselines") or {}).items()},
        "roles": {r: TEACHER_ROWS[r] if r in TEACHER_ROWS else student_variant(r).role for r in rows},
    })
    if len(st.teacher_rows()) > 1:   # teachers side by side (the MLAPH claim)
        result["teachers"] = teacher_comparison(cfg, st.teacher_rows())
    result["secondary"] = secondary_metrics([e.get("models") or {} for e in evaluated], rows)
    storage.write_json(root.study_results, result)
    storage.write_bytes(storage.join(root.study_dir, "forest.png"), plot_contrasts(result))
    table = [("h1", "CKD-EHR study"), ("p", study_summary_line(result)),
             ("h2", "Rows: test macro AUROC, mean over seeds"), ("table", *row_table(result)),
             ("h2", f"Reference and probe rows (seed {st.seeds[0]})"), ("table", *reference_table(result)),
             ("h2", "Contrasts"), *contrast_blocks(result), ("img", "forest.png", "contrasts"),
             *teacher_blocks(result, root)]
    if {"ckd_ehr", "hard_plain"} <= set(st.rows):   # the paper's claim is (d) against plain BERT, (a)
        table += [("h2", "The paper's claim beside this study"), ("table", *paper_claim_table(result))]
    storage.write_text(storage.join(root.study_dir, "study.md"), render_markdown(table))
    log.info("study: %s", ", ".join(f"{c['name']} identical predictions" if c.get("identical") else
                                    f"{c['name']} {c['delta']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] "
                                    f"p_holm={c['p_holm']:.3g}" for c in result["contrasts"]))
    return result


TEACHER_METRICS = ("macro_auroc", "micro_auroc", "macro_auprc", "micro_auprc")
"""The ranking metrics the teachers are compared on (issue 19), validation and test."""


def teacher_comparison(cfg: PipelineConfig, teachers: list[str]) -> dict:
    """Per teacher row and seed: validation metrics (its soft labels on the validation rows the
    student reads, patient-bootstrap intervals), test metrics and calibration (the seed's
    evaluate), soft-label throughput (rows the teacher computed per second, Ray Data's start-up
    included) and training time. The reliability diagram is drawn by teacher_blocks."""
    from ckd_ehr.evaluation.evaluate import teacher_predictions_from_soft_labels
    from ckd_ehr.evaluation.metrics import evaluate_predictions, macro_label_set, to_matrix
    from ckd_ehr.pipeline import read_manifest

    root, st = RunLayout(cfg.run_dir), cfg.study
    out: dict[str, dict] = {t: {"role": TEACHER_ROWS[t], "seeds": {}} for t in teachers}
    for seed in st.seeds:
        layout = RunLayout(root.study_seed(seed))
        evaluated = storage.read_json(layout.metrics)
        for t in teachers:
            val = teacher_predictions_from_soft_labels(layout, "val", t)
            y = to_matrix(val["labels"], np.int8)
            v = evaluate_predictions(y, to_matrix(val["probs"]), val["subject_id"].to_numpy(), bootstrap=st.bootstrap,
                                     seed=cfg.evaluate.seed, label_set=macro_label_set(y, 1))
            test = evaluated["models"][t]
            fixed = test["modes"]["fixed"]
            # the run that trained and scored this teacher: the seed's own, or its side teacher's
            stages = read_manifest(layout if t == "teacher" else RunLayout(root.study_side_teacher(seed, t)))["stages"]
            scoring, train_s = (stages["soft_labels"].get("summary") or {}).get("scoring"), stages["teacher"]["seconds"]
            out[t]["seeds"][str(seed)] = {
                "val": {"n_samples": v["n_samples"], **{m: v["metrics"][m] for m in TEACHER_METRICS},
                        "intervals": {m: v["intervals"].get(m) for m in TEACHER_METRICS}},
                "test": {"n_samples": test["n_samples"], **{m: fixed["metrics"][m] for m in TEACHER_METRICS},
                         "intervals": {m: (fixed["intervals"] or {}).get(m) for m in TEACHER_METRICS},
                         "ece": test["calibration"]["ece"]},
                "calibration": test["calibration"], "kept_step": test.get("kept_step"),
                "soft_labels": scoring, "teacher_train_s": train_s}
    return out


def teacher_blocks(result: dict, root: RunLayout) -> list[tuple]:
    """The teachers side by side (validation and test with intervals, ECE, soft-label
    throughput, training time) and their test reliability diagram (study/teachers_reliability.png)."""
    from ckd_ehr.evaluation.report import plot_reliability_curves

    teachers = result.get("teachers")
    if not teachers:
        return []
    header = ["teacher", "seed", "split", *TEACHER_METRICS, "ECE", "soft labels: rows/s", "training"]
    rows, curves = [], {}
    for t, entry in teachers.items():
        for seed, e in entry["seeds"].items():
            sl = e["soft_labels"] or {}
            for split in ("val", "test"):
                m = e[split]
                rows.append([t, seed, f"{split} ({m['n_samples']})",
                             *[f"{fmt(m[k])} {_interval(m['intervals'].get(k))}" for k in TEACHER_METRICS],
                             fmt(m.get("ece")) if split == "test" else "-",
                             f"{fmt(sl.get('rows_per_s'))} ({sl.get('rows')} rows)" if split == "test" else "-",
                             _minutes(e["teacher_train_s"]) if split == "test" else "-"])
            curves.setdefault(t, e["calibration"])   # the first seed's curve per teacher
    storage.write_bytes(storage.join(root.study_dir, "teachers_reliability.png"),
                        plot_reliability_curves(curves, "Teachers: reliability on the test split", highlight="teacher"))
    return [("h2", "Teachers side by side (the MLAPH claim)"), ("table", header, rows),
            ("p", "Validation: each teacher's soft labels on the validation rows the student reads; a generative "
                  "teacher's per-phenotype calibration is fitted on the first validation rows (its macro AUROC "
                  "does not depend on it, its micro metrics do). Test: the seed's evaluate, thresholds at 0.5 for "
                  "ECE. Soft labels: rows the teacher computed per second, Ray Data's start-up included. "
                  "Intervals: 95% patient bootstrap."),
            ("img", "teachers_reliability.png", "teachers' reliability diagram")]


def secondary_metrics(models: list[dict], rows) -> dict:
    """Per row, from each seed's evaluate (`models` of its metrics.json, one per seed): the paper's
    element-wise accuracy and macro-F1 at 0.5 (never the headline: all-negative scores about 0.84
    on that accuracy), macro-F1 at the thresholds tuned on validation, and the checkpoint step
    each seed kept (0: the probe, no update applied). A row a seed's evaluate lacks gets None,
    not a guess."""
    picks = {"accuracy_fixed": ("fixed", "accuracy"), "macro_f1_fixed": ("fixed", "macro_f1"),
             "macro_f1_tuned": ("tuned", "macro_f1")}
    out: dict[str, dict] = {}
    for r in rows:
        entries = [m[r] for m in models if m.get(r)]
        out[r] = {"kept_step": [e.get("kept_step") for e in entries]}
        for key, (mode, metric) in picks.items():
            vals = [e["modes"][mode]["metrics"].get(metric) for e in entries]
            out[r][key] = float(np.mean(vals)) if len(entries) == len(models) and None not in vals else None
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
                 "-" if a is None or d is None else f"{d - a:+.3f}"])
    return ["metric", f"paper: {new} vs BERT", f"this study: {new} - {base}, mean over seeds"], rows


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _interval(iv) -> str:
    return "-" if not iv or iv[0] is None else f"[{iv[0]:.3f}, {iv[1]:.3f}]"


def study_summary_line(result: dict) -> str:
    """Test split, seeds, commit and times of a results.json, in one sentence."""
    per_seed = ", ".join(f"seed {k} {_minutes(v)}" for k, v in result.get("seed_wall_s", {}).items())
    return (f"{result['test_samples']} test pairs of {result['test_patients']} patients, seeds "
            f"{', '.join(map(str, result['seeds']))}, commit {result['commit']}. Wall time of this invocation "
            f"{_minutes(result.get('wall_s'))}; stage time of the base run {_minutes(result.get('base_wall_s'))}, "
            f"per seed: {per_seed or '-'}. Intervals: {result['level']:.0%} patient bootstrap "
            f"({result['resamples_used']} draws), seeds averaged within each draw.")


def row_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each study row's seed-averaged macro AUROC, interval and per-seed values."""
    header = ["row", "role", "macro AUROC", "interval", "per seed", "kept step", "accuracy (0.5)",
              "macro-F1 (tuned)"]
    rows = []
    for r, role in result["roles"].items():   # the study's order
        sec = result.get("secondary", {}).get(r, {})
        rows.append([r, role, f"{result['rows'][r]:.3f}", _interval(result.get("row_intervals", {}).get(r)),
                     ", ".join(f"{v:.3f}" for v in result.get("per_seed_rows", {}).get(r, [])),
                     ", ".join(str(k) for k in sec.get("kept_step", [])) or "-",
                     fmt(sec.get("accuracy_fixed")), fmt(sec.get("macro_f1_tuned"))])
    return header, rows


def reference_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): the floors, ceilings and probe rows of the first seed's evaluate."""
    return ["row", "role", "macro AUROC", "interval", "accuracy (0.5)"], [
        [n, e["role"], fmt(e["macro_auroc"]), _interval(e["interval"]), fmt(e.get("accuracy"))]
        for n, e in result["references"].items()]


def _seed_config(cfg: PipelineConfig, run_dir: str, seed: int, **teacher) -> PipelineConfig:
    """The pipeline config of one of a seed's runs: seeded teacher (with `teacher` changes) and
    student, the study's rows as the student variants, the control texts when a row reads them."""
    return _with(cfg, run_dir, teacher={"seed": seed, **teacher}, student={"seed": seed, "variants": list(cfg.study.rows)},
                 eadf={"control_texts": _control_texts(cfg)})


def _side_teacher_config(cfg: PipelineConfig, run_dir: str, seed: int, source: str) -> PipelineConfig:
    """The pipeline config of a seed's side teacher: the study's, its teacher section changed
    as SIDE_TEACHER_SETTINGS says (a ConfigError names what does not fit, e.g. teacher.num_layers
    set for a generative teacher)."""
    return _seed_config(cfg, run_dir, seed, **SIDE_TEACHER_SETTINGS[source])


def _control_texts(cfg: PipelineConfig) -> bool:
    """eadf.control_texts for the study's runs: on when a row reads a control text."""
    return cfg.eadf.control_texts or any(student_variant(r).text_column in CONTROL_TEXTS for r in cfg.study.rows)


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
    """Base run, then every seed (resumable), then the contrasts; see the module docstring."""
    from ckd_ehr.pipeline import run_pipeline

    started = time.time()
    root, st = RunLayout(cfg.run_dir), cfg.study
    sides = st.side_teachers()
    for source in sides:   # a side teacher's config that cannot be built fails now, not after the base run
        _side_teacher_config(cfg, root.study_side_teacher(st.seeds[0], source), st.seeds[0], source)
    base = RunLayout(root.study_base)
    log.info("study: base run (cohort, split, EADF table) in %s", base.root)
    run_pipeline(_with(cfg, base.root, eadf={"control_texts": _control_texts(cfg)}), resume=True, to_stage="eadf")
    for seed in st.seeds:
        run_dir = root.study_seed(seed)
        _copy_base(base, RunLayout(run_dir))
        for source in sides:
            run_side_teacher(cfg, base, root, seed, source)
        log.info("study: seed %d in %s", seed, run_dir)
        run_pipeline(_seed_config(cfg, run_dir, seed), resume=True, from_stage="teacher")
    return summarise(cfg, wall_s=round(time.time() - started, 1))
