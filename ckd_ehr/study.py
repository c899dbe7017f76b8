"""`ckd-ehr study`: does EADF help, does distillation help, and by how much, over seeds.

One cohort, one patient split and one EADF table (RUN/base: `prepare` and `eadf` once, with the
control texts when a row reads them); then per seed k (training varies, the test split does not):

1. when a row distils from a plain-text teacher (`distill_plain_ablation`, the study's (c)):
   RUN/seed_k_plain_teacher trains a teacher on `text_plain` and scores the soft labels, which
   are copied to RUN/seed_k/soft_labels/teacher_plain/;
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
from ckd_ehr.contracts import CONTROL_TEXTS, SPLITS, RunLayout, student_variant
from ckd_ehr.evaluation.report import fmt

log = logging.getLogger(__name__)

BASE_PARTS = ("raw", "data", "eadf", "manifest.json")
"""What a seed's run directory takes from the base run: the cohort, the split, the EADF table."""


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
    if row == "teacher":
        df = teacher_predictions_from_soft_labels(layout, "test")
        if df is None:
            raise FileNotFoundError(f"{layout.soft_labels('test')}: no teacher test predictions in {seed_dir}")
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
    """A seed's training cost: its run's stages plus its plain-text teacher's, when it has one."""
    own = _stage_seconds(root.study_seed(seed))
    plain = _stage_seconds(root.study_plain_teacher(seed))
    return None if own is None else round(own + (plain or 0.0), 1)


def summarise(cfg: PipelineConfig, wall_s: float | None = None) -> dict:
    """The contrasts over the finished seeds -> RUN/study/{results.json, forest.png, study.md}."""
    from ckd_ehr.evaluation.contrasts import seed_averaged_contrasts
    from ckd_ehr.evaluation.metrics import macro_label_set, to_matrix
    from ckd_ehr.evaluation.report import contrast_blocks, plot_contrasts, render_markdown

    root, st = RunLayout(cfg.run_dir), cfg.study
    rows = [*st.rows, "teacher"]
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
        "roles": {r: student_variant(r).role if r != "teacher" else "teacher" for r in rows},
    })
    result["secondary"] = secondary_metrics([e.get("models") or {} for e in evaluated], rows)
    storage.write_json(root.study_results, result)
    storage.write_bytes(storage.join(root.study_dir, "forest.png"), plot_contrasts(result))
    table = [("h1", "CKD-EHR study"), ("p", study_summary_line(result)),
             ("h2", "Rows: test macro AUROC, mean over seeds"), ("table", *row_table(result)),
             ("h2", f"Reference and probe rows (seed {st.seeds[0]})"), ("table", *reference_table(result)),
             ("h2", "Contrasts"), *contrast_blocks(result), ("img", "forest.png", "contrasts"),
             ("h2", "The paper's claim beside this study"), ("table", *paper_claim_table(result))]
    storage.write_text(storage.join(root.study_dir, "study.md"), render_markdown(table))
    log.info("study: %s", ", ".join(f"{c['name']} identical predictions" if c.get("identical") else
                                    f"{c['name']} {c['delta']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] "
                                    f"p_holm={c['p_holm']:.3g}" for c in result["contrasts"]))
    return result


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


def run_study(cfg: PipelineConfig) -> dict:
    """Base run, then every seed (resumable), then the contrasts; see the module docstring."""
    from ckd_ehr.pipeline import run_pipeline

    started = time.time()
    root, st = RunLayout(cfg.run_dir), cfg.study
    specs = [student_variant(r) for r in st.rows]
    controls = any(v.text_column in CONTROL_TEXTS for v in specs)
    plain_teacher = any(v.soft_labels == "teacher_plain" for v in specs)
    base = RunLayout(root.study_base)
    log.info("study: base run (cohort, split, EADF table) in %s", base.root)
    run_pipeline(_with(cfg, base.root, eadf={"control_texts": controls or cfg.eadf.control_texts}),
                 resume=True, to_stage="eadf")
    for seed in st.seeds:
        seed_cfg = dict(teacher={"seed": seed}, student={"seed": seed, "variants": list(st.rows)},
                        eadf={"control_texts": controls or cfg.eadf.control_texts})
        run_dir = root.study_seed(seed)
        _copy_base(base, RunLayout(run_dir))
        if plain_teacher:
            plain_dir = root.study_plain_teacher(seed)
            _copy_base(base, RunLayout(plain_dir))
            log.info("study: seed %d, plain-text teacher in %s", seed, plain_dir)
            plain = _with(cfg, plain_dir, **{**seed_cfg, "teacher": {"seed": seed, "text_column": "text_plain"}})
            run_pipeline(plain, resume=True, from_stage="teacher", to_stage="soft_labels")
            for split in SPLITS:   # copied only when changed: a resumed study keeps the seed's student
                data = storage.read_bytes(RunLayout(plain_dir).soft_labels(split))
                dst = RunLayout(run_dir).soft_labels(split, "teacher_plain")
                if not storage.exists(dst) or storage.read_bytes(dst) != data:
                    storage.write_bytes(dst, data)
        log.info("study: seed %d in %s", seed, run_dir)
        run_pipeline(_with(cfg, run_dir, **seed_cfg), resume=True, from_stage="teacher")
    return summarise(cfg, wall_s=round(time.time() - started, 1))
