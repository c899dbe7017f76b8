"""`ckd-ehr tune` and `ckd-ehr tune-report`: Ray Tune over a space in tune_spaces/.

Each trial trains through the same code as the pipeline: it builds the stage's TrainTask with
the function the stage itself calls (ckd_ehr.teacher.train.teacher_task /
ckd_ehr.student.train.build_student_task) and runs
ckd_ehr.training.fit, a Ray Train TorchTrainer, inside a Tune function trainable; metrics
reach Tune through Ray Train's TuneReportCallback (the Train V2 + Tune interop). The trial
itself reserves no CPU: the Train workers inside it hold the trial's resources
(tune.cpus_per_trial / gpus_per_trial), and concurrency is sized to the cluster.

A student search reads the soft labels already in the run directory (run the pipeline
`--to soft_labels` first): no teacher is retrained per student trial. Trials write only
inside the experiment directory; the run's artifacts are never touched.

The experiment directory holds `search.json` (base config, space, metric) so that
`ckd-ehr tune-report` can write the best configuration as a config YAML that
`ckd-ehr pipeline` accepts unchanged.
"""
from __future__ import annotations

import glob
import logging
import math
import os
from pathlib import Path
import io

import numpy as np

from ckd_ehr import storage
from ckd_ehr.config import PipelineConfig, config_hash, dump_yaml
from ckd_ehr.contracts import RunLayout, student_variant
from ckd_ehr.tune.space import Space, apply_trial, load_space, to_tune
from ckd_ehr.ray_utils import check_shared_run_dir, init_ray
from ckd_ehr.metrics import macro_auroc, all_scores, bootstrap_scores, delta_summary

log = logging.getLogger(__name__)
SEARCH_FILE = "search.json"


# The trial process itself (a function trainable that only waits on its TorchTrainer) must
# request some resource; it takes this share of a CPU out of tune.cpus_per_trial, and the
# Train worker gets the rest. Without the subtraction two 1-CPU trials need 2.02 CPUs, and on a
# 2-CPU machine the second trial's worker group waits, times out and retries until the first ends.
TRIAL_PROCESS_CPU = 0.01


def _worker_cpus(cpus_per_trial: float) -> float:
    return round(cpus_per_trial - TRIAL_PROCESS_CPU, 4) if cpus_per_trial > 2 * TRIAL_PROCESS_CPU else cpus_per_trial


def _trial_config(base: dict, params: dict, target: str, metric: str) -> PipelineConfig:
    """The trial's PipelineConfig: the sampled params, and one Train worker with the
    trial's resources (a trial is one small training run). Reports come once per epoch
    (no step checkpoints), so Tune's training_iteration is the epoch ASHA counts in, and
    Train keeps the checkpoint that is best on the searched metric."""
    cfg = apply_trial(base, params)
    t = cfg.tune
    section = getattr(cfg, target).model_copy(update={
        "num_workers": 1, "cpus_per_worker": _worker_cpus(t.cpus_per_trial), "use_gpu": t.gpus_per_trial > 0,
        "gpus_per_worker": t.gpus_per_trial or 1.0,
        "checkpoint_every_steps": None, "best_metric": metric})
    return cfg.model_copy(update={target: section})


def _train_trial(params: dict, base: dict, target: str, metric: str, train_root: str, inputs_key: str,
                 variant: str = "ckd_ehr") -> None:
    """One Tune trial: train the target with the sampled params; Train reports reach Tune."""
    # not at module level: ray, loaded only when this runs
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ckd_ehr.training import fit

    cfg = _trial_config(base, params, target, metric)
    layout = RunLayout(cfg.run_dir)
    storage_path = storage.join(train_root, tune.get_context().get_trial_id())
    if target == "teacher":
        # not at module level: imported only on this branch
        from ckd_ehr.teacher.train import teacher_task

        # trials share the frozen backbone's probe features (LoRA rank does not change them) and
        # the frozen layers' states (train_top_layers; keyed on what decides them)
        section, task = cfg.teacher, teacher_task(
            cfg.teacher, layout.augmented("train"), layout.augmented("val"),
            feature_cache=layout.teacher_probe_features,
            frozen_cache=cfg.teacher.frozen_cache_dir or layout.teacher_frozen_cache)
    else:
        # not at module level: imported only on this branch
        from ckd_ehr.student.train import build_student_task

        section, task = cfg.student, build_student_task(cfg, variant).task
    # the run name carries the inputs' fingerprints: a trial restored after they changed trains
    # afresh instead of resuming a checkpoint of other data (run_tune refuses that resume anyway)
    fit(section, task, storage_path=storage_path, name=f"train-{inputs_key}", callbacks=[TuneReportCallback()])


