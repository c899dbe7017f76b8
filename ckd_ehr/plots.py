"""Figures shared across stages (PNG bytes): the bottom layer, matplotlib imported when drawing."""
from __future__ import annotations

import io


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (closed after)."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_reliability_curves(curves: dict[str, dict], title: str, highlight: str | None = None) -> bytes:
    """Reliability diagram (PNG bytes), one line per named set of calibration bins
    (ckd_ehr.metrics.reliability_bins: mean_prob, positive_rate, ece); the diagonal
    is perfect calibration. Used by the evaluation report, the study and the soft-label quality report."""
    # not at module level: matplotlib, loaded only when this runs
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, cal in curves.items():
        pts = [(p, r) for p, r in zip(cal["mean_prob"], cal["positive_rate"]) if p is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", linewidth=2.5 if name == highlight else 1,
                    label=f"{name} (ECE {cal['ece']:.3f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return figure_png(fig)
