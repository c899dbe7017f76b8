"""Report stage: RUN/report/report.md and report.html with PNG plots, from evaluate/metrics.json.

The report is built once as a list of blocks (heading, paragraph, table, image) and rendered
twice, to Markdown and to self-contained HTML, so the two never disagree. Images are written
beside them and referenced by relative name. The comparison with the paper shows our deltas
against plain BERT with their paired 95% intervals, as points and as relative change, because
the paper does not say which of the two its +9% / +27% are.

The reference rows of evaluate (floors such as all_negative and copy_forward, logistic
regression, and on synthetic cohorts the latent oracle and the observable ceiling) get their
own table and are drawn on the model comparison plots as horizontal lines with their 95%
interval as a band, so every model bar is read against its floor and its ceiling. A test
split evaluated with --allow-small carries a banner at the top.
"""
from __future__ import annotations

import html
import logging

import numpy as np

from ckd_ehr import storage
from ckd_ehr.contracts import RunLayout
from ckd_ehr.plots import figure_png, plot_reliability_curves

log = logging.getLogger(__name__)

HEADLINE = (("accuracy", "Accuracy (cells)"), ("macro_f1", "Macro-F1"), ("macro_auroc", "Macro AUROC"))
TABLE_METRICS = (("accuracy", "Accuracy"), ("subset_accuracy", "Subset acc."), ("macro_f1", "Macro-F1"),
                 ("micro_f1", "Micro-F1"), ("macro_auroc", "Macro AUROC"), ("micro_auroc", "Micro AUROC"),
                 ("macro_auprc", "Macro AUPRC"), ("micro_auprc", "Micro AUPRC"))


# --- formatting ------------------------------------------------------------------------------

def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return fmt(value, digits) + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def fmt_points(delta: dict) -> str:
    """A delta in percentage points with its paired interval, e.g. '+1.2 [-0.3, +2.6]'."""
    if delta.get("delta") is None:
        return "n/a"
    text = f"{100 * delta['delta']:+.1f}"
    ci = delta.get("interval")
    return text + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def fmt_relative(delta: dict) -> str:
    return "n/a" if delta.get("relative") is None else f"{100 * delta['relative']:+.1f}%"


def verdict(delta: dict) -> str:
    ci = delta.get("interval")
    if not ci:
        return "no interval"
    if ci[0] > 0:
        return "better (interval above 0)"
    if ci[1] < 0:
        return "worse (interval below 0)"
    return "no clear difference (interval spans 0)"


# --- plots ------------------------------------------------------------------------------------

REFERENCE_STYLE = {
    "all_negative": ("#999999", ":"), "prevalence": ("#777777", "-."), "copy_forward": ("#DD8452", "--"),
    "logistic_regression": ("#55A868", "-"), "observable_ceiling": ("#8172B3", "-"),
    "latent_oracle": ("#C44E52", "--"), "probe_teacher": ("#937860", ":"), "probe_student": ("#DA8BC3", ":"),
}


def _draw_references(ax, metrics: dict, mode: str, key: str) -> list[float]:
    """Reference rows as horizontal lines with their interval as a band; returns the values
    drawn (for the axis limits)."""
    drawn = []
    for name, entry in (metrics.get("baselines") or {}).items():
        m = entry["modes"][mode]
        v, ci = m["metrics"].get(key), (m["intervals"] or {}).get(key)
        if v is None or not np.isfinite(v):
            continue
        color, style = REFERENCE_STYLE.get(name, ("#333333", "-"))
        ax.axhline(v, color=color, linestyle=style, linewidth=1.2, label=name)
        if ci:
            ax.axhspan(ci[0], ci[1], color=color, alpha=0.12)
            drawn += list(ci)
        drawn.append(v)
    return drawn