def _check_inputs(space: Space, layout: RunLayout) -> dict[str, str]:
    """{input file: fingerprint} of what the search's trials read; FileNotFoundError naming
    what is missing."""
    needed = [layout.augmented("train"), layout.augmented("val")]
    if space.target == "student":
        needed += [layout.efficacy_table]
        if student_variant(space.variant).distills:
            needed.append(layout.soft_labels("train", student_variant(space.variant).soft_labels))
    units = set(space.params) & {"student.distill.label_attention", "student.distill.relation"}
    if units:
        needed.append(layout.unit_targets("train"))
    if units and not storage.exists(layout.unit_targets("train")):
        raise FileNotFoundError(
            f"{space.source}: the unit terms need the teacher's unit targets ({layout.unit_targets('train')}): "
            "run `ckd-ehr pipeline --to soft_labels` with soft_labels.unit_targets: true (and, for the label "
            "term, teacher.pooling: label_attention) first")
    missing = [p for p in needed if not storage.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{space.source}: a {space.target} search needs {', '.join(missing)}; run "
            f"`ckd-ehr pipeline --to {'soft_labels' if space.target == 'student' else 'eadf'}` first")
    return {p: storage.fingerprint(p) for p in needed}


def _check_same_inputs(exp_dir: str, searched: dict | None, now: dict[str, str]) -> None:
    """A resumed search compares its trials on the data it started with: refused when an input
    changed since (or the search predates the record)."""
    if searched is None:
        raise ValueError(f"{exp_dir}: the search recorded no input fingerprints (it predates them), so a resume "
                         "cannot tell whether its trials read the same data; start a new search (--experiment-dir)")
    changed = sorted(p for p in set(searched) | set(now) if searched.get(p) != now.get(p))
    if changed:
        raise ValueError(f"{exp_dir}: {', '.join(changed)} changed since this search started, so resumed trials "
                         "would be compared with trials of other data; start a new search (--experiment-dir)")


def _max_concurrent(cfg: PipelineConfig) -> int:
    # not at module level: ray, loaded only when this runs
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    by_cpu = int(cpus // cfg.tune.cpus_per_trial)
    if cfg.tune.gpus_per_trial > 0:
        by_gpu = int(ray.cluster_resources().get("GPU", 0) // cfg.tune.gpus_per_trial)
        by_cpu = min(by_cpu, by_gpu)
    log.info("tune: %d concurrent trial(s), sized to the %g CPUs the cluster has now; on a cluster that "
             "scales from zero set tune.max_concurrent_trials", max(1, by_cpu), cpus)
    return max(1, by_cpu)


def run_tune(cfg: PipelineConfig, space_file: str, num_samples: int | None = None,
             experiment_dir: str | None = None, resume: bool = False) -> dict:
    """Run (or, with resume, restore and finish) a search; returns the best trial's summary."""
    # not at module level: ray, loaded only when this runs
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


    space = load_space(space_file)
    layout = RunLayout(cfg.run_dir)
    inputs = _check_inputs(space, layout)
    exp_dir = experiment_dir or layout.path("tune", Path(space_file).stem)
    if not storage.is_uri(exp_dir):
        exp_dir = os.path.abspath(exp_dir)
    metric = cfg.tune.metric or space.metric or "val_macro_auroc"
    if resume and storage.exists(storage.join(exp_dir, SEARCH_FILE)):
        searched = storage.read_json(storage.join(exp_dir, SEARCH_FILE))
        metric = searched["metric"]  # as searched
        _check_same_inputs(exp_dir, searched.get("inputs"), inputs)
    parent, name = exp_dir.rstrip("/").rsplit("/", 1)
    init_ray(cfg.ray)
    check_shared_run_dir(cfg.run_dir)   # what the trials read
    if parent != cfg.run_dir:
        check_shared_run_dir(parent, what="the experiment directory's parent")   # where they write

    base = cfg.model_dump(mode="json")
    trainable = tune.with_parameters(_train_trial, base=base, target=space.target, metric=metric, variant=space.variant,
                                     train_root=storage.join(exp_dir, "train"), inputs_key=config_hash(inputs))
    # The trial process only waits on its TorchTrainer; the Train worker holds the rest of the
    # trial's CPUs (Tune needs a non-empty request, hence a token share; see TRIAL_PROCESS_CPU).
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_PROCESS_CPU})

    if resume:
        if not tune.Tuner.can_restore(exp_dir):
            raise FileNotFoundError(f"{exp_dir}: no Tune experiment to resume")
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        if storage.exists(storage.join(exp_dir, SEARCH_FILE)):
            raise FileExistsError(f"{exp_dir}: an experiment is already there; --resume it or "
                                  f"pass another --experiment-dir")
        section = getattr(cfg, space.target)
        # One report per epoch, and under head_init probe one more before training: the probe,
        # reported as step 0. Counted as an epoch, it ended every 1-epoch trial (the demo's
        # recipe) before its first optimiser step; so the probe's report is iteration 1, an
        # epoch's report iteration epoch + 1, and the grace period counts trained epochs.
        probe = 1 if section.head_init == "probe" else 0
        max_t = section.epochs + probe
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                   grace_period=min(cfg.tune.grace_period + probe, max_t), reduction_factor=2)
                     if cfg.tune.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(space),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                        num_samples=num_samples or cfg.tune.num_samples,
                                        max_concurrent_trials=_max_concurrent(cfg)),
            run_config=tune.RunConfig(name=name, storage_path=parent,
                                      failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)),
        )
        storage.write_json(storage.join(exp_dir, SEARCH_FILE), {
            "base_config": base, "space_file": str(space_file), "target": space.target,
            "metric": metric, "params": space.params, "max_t": max_t, "inputs": inputs})
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode="max", filter_nan_and_inf=True)
    summary = {"experiment_dir": exp_dir, "trials": len(results), "errors": len(results.errors),
               "best_params": best.config, "best_metric": (best.metrics or {}).get(metric)}
    log.info("tune: %d trials, best %s=%s with %s", len(results), metric, summary["best_metric"], best.config)
    tune_report(exp_dir)
    return summary


