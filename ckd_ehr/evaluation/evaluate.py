"""Evaluate stage: metrics of every student variant and the teacher on the test split.

Reads RUN/evaluate/predictions/{name}.parquet (contracts.PREDICTIONS) for each model present
(for the teacher, RUN/soft_labels/test.parquet joined with the test samples when it has no
predictions file), scores it at two threshold modes (`fixed` 0.5, the paper's protocol, and
`tuned`, chosen per phenotype on validation by the stage that trained the model), adds 95%
intervals from a bootstrap over patients, and the deltas of every model against the paper's
baseline (a) with PAIRED intervals (the same resampled patients for both models). Writes
RUN/evaluate/metrics.json.

Beside the models, reference rows scored the same way (test split, thresholds tuned on
validation, the same patient bootstrap) under "baselines": `all_negative`, `prevalence`,
`copy_forward`, `logistic_regression` (ckd_ehr.evaluation.baselines) and, on synthetic cohorts,
`latent_oracle` (the generator's exact probabilities, RUN/raw/latent_oracle.parquet) and
`observable_ceiling` (read from the ceiling benchmark's result for the same generator knobs).
They need only the prepare stage: evaluate runs right after it, with no model yet.

Every macro metric averages one label set, fixed from the full test split (phenotypes with at
least `evaluate.min_test_positives` positives); the rest are named. A test split too small to
judge (fewer than `evaluate.min_phenotypes` qualify, or a baseline's macro AUROC interval wider
than `evaluate.max_interval_width`) is refused unless `evaluate.allow_small` (`--allow-small`).
"""
from __future__ import annotations

import logging
import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa

from ckd_ehr import storage
from ckd_ehr.contracts import (PREDICTIONS, STUDENT_VARIANT_TABLE, STUDENT_VARIANTS, TEACHER_ROWS, ContractError, RunLayout, base_variant, check_schema)
from ckd_ehr.metrics import (ALL_METRICS, bootstrap_scores, delta_summary, evaluate_predictions, interval,
                      macro_label_set, paired_bootstrap_delta, to_matrix)
from ckd_ehr.phenotypes import NUM_PHENOTYPES, phenotype_names
from ckd_ehr.evaluation.predictions import (as_predictions, kept_step, learning_curve,
                                            read_predictions, read_thresholds, reference_thresholds,
                                            teacher_predictions_from_soft_labels)
from ckd_ehr.evaluation.probe_rows import PROBE_ROLES  # roles of the probe rows, beside the baselines
from ckd_ehr.data.synth.oracle import oracle_probabilities

log = logging.getLogger(__name__)

MODELS = STUDENT_VARIANTS + tuple(TEACHER_ROWS)
ROLES = {**{v.name: v.role for v in STUDENT_VARIANT_TABLE}, **TEACHER_ROWS}

BASELINE_ROLES = {
    "all_negative": "floor: 0 for every phenotype",
    "prevalence": "floor: training prevalence as the score",
    "copy_forward": "the phenotypes of visit i, copied to visit i+1",
    "logistic_regression": "logistic regression on multi-hot codes, drugs and procedures of visit i",
    "logistic_regression_phenotypes": "the logistic regression also given the phenotypes present at visit i "
                                      "(what the EADF text names)",
    "gradient_boosting": "gradient boosting (HistGradientBoosting per phenotype) on the logistic regression's items, "
                         "settings chosen on validation",
    "latent_oracle": "ceiling (unreachable): the generator's exact probabilities given the latent state",
    "observable_ceiling": "ceiling from what a visit shows (flexible model on independent synthetic patients)",
}
MODES = {
    "fixed": "0.5 for every phenotype (the paper's protocol)",
    "tuned": "per phenotype, maximising F1 on the validation split (never on test)",
}
PAPER_CLAIMS = {
    "accuracy_gain": 0.09,
    "f1_gain": 0.27,
    "speedup": 22.2,
    "note": ("The paper reports +9% accuracy and +27% F1 of CKD-EHR over plain BERT without saying "
             "whether these are points or relative changes; we give both. Its accuracy is "
             "element-wise over N x 25 cells, its F1 macro over the 25 phenotypes, at threshold 0.5."),
}


