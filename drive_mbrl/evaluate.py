"""Safety and performance metrics of closed-loop episodes.

Per episode: return (sum of env rewards), crashed, mean ego speed [m/s], minimum time-to-collision [s], decision
latencies [ms]. Over episodes: the figures of `summarise`, written to metrics.json by the CLI.

Time-to-collision (TTC) follows the car-following definition, evaluated at every recorded frame in the ego's
heading frame: for each other present vehicle that overlaps the ego laterally (|lateral offset| < mean of the two
widths), the bumper-to-bumper gap |dx| - (L_ego + L_other) / 2 divided by the closing speed, when they close in.
A crash counts as TTC 0. `ttc_min_p5` is the 5th percentile over episodes of each episode's minimum TTC (episodes
never in a closing car-following situation count as +inf). Crossing traffic that does not overlap laterally is
not covered; the crash rate covers it. This module imports numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from drive_mbrl.types import EGO_TRACK, STATE_FIELDS, Episode

_X, _Y, _VX, _VY, _HEADING, _LENGTH, _WIDTH = range(len(STATE_FIELDS))


def time_to_collision(state: np.ndarray, present: np.ndarray, ego: int = EGO_TRACK) -> np.ndarray:
    """Minimum TTC [s] at each frame between the ego and any laterally overlapping vehicle closing in on it.

    state: (T, M, F) world-frame tracks (`STATE_FIELDS`), present: (T, M). Returns (T,) with +inf where no vehicle
    is closing in. Vehicles already overlapping longitudinally (gap <= 0) while closing give TTC 0.
    """
    assert state.ndim == 3 and present.shape == state.shape[:2], f"state {state.shape}, present {present.shape}"
    ego_state = state[:, ego : ego + 1]  # (T, 1, F)
    rel_pos = state[..., [_X, _Y]] - ego_state[..., [_X, _Y]]
    rel_vel = state[..., [_VX, _VY]] - ego_state[..., [_VX, _VY]]
    heading = ego_state[..., _HEADING]
    cos, sin = np.cos(heading), np.sin(heading)
    lon = rel_pos[..., 0] * cos + rel_pos[..., 1] * sin
    lat = -rel_pos[..., 0] * sin + rel_pos[..., 1] * cos
    v_lon = rel_vel[..., 0] * cos + rel_vel[..., 1] * sin
    overlap = np.abs(lat) < 0.5 * (state[..., _WIDTH] + ego_state[..., _WIDTH])
    gap = np.abs(lon) - 0.5 * (state[..., _LENGTH] + ego_state[..., _LENGTH])
    closing = -np.sign(lon) * v_lon  # > 0 when the distance shrinks
    valid = present & overlap & (closing > 0)
    valid[:, ego] = False
    with np.errstate(divide="ignore", invalid="ignore"):
        ttc = np.where(valid, np.maximum(gap, 0.0) / np.where(valid, closing, 1.0), np.inf)
    return ttc.min(axis=1)


def episode_metrics(episode: Episode) -> dict[str, float]:
    """Figures of one episode (see the module docstring)."""
    ego = episode.state[:, EGO_TRACK]
    speed = np.hypot(ego[:, _VX], ego[:, _VY])
    ttc = time_to_collision(episode.state, episode.present)
    crashed = bool(episode.crashed.any())
    return {
        "return": float(episode.reward.sum()),
        "crashed": float(crashed),
        "speed_mean": float(speed[episode.decision_frame].mean()),
        "ttc_min": 0.0 if crashed else float(ttc.min()),
        "steps": float(episode.steps),
    }


def summarise(episodes: list[Episode]) -> dict[str, Any]:
    """Aggregate figures over episodes for metrics.json: episodes, return_mean/std, crash_rate, speed_mean [m/s],
    ttc_min_p5 [s], decision_ms_p50/p99 [ms] over all decisions, steps, fallback_rate (share of decisions a
    planner handed to its fallback) and fallback_reasons (count per reason)."""
    if not episodes:
        raise ValueError("summarise needs at least one episode")
    rows = [episode_metrics(ep) for ep in episodes]
    col = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    decisions = np.concatenate([ep.decision_ms for ep in episodes])
    fallbacks = np.concatenate([ep.fallback for ep in episodes])
    reasons, counts = np.unique(fallbacks[fallbacks != ""], return_counts=True)
    ttc_p5 = float(np.percentile(col["ttc_min"], 5, method="lower"))
    return {
        "episodes": len(episodes),
        "return_mean": float(col["return"].mean()),
        "return_std": float(col["return"].std()),
        "crash_rate": float(col["crashed"].mean()),
        "speed_mean": float(col["speed_mean"].mean()),
        "ttc_min_p5": ttc_p5 if np.isfinite(ttc_p5) else None,
        "decision_ms_p50": float(np.percentile(decisions, 50)),
        "decision_ms_p99": float(np.percentile(decisions, 99)),
        "steps": int(col["steps"].sum()),
        "fallback_rate": float((fallbacks != "").mean()) if len(fallbacks) else 0.0,
        "fallback_reasons": {str(r): int(n) for r, n in zip(reasons, counts, strict=True)},
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, one row per name (e.g. agent), columns the summary keys."""
    keys = ["episodes", "return_mean", "return_std", "crash_rate", "speed_mean", "ttc_min_p5",
            "decision_ms_p50", "decision_ms_p99", "fallback_rate"]
    def cell(value: Any) -> str:
        if value is None:
            return "inf"
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    table = [["name", *keys]] + [[name, *(cell(m.get(k)) for k in keys)] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in table)