def _trial_rows(exp_dir: str) -> tuple[list[dict], dict]:
    """One row per trial: params, best and last metric, iterations, status."""
    # not at module level: ray, loaded only when this runs
    from ray.tune import ExperimentAnalysis

    search = storage.read_json(storage.join(exp_dir, SEARCH_FILE))
    metric = search["metric"]
    analysis = ExperimentAnalysis(exp_dir, default_metric=metric, default_mode="max")
    rows = []
    for trial in analysis.trials:
        df = analysis.trial_dataframes.get(trial.trial_id)
        history = df[metric].dropna().tolist() if df is not None and metric in df else []
        iterations = int(df["training_iteration"].max()) if df is not None and len(df) else 0
        row = {"trial_id": trial.trial_id, "status": trial.status,
               "iterations": iterations,
               "stopped_early": trial.status == "TERMINATED" and iterations < search["max_t"],
               f"best_{metric}": max(history) if history else math.nan,
               f"last_{metric}": history[-1] if history else math.nan,
               # (trial.error_file needs a running Ray; the report must work without one)
               "error": trial.status == "ERROR", "failures": int(getattr(trial, "num_failures", 0) or 0)}
        row.update({k: v for k, v in trial.config.items()})
        rows.append(row)
    return rows, search


NOISE_FLOOR_RESAMPLES = 300
"""Bootstrap draws of the validation rows for the noise floor (a 95% interval per trial)."""


