"""Summarising a study from its directory alone: results.json (rows, contrasts over patients and
seeds, references, teachers, code), study.md and forest.png."""
from __future__ import annotations

import logging

import numpy as np

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, build
from ckd_ehr.contracts import (REFERENCE_ROWS, TEACHER_ROWS, StudyFiles, student_variant)
from ckd_ehr.evaluation.report import fmt, fmt_p
from ckd_ehr.study.cohorts import StudyError, study_cohorts

from ckd_ehr.study.collect import TEACHER_METRICS, read_csv_gz
from ckd_ehr.evaluation.report import plot_contrasts, render_markdown
from ckd_ehr.evaluation.evaluate import BASELINE_ROLES, PAPER_CLAIMS
from ckd_ehr.evaluation.probe_rows import PROBE_ROLES
from ckd_ehr.plots import plot_reliability_curves
from ckd_ehr.provenance import short

log = logging.getLogger(__name__)


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
    # not at module level: scipy, loaded only when this runs
    from ckd_ehr.evaluation.contrasts import Cohort, study_contrasts

    saved = storage.read_json(files.config)
    cfg = build(PipelineConfig, saved["config"], source=files.config)
    st = cfg.study
    allow = st.allow_mixed_commits if allow_mixed_commits is None else allow_mixed_commits
    cohorts, records, bases = [], {}, {}
    for cohort in study_cohorts(cfg):
        labels = read_csv_gz(files.labels(cohort.name))
        y = labels[[c for c in labels.columns if c.startswith("y_")]].to_numpy(np.int8)
        probs: dict[str, dict[int, np.ndarray]] = {}
        for seed in cohort.seeds:
            preds = read_csv_gz(files.predictions(cohort.name, seed))
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

    rows = []
    for run, stages in result["code"]["per_seed"].items():
        distinct = {short(c) for c in (stages or {}).values()}
        if len(distinct) <= 1:
            rows.append([run, "all stages", next(iter(distinct), "unknown")])
        else:
            rows += [[run, stage, short(c)] for stage, c in stages.items()]
    return ["run", "stages", "commit, ckd_ehr content hash"], rows
