"""Short markdown reports of validation figures (text only; plots.py draws the figures)."""

from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def forecaster_markdown(figures: dict[str, Any], title: str, png: str = "", summary_only: bool = False) -> str:
    """Per-horizon table of the forecaster against the baselines, plus calibration, reward, crash and epistemic
    figures."""
    rows = figures["per_horizon"]
    names = list(rows[0]["baselines"]) if rows else []
    lines = [f"## {title}", "",
             "| horizon [s] | samples | L2 mean [m] | L2 p95 [m] | minADE | minFDE | NLL | cov 50 % | cov 90 % | "
             + " | ".join(f"{n} mean / p95" for n in names) + " |",
             "|" + "---|" * (9 + len(names))]
    for r in rows:
        base = " | ".join(f"{_f(r['baselines'][n]['l2_mean'])} / {_f(r['baselines'][n]['l2_p95'])}" for n in names)
        lines.append(f"| {r['horizon_s']:g} | {r['samples']} | {_f(r['ml_l2_mean'])} | {_f(r['ml_l2_p95'])} | "
                     f"{_f(r['min_ade'])} | {_f(r['min_fde'])} | {_f(r['nll'])} | {_f(r['coverage_50'])} | "
                     f"{_f(r['coverage_90'])} | {base} |")
    if summary_only:
        return "\n".join(lines)
    lines += [""]
    if "epistemic" in figures:
        e = figures["epistemic"]
        lines.append(f"- Epistemic: L2 at the last step on the top decile of member disagreement "
                     f"{_f(e['l2_top_decile_disagreement'])} m, on the rest {_f(e['l2_rest'])} m.")
    if "ego_conditioning" in figures:
        c = figures["ego_conditioning"]
        lines.append(f"- Ego-conditioning (last step, {c['near_slots']} nearest vehicles): true ego actions "
                     f"{_f(c['l2_true_actions'])} m, shuffled {_f(c['l2_shuffled_actions'])} m; the ego itself "
                     f"{_f(c['ego_l2_true_actions'])} m vs {_f(c['ego_l2_shuffled_actions'])} m.")
    if figures.get("by_decision"):
        groups = figures["by_decision"]
        names = list(groups[0]["baselines"])
        cov = "coverage_90" in groups[0]
        lines += ["", "Last step's L2 mean [m] by decision index within the episode"
                  + (", and the coverage of the 50 % / 90 % regions:" if cov else ":"), "",
                  "| decisions | samples | model | " + " | ".join(names) + (" | coverage 50 / 90 % |" if cov else " |"),
                  "|" + "---|" * (3 + len(names) + cov)]
        lines += [f"| {g['decisions']} | {g['samples']} | {_f(g['ml_l2_mean'])} | "
                  + " | ".join(_f(g["baselines"][n]) for n in names)
                  + (f" | {_f(g['coverage_50'])} / {_f(g['coverage_90'])} |" if cov else " |") for g in groups]
        lines.append("")
    r, c = figures["reward"], figures["crash"]
    lines.append(f"- Reward: MAE {_f(r['mae'], 3)} per step (predicting the mean reward: "
                 f"{_f(r['mae_of_mean_reward'], 3)}).")
    lines.append(f"- Crash prediction: AUROC {_f(c['auroc'])}, Brier {_f(c['brier'], 4)}, positive rate "
                 f"{_f(c['positive_rate'], 4)}.")
    if png:
        lines += ["", f"![error and calibration]({png})"]
    return "\n".join(lines) + "\n"