def _trial_validation(exp_dir: str, trial_id: str) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(validation macro AUROC, labels, probabilities) of a trial's validated checkpoint with the
    best validation macro AUROC (checkpoints keep `val_logits.npy` / `val_labels.npy`,
    ckd_ehr.training.loop), or None."""

    best = None
    for d in sorted(glob.glob(os.path.join(exp_dir, "train", trial_id, "**", "val_logits.npy"), recursive=True)):
        labels_file = os.path.join(os.path.dirname(d), "val_labels.npy")
        if not os.path.exists(labels_file):
            continue
        y = np.load(labels_file).astype(np.int8)
        p = 1.0 / (1.0 + np.exp(-np.load(d).astype(np.float64)))
        score = macro_auroc(y, p)
        if best is None or score > best[0]:
            best = (score, y, p)
    return best


def noise_floor(exp_dir: str, trial_ids: list[str], resamples: int = NOISE_FLOOR_RESAMPLES,
                seed: int = 0) -> tuple[dict[str, dict], str]:
    """Per trial, its validation macro AUROC minus the best trial's, with a paired 95% bootstrap
    interval (the same resampled validation rows for both): a trial whose interval holds 0
    cannot be told from the best on this validation set, so "what wins" is only what clears
    it. Returns ({trial_id: {delta, low, high}}, note); {} and the reason when the checkpoints
    hold no validation scores, the trials validated different rows, or the experiment is not
    on a local disk. Rows are resampled, not patients: checkpoints keep no patient ids (the
    demo's validation split has about 1.1 pairs per patient)."""

    if storage.is_uri(exp_dir):
        return {}, "noise floor: computed for a local experiment directory only"
    scored = {t: v for t in trial_ids if (v := _trial_validation(exp_dir, t)) is not None}
    if len(scored) < 2:
        return {}, "noise floor: fewer than two trials have validation scores in their checkpoints"
    labels = next(iter(scored.values()))[1]
    if any(v[1].shape != labels.shape or not np.array_equal(v[1], labels) for v in scored.values()):
        return {}, "noise floor: the trials validated different rows (a searched seed or sample count?)"
    best_id = max(scored, key=lambda t: scored[t][0])
    rows = np.arange(len(labels))
    half = [0.5] * labels.shape[1]

    def point_and_draws(p):   # the same seed: the same resampled rows for every trial (paired)
        return all_scores(labels, p, half), bootstrap_scores(labels, p, rows, {"m": half}, resamples, seed)["m"]

    best = point_and_draws(scored[best_id][2])
    out = {}
    for t, (_, _, p) in scored.items():
        point, draws = best if t == best_id else point_and_draws(p)
        d = delta_summary(best[0], point, best[1], draws)["macro_auroc"]
        out[t] = {"delta": d["delta"], "low": d["interval"][0], "high": d["interval"][1]}
    clear = sum(1 for t, v in out.items() if t != best_id and v["high"] < 0)
    return out, (f"noise floor: {len(scored) - 1 - clear} of {len(scored) - 1} other trials cannot be told from "
                 f"the best ({best_id}) on {len(labels)} validation rows (paired 95% interval of the "
                 f"difference holds 0; {resamples} row resamples)")


def tune_report(experiment_dir: str, out_dir: str | None = None) -> dict:
    """trials.csv, best_config.yaml (a pipeline config) and PNG plots of an experiment."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib.pyplot as plt
    import pandas as pd

    if not storage.is_uri(experiment_dir):
        experiment_dir = os.path.abspath(experiment_dir)  # Tune's analysis takes only absolute paths or URIs
    if not storage.exists(storage.join(experiment_dir, SEARCH_FILE)):
        raise FileNotFoundError(f"{experiment_dir}: not a ckd-ehr Tune experiment (no {SEARCH_FILE})")
    rows, search = _trial_rows(experiment_dir)
    out = out_dir or storage.join(experiment_dir, "report")
    metric = search["metric"]
    df = pd.DataFrame(rows)
    floor, floor_note = noise_floor(experiment_dir, [r["trial_id"] for r in rows]) if len(df) else ({}, "")
    for key in ("delta", "low", "high"):   # the validation macro AUROC against the best trial's
        df[f"vs_best_auroc_{key}"] = [floor.get(t, {}).get(key, math.nan) for t in df["trial_id"]] if len(df) else []
    storage.write_text(storage.join(out, "trials.csv"), df.to_csv(index=False))
    scored = df[df[f"best_{metric}"].notna()] if len(df) else df
    if not len(scored):
        raise RuntimeError(f"{experiment_dir}: no trial reported {metric}")
    best = scored.sort_values(f"best_{metric}", ascending=False).iloc[0]
    params = {k: (None if isinstance(best[k], float) and math.isnan(best[k]) else best[k])
              for k in search["params"]}
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
    best_cfg = apply_trial(search["base_config"], params)
    header = (f"# How to run: ckd-ehr pipeline --config best_config.yaml   (best of {len(df)} trials of "
              f"{search['space_file']}, {metric}={best[f'best_{metric}']:.4f})\n")
    storage.write_text(storage.join(out, "best_config.yaml"), header + dump_yaml(best_cfg))

    plots = []
    numeric = [k for k in search["params"] if k in scored and pd.api.types.is_numeric_dtype(scored[k])]
    categorical = [k for k in search["params"] if k in scored and k not in numeric]
    for key in numeric:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter(scored[key], scored[f"best_{metric}"])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if "rank" in key:
            ax.set_xscale("log", base=2)
        ax.set_title(f"{metric} against {key.rsplit('.', 1)[-1]}")
        plots.append(_save(fig, out, f"{key.replace('.', '_')}.png"))
    for key in categorical:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups = scored.groupby(scored[key].astype(str))[f"best_{metric}"]
        means, counts = groups.mean(), groups.size()
        ax.bar([f"{g}\n(n={counts[g]})" for g in means.index], means, yerr=groups.std().fillna(0), capsize=3)
        ax.set_xlabel(key)
        ax.set_ylabel(f"mean {metric}")
        ax.set_title(f"{key.rsplit('.', 1)[-1]} compared")
        plots.append(_save(fig, out, f"{key.replace('.', '_')}.png"))
    summary = {"trials": len(df), "stopped_early": int(df["stopped_early"].sum()),
               "best": {"trial_id": best["trial_id"], metric: float(best[f"best_{metric}"]), "params": params},
               "noise_floor": floor_note, "plots": plots, "out_dir": out}
    storage.write_json(storage.join(out, "summary.json"), summary)
    print(f"{len(df)} trials ({summary['stopped_early']} stopped early by the scheduler); best "
          f"{metric}={best[f'best_{metric}']:.4f}: {params}\n{floor_note}\nreport: {out}")
    return summary


def _save(fig, out_dir: str, name: str) -> str:

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = storage.join(out_dir, name)
    storage.write_bytes(path, buf.getvalue())
    return path


__all__ = ["run_tune", "tune_report"]
