"""Figures (the only matplotlib importer): forecaster error vs horizon against baselines, reliability diagram.

Functions take the metrics dicts the library returns and write PNG files with the Agg backend (no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def forecaster_report_png(figures: dict[str, Any], path: Path, title: str) -> Path:
    """Two panels: mean L2 [m] vs horizon [s] for the model and each baseline; empirical vs nominal coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = figures["per_horizon"]
    horizon = [r["horizon_s"] for r in rows]
    fig, (ax_err, ax_cal) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_err.plot(horizon, [r["ml_l2_mean"] for r in rows], "o-", lw=2, label="forecaster (most likely mode)")
    ax_err.plot(horizon, [r["ml_l2_p95"] for r in rows], "o--", lw=1, color="C0", alpha=0.6,
                label="forecaster p95")
    for i, name in enumerate(rows[0]["baselines"]):
        ax_err.plot(horizon, [r["baselines"][name]["l2_mean"] for r in rows], "s-", color=f"C{i + 1}",
                    label=name.replace("_", " "))
    ax_err.set(xlabel="horizon [s]", ylabel="position error, mean L2 [m]", title="error vs horizon")
    ax_err.grid(alpha=0.3)
    ax_err.legend(fontsize=8)
    ax_cal.plot([0, 1], [0, 1], "k:", label="ideal")
    for r in rows:
        levels = sorted(float(a) for a in r["coverage"])
        ax_cal.plot(levels, [r["coverage"][f"{a:.1f}"] for a in levels], "o-", ms=3,
                    label=f"{r['horizon_s']:.0f} s")
    ax_cal.set(xlabel="nominal mass of the prediction region", ylabel="empirical coverage",
               title="reliability (highest-density regions)", xlim=(0, 1), ylim=(0, 1))
    ax_cal.grid(alpha=0.3)
    ax_cal.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curve_png(curve: list[dict[str, Any]], path: Path) -> Path:
    """Real env steps of training data vs the planner's return, crash rate, speed and the model's error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["real_steps"] for row in curve]
    panels = [("return_mean", "return (mean per episode)"), ("crash_rate", "crash rate"),
              ("speed_mean", "speed [m/s]"), ("model_l2_last", "forecaster L2 at the last step [m]")]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(steps, [row[key] for row in curve], "o-", lw=2, label="MPC on the learned model")
        if key == "model_l2_last":
            ax.plot(steps, [row["baseline_l2_last"] for row in curve], "s--", label="CV, lateral held")
        ax.set(xlabel="real env steps of training data", ylabel=label)
        if key == "crash_rate":
            ax.set_ylim(0, max(0.05, 1.2 * max(row[key] for row in curve)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("model-based RL learning curve")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