def identical_groups(frames: dict[str, pd.DataFrame], atol: float = 1e-6) -> list[list[str]]:
    """Groups of models whose test predictions are the same (same samples, probabilities equal
    within `atol`). A delta inside a group measures nothing: e.g. hard labels vs distillation
    when both students kept their step-0 probe."""
    groups: list[list[str]] = []
    for name, df in frames.items():
        for group in groups:
            ref = frames[group[0]]
            if (len(ref) == len(df) and np.array_equal(ref["sample_id"].to_numpy(), df["sample_id"].to_numpy())
                    and np.allclose(to_matrix(ref["probs"]), to_matrix(df["probs"]), rtol=0, atol=atol)):
                group.append(name)
                break
        else:
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def score_model(df: pd.DataFrame, thresholds: dict[str, list[float]], resamples: int, seed: int,
                label_set: np.ndarray | None = None) -> tuple[dict, dict[str, dict[str, np.ndarray]] | None]:
    """Point metrics and intervals at every threshold mode; also the bootstrap distributions
    (same seed and sample order for every model, hence paired across models)."""
    y, p, subjects = to_matrix(df["labels"], np.int8), to_matrix(df["probs"]), df["subject_id"].to_numpy()
    dists = bootstrap_scores(y, p, subjects, thresholds, resamples, seed, label_set) if resamples > 0 else None
    modes = {}
    for mode, t in thresholds.items():
        result = evaluate_predictions(y, p, subjects, t, bootstrap=0, label_set=label_set)
        if dists is not None:
            result["intervals"] = {m: interval(dists[mode][m]) for m in ALL_METRICS}
        modes[mode] = {k: result[k] for k in ("metrics", "intervals", "thresholds", "per_phenotype")}
    entry = {"n_samples": result["n_samples"], "n_patients": result["n_patients"],
             "auroc_skipped": result["auroc_skipped"], "calibration": result["calibration"], "modes": modes}
    return entry, dists


def model_delta(base: pd.DataFrame, other: pd.DataFrame, base_entry: dict, other_entry: dict,
                base_dists, other_dists, base_t: dict, other_t: dict, resamples: int, seed: int,
                label_set: np.ndarray | None = None) -> dict:
    """Delta of `other` against `base` per threshold mode, paired over the same patients."""
    if np.array_equal(base["sample_id"].to_numpy(), other["sample_id"].to_numpy()):
        if not np.array_equal(to_matrix(base["labels"], np.int8), to_matrix(other["labels"], np.int8)):
            raise ContractError("the same test samples carry different labels in two prediction files")
        out = {"paired_on": "all samples", "n_samples": len(base),
               "identical": bool(np.allclose(to_matrix(base["probs"]), to_matrix(other["probs"]), rtol=0, atol=1e-6))}
        for mode in MODES:
            out[mode] = delta_summary(base_entry["modes"][mode]["metrics"], other_entry["modes"][mode]["metrics"],
                                      base_dists and base_dists[mode], other_dists and other_dists[mode])
        return out
    # Different sample sets (e.g. a teacher scored on a subset): compare on the shared samples.
    common = base.merge(other[["sample_id", "labels", "probs"]], on="sample_id", suffixes=("", "_other"))
    out = {"paired_on": "shared samples only", "n_samples": len(common)}
    if not len(common):
        return {**out, "note": "no shared samples"}
    y = to_matrix(common["labels"], np.int8)
    if not np.array_equal(y, to_matrix(common["labels_other"], np.int8)):
        raise ContractError("the same test samples carry different labels in two prediction files")
    for mode in MODES:
        out[mode] = paired_bootstrap_delta(y, to_matrix(common["probs"]), base_t[mode],
                                           to_matrix(common["probs_other"]), other_t[mode],
                                           common["subject_id"].to_numpy(), resamples, seed, label_set)
    return out