def plot_variants(metrics: dict, mode: str) -> bytes:
    """Headline metrics of every model side by side, with 95% bootstrap error bars; the
    reference rows as lines with bands."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["models"])
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(4.2 * len(HEADLINE), 3.8))
    for ax, (key, label) in zip(axes, HEADLINE):
        refs = _draw_references(ax, metrics, mode, key)
        values, errors = [], [[], []]
        for name in names:
            m = metrics["models"][name]["modes"][mode]
            v = m["metrics"][key]
            ci = m["intervals"].get(key)
            values.append(np.nan if v is None else v)
            errors[0].append(v - ci[0] if ci and v is not None else 0)
            errors[1].append(ci[1] - v if ci and v is not None else 0)
        if names:
            # Points with intervals, not bars: the axis is cut to the figures' range, and a bar
            # on a cut axis draws a length that means nothing.
            ax.errorbar(range(len(names)), values, yerr=errors, fmt="o", capsize=4, color="#4C72B0",
                        markersize=6, linewidth=1.5)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_xlim(-0.6, len(names) - 0.4)
        else:
            ax.set_xticks([])
        ax.set_title(label)
        finite = [v for v in values if np.isfinite(v)]
        lows = [v - e for v, e in zip(values, errors[0]) if np.isfinite(v)] + refs
        highs = [v + e for v, e in zip(values, errors[1]) if np.isfinite(v)] + refs
        if finite or refs:
            ax.set_ylim(max(0.0, min(lows) - 0.04), min(1.0, max(highs) + 0.04))
    if metrics.get("baselines"):
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="reference rows")
    fig.suptitle(f"Test split, thresholds: {mode} (points: 95% patient bootstrap intervals; lines and bands: "
                 "reference rows and their intervals)")
    return figure_png(fig)


def plot_per_phenotype_f1(metrics: dict, mode: str) -> bytes:
    """F1 of every phenotype, one bar per model."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics["models"])
    phenos = metrics["phenotypes"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(14, 5))
    x = np.arange(len(phenos))
    for i, name in enumerate(names):
        f1 = [row["f1"] for row in metrics["models"][name]["modes"][mode]["per_phenotype"]]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, f1, width, label=name)
    ax.set_xticks(x, [p if len(p) <= 32 else p[:30] + "..." for p in phenos], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("F1")
    ax.set_title(f"Per-phenotype F1 on the test split (thresholds: {mode})")
    ax.legend(fontsize=8, ncol=len(names))
    return figure_png(fig)


def plot_reliability(metrics: dict) -> bytes:
    """Reliability diagram from the calibration bins in metrics.json (all N x 25 cells)."""
    # The teacher first: its probabilities are the soft labels the students learn from.
    names = sorted(metrics["models"], key=lambda n: n != "teacher")
    return plot_reliability_curves({n: metrics["models"][n]["calibration"] for n in names},
                                   "Reliability on the test split", highlight="teacher")


# --- document ---------------------------------------------------------------------------------

def plot_learning_curves(metrics: dict) -> bytes | None:
    """Validation macro AUROC against training samples seen, one line per model that recorded a
    learning curve (ckd_ehr.training), its probe (step 0) as a dotted line of the same colour and
    its kept checkpoint circled; None when no model has a curve."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib.pyplot as plt

    curves = {n: e["curve"] for n, e in metrics["models"].items()
              if len([p for p in e.get("curve") or [] if p.get("val_macro_auroc") is not None]) > 1}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i}"
        pts = [(p["samples"], p["val_macro_auroc"]) for p in curve if p.get("val_macro_auroc") is not None]
        ax.plot(*zip(*pts), "-o", color=color, markersize=3, label=name)
        if curve[0].get("step") == 0:
            ax.axhline(pts[0][1], color=color, linestyle=":", linewidth=1)
        kept = metrics["models"][name].get("kept_step")
        for p in curve:
            if p.get("step") == kept and p.get("val_macro_auroc") is not None:
                ax.plot([p["samples"]], [p["val_macro_auroc"]], "o", markersize=9, markerfacecolor="none", color=color)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("validation macro AUROC")
    ax.set_title("Learning curves (dotted: each model's probe, step 0; circle: the kept checkpoint)", fontsize=9)
    ax.legend(fontsize=8)
    return figure_png(fig)


def plot_contrasts(study: dict) -> bytes:
    """Forest plot of the study's contrasts (ckd_ehr.evaluation.contrasts): the seed-averaged
    difference with its simultaneous (max-T) interval as a thick bar, the unadjusted interval as
    a thin one, each seed's difference as a dot, and 0 as the reference line."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib.pyplot as plt

    rows = study["contrasts"]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.4))
    for i, c in enumerate(reversed(rows)):
        ax.plot(c["marginal_interval"], [i, i], color="#4C72B0", linewidth=1.0)
        ax.plot(c["interval"], [i, i], color="#4C72B0", linewidth=4.0, alpha=0.6)
        ax.plot([c["delta"]], [i], "o", color="#4C72B0", markersize=6)
        ax.plot(c["per_seed"], [i] * len(c["per_seed"]), "x", color="#333333", markersize=5, alpha=0.7)
        ax.annotate("identical predictions" if c.get("identical") else f"p_holm {fmt_p(c['p_holm'])}", (max(c["interval"][1], c["marginal_interval"][1]), i),
                    xytext=(6, -3), textcoords="offset points", fontsize=7)
    ax.axvline(0.0, color="#999999", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [c["name"] for c in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"difference in test {study['metric'].replace('_', ' ')} "
                  f"(thick: {study['level']:.0%} simultaneous, thin: unadjusted; x: per seed)")
    return figure_png(fig)


def fmt_p(p: float) -> str:
    """'0.013', or '< 1e-15' where the normal tail underflows (a p-value is never exactly 0)."""
    return "< 1e-15" if p < 1e-15 else f"{p:.3g}"


def reference_blocks(metrics: dict, images: dict[str, str]) -> list[tuple]:
    """The floors' and ceilings' tables (and their figure when no model has predictions)."""
    blocks: list[tuple] = []
    models = metrics["models"]
    references = metrics.get("baselines") or {}
    if references:
        blocks.append(("h2", "Reference rows: floors and ceilings (no training needed)"))
        blocks.append(("p", "Scored exactly like the models: test split, thresholds fixed at 0.5 or tuned per "
                            "phenotype on validation, the same patient bootstrap. " + " ".join(
                                f"{n}: {e['role']}." for n, e in references.items())))
        for mode in metrics["threshold_modes"]:
            rows = []
            for name, entry in references.items():
                m = entry["modes"][mode]
                rows.append([name, mode, str(entry["n_samples"]), str(entry["n_patients"])]
                            + [fmt_ci(m["metrics"][k], m["intervals"].get(k)) for k, _ in TABLE_METRICS])
            blocks.append(("table", ["Reference", "Thresholds", "Samples", "Patients"]
                           + [lab for _, lab in TABLE_METRICS], rows))
        if not models:
            for mode in metrics["threshold_modes"]:
                blocks.append(("img", images[f"variants_{mode}"], f"reference rows, thresholds {mode}"))
    return blocks


def claim_blocks(metrics: dict) -> list[tuple]:
    """Every model's paired deltas against the baseline row, beside the paper's claims."""
    blocks: list[tuple] = []
    deltas, base = metrics["deltas"], metrics["baseline"]
    blocks.append(("h2", f"Against the paper's claims (deltas versus {base}, paired intervals)"))
    claims = metrics["paper_claims"]
    blocks.append(("p", claims["note"] + " Deltas are in percentage points with paired 95% intervals "
                   "(the same resampled patients for both models)."))
    if deltas:
        rows = []
        for name, d in deltas.items():
            for mode in metrics["threshold_modes"]:
                if mode not in d:
                    continue
                acc, f1, auc = d[mode]["accuracy"], d[mode]["macro_f1"], d[mode]["macro_auroc"]
                rows.append([name, mode, fmt_points(acc), fmt_relative(acc), fmt_points(f1), fmt_relative(f1),
                             fmt_points(auc), "identical predictions: nothing compared" if d.get("identical")
                             else verdict(f1)])
        blocks.append(("table", ["Model", "Thresholds", "Δ accuracy (pts)", "Δ accuracy (rel.)",
                                 "Δ macro-F1 (pts)", "Δ macro-F1 (rel.)", "Δ macro AUROC (pts)",
                                 "Macro-F1 verdict"], rows))
        ours = deltas.get("ckd_ehr")
        if ours and "fixed" in ours:
            acc, f1 = ours["fixed"]["accuracy"], ours["fixed"]["macro_f1"]
            blocks.append(("p", f"Paper: CKD-EHR vs plain BERT +{100 * claims['accuracy_gain']:.0f}% accuracy, "
                                f"+{100 * claims['f1_gain']:.0f}% F1 (threshold 0.5). Ours at 0.5: accuracy "
                                f"{fmt_points(acc)} pts ({fmt_relative(acc)}), macro-F1 {fmt_points(f1)} pts "
                                f"({fmt_relative(f1)}): {verdict(f1)}."))
    else:
        blocks.append(("p", "No deltas: the baseline has no predictions."))
    return blocks


def build_blocks(metrics: dict, run_dir: str, images: dict[str, str], quality: dict | None) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", header, rows), ("img", file, alt)."""
    models = metrics["models"]
    boot = metrics["bootstrap"]
    label_set = metrics.get("macro_label_set") or {}
    blocks: list[tuple] = [("h1", "CKD-EHR evaluation report")]
    too_small = metrics.get("too_small")
    if too_small:
        blocks.append(("p", "WARNING - TOO SMALL TO JUDGE (evaluated with --allow-small): "
                       + "; ".join(too_small["reasons"]) + ". No difference between rows below can be "
                       "trusted."))
    if metrics.get("summary"):
        blocks += [("h2", "What this run found"), ("p", metrics["summary"]["text"])]
    blocks.append(("p", f"Run directory: {run_dir}. Test split; 95% intervals from {boot['resamples']} bootstrap "
                        f"resamples over patients (seed {boot['seed']}). Accuracy is element-wise over N x 25 "
                        "cells (the paper's definition, 1 - Hamming loss); subset accuracy needs all 25 right. "
                        "AUROC/AUPRC are computed on probabilities."))
    if label_set:
        left = label_set.get("left_out") or {}
        blocks.append(("p", f"Macro metrics (F1, AUROC, AUPRC) average one label set for every row and every "
                            f"bootstrap draw: {len(label_set['included'])} phenotypes, the {label_set['rule']}. "
                            + (f"Left out ({len(left)}; test positives): "
                               + ", ".join(f"{n} ({c})" for n, c in left.items()) + "."
                               if left else "None left out.")))
    blocks += reference_blocks(metrics, images)
    if not models:
        blocks.append(("p", "No model predictions yet: train the teacher and students, then evaluate again."))
        return blocks + _notes_blocks(metrics, models)
    for mode, meaning in metrics["threshold_modes"].items():
        blocks.append(("h2", f"Models side by side, thresholds {mode}: {meaning}"))
        rows = []
        for name, entry in models.items():
            m = entry["modes"][mode]
            rows.append([name, role_with_step(entry), str(entry["n_samples"]), str(entry["n_patients"])]
                        + [fmt_ci(m["metrics"][k], m["intervals"].get(k)) for k, _ in TABLE_METRICS])
        blocks.append(("table", ["Model", "Role", "Samples", "Patients"] + [lab for _, lab in TABLE_METRICS], rows))
        blocks.append(("img", images[f"variants_{mode}"], f"headline metrics, thresholds {mode}"))

    blocks += claim_blocks(metrics)
    blocks += what_rows_can_tell(metrics)
    blocks.append(("p", f"Speed: the paper claims {metrics['paper_claims']['speedup']}x faster inference than the teacher; "
                        "measure it with `ckd-ehr bench speedup` (figures are printed, not stored here)."))

    blocks.append(("h2", "Per-phenotype F1 (thresholds fixed at 0.5)"))
    blocks.append(("img", images["per_phenotype_f1"], "per-phenotype F1"))
    header = ["Phenotype", "Prevalence"] + list(models)
    rows = []
    for j, pheno in enumerate(metrics["phenotypes"]):
        first = next(iter(models.values()))["modes"]["fixed"]["per_phenotype"][j]
        rows.append([pheno, fmt(first["prevalence"])]
                    + [fmt(e["modes"]["fixed"]["per_phenotype"][j]["f1"]) for e in models.values()])
    blocks.append(("table", header, rows))

    blocks.append(("h2", "Calibration"))
    blocks.append(("img", images["reliability"], "reliability diagram of every model"))
    if "learning_curves" in images:
        blocks += [("h2", "Learning curves"),
                   ("p", "Validation macro AUROC at every validation during training against the training samples "
                         "seen; step 0 is each model's linear probe (dotted). A model whose curve never rises above "
                         "its probe kept the probe."),
                   ("img", images["learning_curves"], "learning curves")]
    if "soft_label_reliability" in images:
        blocks.append(("p", "The teacher's soft labels, from the soft-labels stage's quality check:"))
        blocks.append(("img", images["soft_label_reliability"], "teacher soft-label reliability"))
    if quality:
        blocks += soft_label_quality_blocks(quality)

    return blocks + _notes_blocks(metrics, models)


def role_with_step(entry: dict) -> str:
    """The model's role, marked when its checkpoint is the step-0 probe (no update applied)."""
    if entry.get("kept_step") == 0:
        return entry["role"] + " [kept step 0: its probe, no training update]"
    return entry["role"]


def what_rows_can_tell(metrics: dict) -> list[tuple]:
    """Say which comparisons measure nothing: models that kept their step-0 probe, and models
    whose test predictions are identical (a delta of exactly 0 with a [0, 0] interval is not
    evidence that two methods are equal; it is the same model twice)."""
    models = metrics.get("models") or {}
    at_probe = [n for n, e in models.items() if e.get("kept_step") == 0]
    same = metrics.get("identical_predictions") or []
    if not at_probe and not same:
        return []
    text = "What these rows can tell. "
    if at_probe:
        text += (f"Checkpoint selection on validation kept step 0 for {', '.join(at_probe)}: each is its probe "
                 "(a head fitted on the frozen model's features), with no fine-tuning or distillation update; "
                 "differences between them come from the text and the frozen model, not from training. ")
    if same:
        text += ("Identical test predictions: " + "; ".join(" = ".join(g) for g in same)
                 + ". The deltas between them are 0 by construction and say nothing about the methods they name.")
    return [("p", text.strip())]


def soft_label_quality_blocks(quality: dict) -> list[tuple]:
    """The soft-label quality figures per split (and over all splits), then what they mean."""
    per = {**(quality.get("splits") or {}), **({"all splits": quality["overall"]} if quality.get("overall") else {})}
    keys = []
    for entry in per.values():
        keys += [k for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    blocks = []
    if per and keys:
        rows = [[split] + [fmt(e.get(k), 4) if isinstance(e.get(k), float) else str(e.get(k, "")) for k in keys]
                for split, e in per.items()]
        blocks.append(("table", ["Soft labels"] + keys, rows))
    scalars = [[k, fmt(v, 4) if isinstance(v, float) else str(v)] for k, v in quality.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if scalars:
        blocks.append(("table", ["Soft-label quality", "Value"], scalars))
    notes = [[k, str(v)] for k, v in quality.items() if isinstance(v, str)]
    if notes:
        blocks.append(("table", ["Soft-label quality", "Meaning"], notes))
    return blocks


def _notes_blocks(metrics: dict, models: dict) -> list[tuple]:
    skipped = metrics.get("skipped") or {}
    notes = list(metrics.get("notes") or []) + [f"{n} skipped: {why}" for n, why in skipped.items()]
    for name, entry in models.items():
        if entry["auroc_skipped"] and not metrics.get("macro_label_set"):
            notes.append(f"{name}: {len(entry['auroc_skipped'])} phenotype(s) with a single class in the "
                         f"test labels, left out of macro AUROC/AUPRC: {', '.join(entry['auroc_skipped'])}")
        for mode, src in entry["threshold_source"].items():
            notes.append(f"{name}: {mode} thresholds: {src}")
    for name, entry in (metrics.get("baselines") or {}).items():
        details = entry.get("details") or {}
        extra = {k: v for k, v in details.items() if k not in ("threshold_source",)}
        notes.append(f"reference {name}: " + "; ".join(f"{k}: {v}" for k, v in extra.items()))
    if not notes:
        return []
    return [("h2", "Notes")] + [("p", n) for n in notes]


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(block[1] + "\n")
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})\n")
        elif kind == "table":
            header, rows = block[1], block[2]
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def render_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(block[1])}</{kind}>")
        elif kind == "img":
            body.append(f'<p><img src="{e(block[1])}" alt="{e(block[2])}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def run_report(cfg) -> dict:
    layout = RunLayout(cfg.run_dir)
    if not storage.exists(layout.metrics):
        raise FileNotFoundError(f"{layout.metrics}: not found (run `ckd-ehr evaluate` first)")
    metrics = storage.read_json(layout.metrics)
    if not metrics.get("models") and not metrics.get("baselines"):
        raise ValueError(f"{layout.metrics}: no models and no reference rows to report")
    out = layout.report_dir

    images = {}
    for mode in metrics["threshold_modes"]:
        images[f"variants_{mode}"] = f"variants_{mode}.png"
        storage.write_bytes(storage.join(out, images[f"variants_{mode}"]), plot_variants(metrics, mode))
    if metrics.get("models"):
        images.update({"per_phenotype_f1": "per_phenotype_f1.png", "reliability": "reliability.png"})
        storage.write_bytes(storage.join(out, images["per_phenotype_f1"]), plot_per_phenotype_f1(metrics, "fixed"))
        storage.write_bytes(storage.join(out, images["reliability"]), plot_reliability(metrics))
        curves = plot_learning_curves(metrics)
        if curves is not None:
            images["learning_curves"] = "learning_curves.png"
            storage.write_bytes(storage.join(out, images["learning_curves"]), curves)

    # The soft-labels stage draws the teacher's reliability on the soft labels themselves;
    # copy it beside the report so the relative link works wherever the folder goes.
    quality = None
    soft_png = storage.join(layout.soft_label_quality, "reliability.png")
    if storage.exists(soft_png):
        images["soft_label_reliability"] = "teacher_soft_label_reliability.png"
        storage.write_bytes(storage.join(out, images["soft_label_reliability"]), storage.read_bytes(soft_png))
    quality_json = storage.join(layout.soft_label_quality, "quality.json")
    if storage.exists(quality_json):
        quality = storage.read_json(quality_json)

    blocks = build_blocks(metrics, cfg.run_dir, images, quality if isinstance(quality, dict) else None)
    storage.write_text(layout.report_md, render_markdown(blocks))
    storage.write_text(layout.report_html, render_html(blocks, "CKD-EHR evaluation report"))
    log.info("wrote %s, %s and %d images", layout.report_md, layout.report_html, len(images))
    return {"report_md": layout.report_md, "report_html": layout.report_html,
            "images": sorted(images.values())}
