"""Figures (with replay.py, the only matplotlib importers): forecaster error vs horizon against baselines,
reliability diagrams, learning curves of the MBRL loop, and agents compared on evaluation figures.

Functions take the metrics dicts the library returns (or the metrics.json files the CLI wrote) and write PNG files
atomically with the Agg backend (no display). Intervals are 95 %: a normal interval of the mean over episodes
(mean +- 1.96 sd / sqrt(n)) and Wilson's interval for rates (crash rate); they come from the episode files beside a
run's metrics.json when those are on disk, else from the summary figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl.data import atomic_write
from drive_mbrl.errors import DataError

Z95 = 1.959964
"""Standard-normal quantile of a two-sided 95 % interval."""


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
                    label=f"{r['horizon_s']:g} s")
    ax_cal.set(xlabel="nominal mass of the prediction region", ylabel="empirical coverage",
               title="reliability (highest-density regions)", xlim=(0, 1), ylim=(0, 1))
    ax_cal.grid(alpha=0.3)
    ax_cal.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


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
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write `fig` to `path` atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return Path(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student-t 97.5 % quantiles for 1-30 degrees of freedom."""


def t95(dof: int) -> float:
    """The two-sided 95 % Student-t factor for `dof` degrees of freedom (the table up to 30, then the first
    Cornish-Fisher term, within 1e-3 of the exact value)."""
    if dof <= len(T975):
        return T975[dof - 1]
    return Z95 + (Z95**3 + Z95) / (4 * dof)


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean of `values` (n,) and its 95 % Student-t interval (mean +- t(n - 1) sd / sqrt(n), sample sd; zero width
    for n = 1)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()), float(values.mean()), float(values.mean())
    mean, half = float(values.mean()), t95(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(successes: float, n: int) -> tuple[float, float, float]:
    """A rate k / n and its 95 % Wilson score interval."""
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def read_metrics(path: Path, command: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """A run's metrics.json (`path` is the file or its run folder), checked to come from one of `command`; returns
    the metrics and the run folder. Raises DataError naming the file."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{file} does not exist: pass metrics.json files or the run folders holding them")
    try:
        metrics = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON ({exc})") from exc
    if metrics.get("command") not in command:
        raise DataError(f"{file} comes from `{metrics.get('command')}`, this plot needs metrics of "
                        f"{' or '.join(command)}")
    return metrics, file.parent


def episode_intervals(root: Path) -> dict[str, tuple[float, float, float]] | None:
    """Return, crash rate and speed [m/s] with 95 % intervals over the episodes of the dataset folder `root`, or
    None when it holds no episodes."""
    from drive_mbrl.data import load_dataset
    from drive_mbrl.evaluate import episode_metrics

    if not (root / "manifest.json").is_file():
        return None
    rows = [episode_metrics(ep) for ep in load_dataset(root)[1]]
    if not rows:
        return None
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return {"return_mean": mean_interval(col["return"]), "speed_mean": mean_interval(col["speed_mean"]),
            "crash_rate": wilson_interval(float(col["crashed"].sum()), len(rows))}


def summary_intervals(m: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """The same figures from an evaluate summary alone (no interval for speed: its spread is not in the summary)."""
    n = int(m["episodes"])  # return_std is the population sd: sample sd / sqrt(n) = population sd / sqrt(n - 1)
    half = t95(n - 1) * float(m["return_std"]) / math.sqrt(n - 1) if n > 1 else 0.0
    return {"return_mean": (m["return_mean"], m["return_mean"] - half, m["return_mean"] + half),
            "crash_rate": wilson_interval(round(m["crash_rate"] * n), n),
            "speed_mean": (m["speed_mean"], m["speed_mean"], m["speed_mean"])}


PANELS = (("return_mean", "return per episode"), ("crash_rate", "crash rate"), ("speed_mean", "ego speed [m/s]"))


def evaluation_png(runs: list[tuple[str, dict[str, Any], Path]], path: Path, title: str) -> Path:
    """Agents (one bar each) on return, crash rate and speed with 95 % intervals. runs: (label, evaluate metrics,
    run folder) each; intervals from the run's `episodes/` when on disk."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8))
    # An evaluate run folder holds its dataset in episodes/; the pipeline passes the dataset folders themselves.
    figures = [episode_intervals(folder / "episodes") or episode_intervals(folder) or summary_intervals(m)
               for _, m, folder in runs]
    x = np.arange(len(runs))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        mean, lo, hi = (np.array([f[key][i] for f in figures]) for i in range(3))
        ax.bar(x, mean, color=[f"C{i}" for i in range(len(runs))], alpha=0.85)
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor="black", capsize=4, lw=1.2)
        ax.set_xticks(x, [r[0] for r in runs], rotation=20, ha="right")
        ax.set(ylabel=label, title=label)
        ax.grid(axis="y", alpha=0.3)
    episodes = ", ".join(f"{r[0]}: {r[1]['episodes']}" for r in runs)
    fig.suptitle(f"{title or 'agents compared'} (95 % intervals; episodes {episodes})", fontsize=10)
    return _save(fig, path)


def learning_png(runs: list[tuple[str, dict[str, Any], Path]], path: Path, title: str) -> Path:
    """Learning curves of `train` runs: real env steps of training data vs return, crash rate and speed, one line
    per run with a 95 % band from each iteration's evaluation episodes (`eval/iter<i>` in the run folder)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.6 * len(PANELS), 3.8))
    for i, (label, m, folder) in enumerate(runs):
        curve = m["learning_curve"]
        steps = np.array([row["real_steps"] for row in curve])
        bands = [episode_intervals(folder / "eval" / f"iter{row['iteration']}") for row in curve]
        for ax, (key, name) in zip(axes, PANELS, strict=True):
            ax.plot(steps, [row[key] for row in curve], "o-", color=f"C{i}", lw=2, label=label)
            if all(b is not None for b in bands):
                ax.fill_between(steps, [b[key][1] for b in bands], [b[key][2] for b in bands], color=f"C{i}",
                                alpha=0.2, lw=0)
            ax.set(xlabel="real env steps of training data", ylabel=name, title=name)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "model-based RL learning curves (bands: 95 % intervals over evaluation episodes)",
                 fontsize=10)
    return _save(fig, path)


def _per_horizon(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-horizon validation rows of a `validate` or `fit` metrics dict."""
    return m["per_horizon"] if "per_horizon" in m else m["validation"]["per_horizon"]


def forecaster_png(runs: list[tuple[str, dict[str, Any], Path]], path: Path, title: str) -> Path:
    """Mean position error [m] vs horizon [s] of each forecaster (solid) and the physics baselines of the first
    input (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, (label, m, _) in enumerate(runs):
        rows = _per_horizon(m)
        ax.plot([r["horizon_s"] for r in rows], [r["ml_l2_mean"] for r in rows], "o-", lw=2, color=f"C{i}",
                label=f"{label} (most likely mode)")
    rows = _per_horizon(runs[0][1])
    for j, name in enumerate(rows[0]["baselines"]):
        ax.plot([r["horizon_s"] for r in rows], [r["baselines"][name]["l2_mean"] for r in rows], "s--", lw=1.2,
                color=f"C{len(runs) + j}", label=name.replace("_", " "))
    ax.set(xlabel="horizon [s]", ylabel="position error, mean L2 [m]",
           title=title or "forecaster error vs horizon against physics baselines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability_png(runs: list[tuple[str, dict[str, Any], Path]], path: Path, title: str) -> Path:
    """Reliability diagrams: empirical coverage of the predicted highest-density regions against their nominal
    mass, one panel per input, one line per horizon."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 4.2), squeeze=False)
    for ax, (label, m, _) in zip(axes[0], runs, strict=True):
        ax.plot([0, 1], [0, 1], "k:", label="ideal")
        for r in _per_horizon(m):
            levels = sorted(float(a) for a in r["coverage"])
            ax.plot(levels, [r["coverage"][f"{a:.1f}"] for a in levels], "o-", ms=3,
                    label=f"{r['horizon_s']:g} s ahead")
        ax.set(xlabel="nominal probability mass", ylabel="empirical coverage", title=label, xlim=(0, 1),
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "calibration: reliability of the predicted regions", fontsize=10)
    return _save(fig, path)


PLOTS = {"learning": (learning_png, ("train",)), "forecaster": (forecaster_png, ("validate", "fit")),
         "reliability": (reliability_png, ("validate", "fit")), "evaluation": (evaluation_png, ("evaluate",))}


def plot_metrics(kind: str, inputs: list[Path], labels: list[str], path: Path, title: str = "") -> Path:
    """Draw plot `kind` (a key of PLOTS) from metrics.json files or run folders into the PNG `path`."""
    draw, commands = PLOTS[kind]
    runs = []
    for i, source in enumerate(inputs):
        metrics, folder = read_metrics(source, commands)
        runs.append((labels[i] if labels else folder.name, metrics, folder))
    return draw(runs, Path(path), title)