FLOORS = ("copy_forward", "logistic_regression", "logistic_regression_phenotypes", "gradient_boosting")
"""The reference rows a model must beat to be worth shipping (ceilings and probes are not floors)."""


def summarise_findings(models: dict, baselines: dict, frames: dict, references: dict, dists: dict, base_dists: dict,
                       thresholds: dict, resamples: int, seed: int, label_set) -> dict:
    """What the evaluation found, for the report's first lines and the run's last: the best model
    and the best floor on test macro AUROC, the paired difference between them with its interval
    (the same resampled patients for both), which models kept their probe, and the sentence that
    says it."""
    def auroc(entry):
        return entry["modes"]["fixed"]["metrics"]["macro_auroc"]

    floors = {n: auroc(baselines[n]) for n in FLOORS if n in baselines}
    ranked = {n: auroc(e) for n, e in models.items() if np.isfinite(auroc(e))}
    out: dict = {"models": dict(sorted(ranked.items(), key=lambda kv: -kv[1])), "floors": floors,
                 "kept_probe": sorted(n for n, e in models.items() if e.get("kept_step") == 0)}
    if not ranked or not floors:
        out["text"] = ("No model predictions to compare with the floors yet." if not ranked else
                       "No floor rows (evaluate.baselines: false): nothing to judge the models against.")
        return out
    best, floor = max(ranked, key=ranked.get), max(floors, key=floors.get)
    delta = model_delta(references[floor][0], frames[best], baselines[floor], models[best], base_dists.get(floor),
                        dists.get(best), references[floor][1], thresholds[best], resamples, seed, label_set)
    d = delta.get("fixed", {}).get("macro_auroc", {})
    iv = d.get("interval")
    out.update(best_model=best, best_floor=floor, delta=d.get("delta"), interval=iv)
    verdict = ("above it: the paired interval excludes 0" if iv and iv[0] > 0 else
               "below it: the paired interval excludes 0" if iv and iv[1] < 0 else
               "not distinguishable from it (the paired interval holds 0)" if iv else "(no interval: bootstrap 0)")
    above = [n for n, v in ranked.items() if v > floors[floor]]
    text = (f"Best model: {best}, test macro AUROC {ranked[best]:.3f}. Best floor: {floor} {floors[floor]:.3f}. "
            f"{best} - {floor} = {d.get('delta', float('nan')):+.3f}"
            + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "") + f": {verdict}. "
            + (f"Models above the best floor's point estimate: {', '.join(above)}. " if above else
               "No model is above the best floor. ")
            + (f"Kept their probe (no fine-tuning in their predictions): {', '.join(out['kept_probe'])}."
               if out["kept_probe"] else "Every model moved past its probe."))
    out["text"] = text
    return out


class TooSmallToJudge(ValueError):
    """The test split cannot tell models apart; the message gives the counts and widths."""


def _read_split(layout: RunLayout, split: str, columns: list[str]) -> pd.DataFrame | None:
    path = next((p for p in (layout.samples(split), layout.augmented(split)) if storage.exists(p)), None)
    if path is None:
        return None
    table = storage.read_parquet(path)
    if any(c not in table.column_names for c in columns):
        return None
    df = table.select(columns).to_pandas()
    return df.sort_values("sample_id", kind="stable").reset_index(drop=True)


def _predictions_table(df: pd.DataFrame, where: str) -> pa.Table:
    return check_schema(pa.Table.from_pandas(df[["sample_id", "subject_id", "labels", "probs"]], preserve_index=False),
                        PREDICTIONS, where)


def _reference_stamp(cfg, layout: RunLayout) -> dict:
    """What the reference rows depend on: the samples and (synthetic) ground truth by content,
    the fitting seed and the model grids."""

    # not at module level: scipy, loaded only when this runs
    from ckd_ehr.evaluation.baselines import C_GRID, GB_MIN_COUNT, GB_SETTINGS

    paths = {**{f"samples/{s}": layout.samples(s) for s in ("train", "val", "test")},
             "ground_truth": layout.path("raw", "ground_truth.json")}
    files = {k: hashlib.sha256(storage.read_bytes(p)).hexdigest() if storage.exists(p) else None
             for k, p in paths.items()}
    return {"files": files, "seed": cfg.evaluate.seed, "c_grid": list(C_GRID), "gb": [GB_MIN_COUNT, *GB_SETTINGS]}


def cached_reference_rows(cfg, layout: RunLayout) -> tuple[dict, list[str]]:
    """reference_rows, kept in evaluate.reference_dir (default RUN/evaluate/references): read back
    when the stamp (_reference_stamp) matches, computed and written otherwise."""
    directory = cfg.evaluate.reference_dir or layout.path("evaluate", "references")
    meta_path = storage.join(directory, "references.json")
    stamp = _reference_stamp(cfg, layout)
    if storage.exists(meta_path) and (meta := storage.read_json(meta_path)).get("stamp") == stamp:
        log.info("reference rows read from %s (same samples and settings)", directory)
        return {name: (read_predictions(storage.join(directory, f"{name}.parquet")), e["thresholds"], e["details"])
                for name, e in meta["rows"].items()}, meta["notes"]
    rows, notes = reference_rows(cfg, layout)
    for name, (df, _, _) in rows.items():
        storage.write_parquet(_predictions_table(df, name), storage.join(directory, f"{name}.parquet"))
    storage.write_json(meta_path, {"stamp": stamp, "notes": notes,
                                   "rows": {n: {"thresholds": t, "details": d} for n, (_, t, d) in rows.items()}})
    return rows, notes


def reference_rows(cfg, layout: RunLayout) -> tuple[dict, list[str]]:
    """{name: (test PREDICTIONS frame, thresholds, details)} of every reference row that can be
    computed from the run's samples (and, synthetic, RUN/raw), and notes on what could not."""
    # not at module level: scipy, loaded only when this runs
    from ckd_ehr.evaluation.baselines import FEATURE_COLUMNS, baseline_probabilities

    notes = []
    cols = ["sample_id", "subject_id", "hadm_id", "next_hadm_id", *FEATURE_COLUMNS, "phenotypes_current", "labels"]
    splits = {s: _read_split(layout, s, cols) for s in ("train", "val", "test")}
    missing = [s for s, df in splits.items() if df is None or not len(df)]
    if missing:
        return {}, [f"no reference rows: no samples for split(s) {', '.join(missing)} under {layout.path('data')}"]
    arrays = {s: {**{c: df[c].tolist() for c in FEATURE_COLUMNS},
                  "phenotypes_current": to_matrix(df["phenotypes_current"], np.int8),
                  "labels": to_matrix(df["labels"], np.int8)} for s, df in splits.items()}
    y_val = arrays["val"]["labels"]
    out = {}
    for name, (probs, details) in baseline_probabilities(arrays["train"], arrays["val"], arrays["test"],
                                                         seed=cfg.evaluate.seed).items():
        thresholds, source = reference_thresholds(y_val, probs["val"])
        out[name] = (as_predictions(splits["test"], probs["test"]), thresholds,
                     {**details, "threshold_source": source})
    # not at module level: scipy, loaded only when this runs
    from ckd_ehr.data.synth.ceiling import MODEL, observable_ceiling_probabilities

    oracle = {s: oracle_probabilities(layout, splits[s]) for s in ("val", "test")}
    if oracle["test"] is not None and oracle["val"] is not None:
        (test_df, p_test), (val_df, p_val) = oracle["test"], oracle["val"]
        thresholds, source = reference_thresholds(to_matrix(val_df["labels"], np.int8), p_val)
        out["latent_oracle"] = (as_predictions(test_df, p_test), thresholds, {
            "score": "the generator's exact probability of each next-visit phenotype given visit i's latent "
                     "state (true phenotypes, planted drugs given, propensities, flares): not reachable "
                     "from what a visit shows", "threshold_source": source,
            "n_test_samples_matched": len(test_df)})
    (p_val, note), (p_test, _) = (observable_ceiling_probabilities(layout, splits[s]) for s in ("val", "test"))
    if note:
        notes.append(note)
    if p_val is not None:
        thresholds, source = reference_thresholds(y_val, p_val)
        out["observable_ceiling"] = (as_predictions(splits["test"], p_test), thresholds, {
            "score": f"{MODEL}, fitted on independent synthetic patients with this cohort's "
                     "generator knobs (ckd_ehr/resources/ceilings), applied to this run's pairs",
            "threshold_source": source})
    return out, notes


def judge_size(label_set: np.ndarray, counts: np.ndarray, baselines: dict, cfg) -> list[str]:
    """Reasons the test split is too small to judge (empty: fine)."""
    ec = cfg.evaluate
    reasons = []
    n = int(label_set.sum())
    if n < ec.min_phenotypes:
        reasons.append(f"only {n} of {NUM_PHENOTYPES} phenotypes have at least {ec.min_test_positives} positives "
                       f"in the test split (need {ec.min_phenotypes}; positives per phenotype: "
                       f"{', '.join(str(int(c)) for c in counts)})")
    for name, entry in baselines.items():
        iv = entry["modes"]["fixed"]["intervals"].get("macro_auroc") if entry["modes"]["fixed"]["intervals"] else None
        if iv and iv[1] - iv[0] > ec.max_interval_width:
            reasons.append(f"the macro AUROC interval of baseline {name} is {iv[1] - iv[0]:.3f} wide "
                           f"[{iv[0]:.3f}, {iv[1]:.3f}] (at most {ec.max_interval_width} allowed; "
                           f"{entry['n_samples']} test samples of {entry['n_patients']} patients)")
    return reasons


def model_frames(cfg, layout: RunLayout) -> tuple[dict, dict, dict]:
    """({row: test predictions}, {row: their file}, {row: why skipped}) of the configured student
    variants and the teacher rows, plus each student as served when serve.precision is not fp32.
    Only configured rows are read: a file an earlier run left for another variant is not scored."""
    frames, sources, skipped = {}, {}, {}
    configured = {*cfg.student.variants, "teacher"}
    for name in MODELS:
        if name not in configured and name not in TEACHER_ROWS:
            continue
        path = layout.predictions(name)
        if storage.exists(path):
            frames[name], sources[name] = read_predictions(path), path
        elif name in TEACHER_ROWS and (soft := teacher_predictions_from_soft_labels(layout, "test", name)) is not None:
            # Nobody has to write teacher.parquet: the soft labels of the test split are the
            # teacher's test predictions (a side teacher's only when the study copied them).
            frames[name], sources[name] = soft, layout.soft_labels("test", name)
        elif name in configured:  # a side teacher nobody asked for is not "skipped"
            skipped[name] = f"no predictions at {path}" + (
                f" and no {layout.soft_labels('test')}" if name == "teacher" else "")
    if cfg.serve.precision != "fp32":  # each student as served (int8, bf16): its own row
        # not at module level: imported only on this branch
        from ckd_ehr.student.precision import write_precision_predictions
        for name in write_precision_predictions(cfg, cfg.serve.precision):
            frames[name], sources[name] = read_predictions(layout.predictions(name)), layout.predictions(name)
    return frames, sources, skipped


def reference_and_probe_rows(cfg, layout: RunLayout) -> tuple[dict, list[str]]:
    """({row: (test frame, thresholds, details)} of the floors, ceilings and probes, notes); each
    row's test predictions are also written beside the models' (what a study collects per seed)."""
    references, notes = {}, []
    if cfg.evaluate.baselines:
        references, ref_notes = cached_reference_rows(cfg, layout)
        notes += ref_notes
    if cfg.evaluate.probes:
        # not at module level: imported only on this branch
        from ckd_ehr.evaluation.probe_rows import probe_rows

        probes, probe_notes = probe_rows(cfg, layout)
        references.update(probes)
        notes += probe_notes
    for name, (df, _, _) in references.items():
        storage.write_parquet(_predictions_table(df, name), layout.predictions(name))
    return references, notes


def macro_labels(cfg, layout: RunLayout, frames: dict, sources: dict) -> tuple[np.ndarray, str, np.ndarray]:
    """(test labels, where from, the macro label set): one label set for every macro metric,
    from the full test split (the largest prediction file when the split is not there)."""
    test = _read_split(layout, "test", ["sample_id", "labels"])
    if test is not None and len(test):
        y_test, source = to_matrix(test["labels"], np.int8), layout.samples("test")
    else:
        largest = max(frames, key=lambda k: len(frames[k]))
        y_test, source = to_matrix(frames[largest]["labels"], np.int8), sources[largest]
    return y_test, source, macro_label_set(y_test, cfg.evaluate.min_test_positives)


def score_references(references: dict, resamples: int, seed: int, label_set: np.ndarray) -> tuple[dict, dict]:
    """({row: entry}, {row: bootstrap draws}) of the reference and probe rows."""
    baselines, dists = {}, {}
    for name, (df, thr, details) in references.items():
        entry, dists[name] = score_model(df, thr, resamples, seed, label_set)
        baselines[name] = {"role": BASELINE_ROLES.get(name) or PROBE_ROLES[name], "details": details, **entry}
        m = entry["modes"]["fixed"]["metrics"]
        iv = (entry["modes"]["fixed"]["intervals"] or {}).get("macro_auroc")
        log.info("baseline %s: macro AUROC %.3f%s (n=%d)", name, m["macro_auroc"],
                 f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else "", entry["n_samples"])
    return baselines, dists


def score_models(layout: RunLayout, frames: dict, sources: dict, resamples: int, seed: int,
                 label_set: np.ndarray) -> tuple[dict, dict, dict]:
    """({row: entry}, {row: bootstrap draws}, {row: thresholds}) of the models, each with its role,
    kept step and learning curve."""
    models, dists, thresholds = {}, {}, {}
    for name, df in frames.items():
        thresholds[name], source = read_thresholds(layout, name)
        entry, dists[name] = score_model(df, thresholds[name], resamples, seed, label_set)
        role = ROLES.get(name) or f"{ROLES[base_variant(name)]}, served at {name.rsplit('_', 1)[1]} (serve.precision)"
        models[name] = {"role": role, "predictions": sources[name], "kept_step": kept_step(layout, name),
                        "curve": learning_curve(layout, name), "threshold_source": source, **entry}
        m = entry["modes"]["fixed"]["metrics"]
        log.info("%s: accuracy %.4f, macro-F1 %.4f, macro AUROC %.4f (n=%d, %d patients)", name,
                 m["accuracy"], m["macro_f1"], m["macro_auroc"], entry["n_samples"], entry["n_patients"])
    return models, dists, thresholds


def run_evaluate(cfg) -> dict:
    """`ckd-ehr evaluate`: every model, floor, ceiling and probe row on the test split, with
    patient-bootstrap intervals and paired deltas -> RUN/evaluate/metrics.json."""
    layout = RunLayout(cfg.run_dir)
    resamples, seed, baseline = cfg.evaluate.bootstrap, cfg.evaluate.seed, cfg.evaluate.baseline
    frames, sources, skipped = model_frames(cfg, layout)
    references, notes = reference_and_probe_rows(cfg, layout)
    if not frames and not references:
        raise FileNotFoundError(f"{layout.predictions_dir}: no prediction files for any of {', '.join(MODELS)} "
                                "(have the student and teacher stages written their test predictions?) "
                                f"and no samples under {layout.path('data', 'samples')} for the reference rows "
                                "(run `ckd-ehr prepare` first)")
    y_test, set_source, label_set = macro_labels(cfg, layout, frames, sources)
    counts, names = (y_test > 0).sum(axis=0), phenotype_names()
    baselines, base_dists = score_references(references, resamples, seed, label_set)
    informative = ("copy_forward", "logistic_regression")
    reasons = judge_size(label_set, counts, {k: v for k, v in baselines.items() if k in informative}, cfg)
    if reasons and not cfg.evaluate.allow_small:
        raise TooSmallToJudge("test split too small to judge: " + "; ".join(reasons)
                              + ". Pass --allow-small (evaluate.allow_small: true) to evaluate anyway; "
                              "the report will carry a banner.")
    models, dists, thresholds = score_models(layout, frames, sources, resamples, seed, label_set)

    at_probe = [n for n, e in models.items() if e["kept_step"] == 0]
    if at_probe:
        notes.append(f"kept step 0 (checkpoint selection on validation kept the probe; no fine-tuning or "
                     f"distillation update is in these rows): {', '.join(at_probe)}")
    same = identical_groups(frames)
    for group in same:
        notes.append(f"identical test predictions: {' = '.join(group)}; a delta between them measures nothing")
    deltas = {}
    if baseline in frames:
        deltas = {name: model_delta(frames[baseline], frames[name], models[baseline], models[name], dists[baseline],
                                    dists[name], thresholds[baseline], thresholds[name], resamples, seed, label_set)
                  for name in frames if name != baseline}
    elif frames:
        notes.append(f"baseline '{baseline}' has no predictions: no deltas computed")
    else:
        notes.append("no model predictions yet: the reference rows alone")
    if resamples == 0:
        notes.append("evaluate.bootstrap = 0: no intervals")
    summary = summarise_findings(models, baselines, frames, references, dists, base_dists, thresholds, resamples,
                                 seed, label_set)
    result = {
        "split": "test", "phenotypes": names, "metrics": list(ALL_METRICS),
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient", "level": 0.95},
        "threshold_modes": MODES,
        "macro_label_set": {
            "rule": f"phenotypes with at least {cfg.evaluate.min_test_positives} positives in the full test split",
            "from": set_source,
            "included": [n for n, keep in zip(names, label_set) if keep],
            "left_out": {n: int(c) for n, c, keep in zip(names, counts, label_set) if not keep},
            "note": "every macro metric (F1, AUROC, AUPRC) of every row averages exactly this set, in every "
                    "bootstrap draw; a draw where a member has a single class is left out of the macro "
                    "ranking intervals",
        },
        "too_small": {"allowed": bool(reasons), "reasons": reasons} if reasons else None,
        "summary": summary, "baseline": baseline, "baselines": baselines, "models": models, "deltas": deltas,
        "identical_predictions": same, "paper_claims": PAPER_CLAIMS, "skipped": skipped, "notes": notes,
    }
    if cfg.eadf.text_fit_report and storage.exists(layout.efficacy_table):
        # what of each text the models saw (ckd_ehr.eadf.text_fit): the trained models' budgets
        from ckd_ehr.eadf.text_fit import text_fit_report

        fit = text_fit_report(cfg, layout)
        result["text_fit"] = {s: {m: fit["splits"][s][m]["share_whole"] for m in ("teacher", "student")}
                              for s in fit["splits"]}
    storage.write_json(layout.metrics, _json_safe(result))
    log.info("wrote %s (%d models, %d reference rows, %d skipped)", layout.metrics, len(models),
             len(baselines), len(skipped))
    return result


def _json_safe(obj):
    """NaN and infinities become null: JSON has no NaN, and other readers choke on it."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
