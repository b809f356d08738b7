"""The ego's own motion under candidate meta-action plans: highway-env's MDPVehicle controller, vectorised in torch.

A planner knows its own vehicle: a meta-action only moves set-points (FASTER / SLOWER pick the next of the discrete
target speeds from the current speed, LANE_LEFT / LANE_RIGHT the neighbouring lane), and highway-env's proportional
controllers and kinematic bicycle model turn set-points into motion. This module integrates exactly those equations
(`ControlledVehicle.steering_control` / `speed_control`, `Vehicle.step`) for N plans at once, at the simulation
rate, on straight lanes: so the planner's ego trajectories are exact on highway roads, while the learned forecaster
predicts everyone else (conditioned on the same plans). On curved lanes (roundabout, intersection turns) the
straight-lane assumption makes it an approximation; the planner can use the forecaster's own ego prediction there
(`planner.ego_model=learned`).

Pure torch; the ego's set-points come from the agent (`EgoState`), never from this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# highway-env ControlledVehicle / Vehicle constants (highway_env.vehicle.controller and .kinematics, 1.10-1.12).
TAU_ACC, TAU_HEADING, TAU_LATERAL = 0.6, 0.2, 0.6  # [s]
KP_A, KP_HEADING, KP_LATERAL = 1 / TAU_ACC, 1 / TAU_HEADING, 1 / TAU_LATERAL
MAX_STEERING_ANGLE = math.pi / 3  # [rad]
MAX_SPEED = 40.0  # [m/s]


@dataclass(frozen=True)
class EgoState:
    """The ego at a decision, in its lane's frame (x along the lane, y to the right of the lane centre)."""

    speed: float
    """[m/s]"""
    heading: float
    """[rad] relative to the lane direction."""
    lateral: float
    """[m] offset from the centre of its current lane (+ right)."""
    lane_heading: float
    """[rad] the lane's direction in the ego frame (to rotate results into the ego frame)."""
    lane: int
    """Current lane id (0 = leftmost), `lanes` lanes of `lane_width` [m]."""
    target_lane: int
    lanes: int
    lane_width: float
    target_speed: float
    target_speeds: tuple[float, ...]
    """The discrete speeds FASTER / SLOWER choose from [m/s] (uniformly spaced)."""
    length: float
    """[m] the ego's length (the bicycle model's wheelbase is half of it)."""


def speed_to_index(speed: torch.Tensor, speeds: tuple[float, ...]) -> torch.Tensor:
    """Index of the closest allowed speed (highway-env's `MDPVehicle.speed_to_index`, uniform speeds)."""
    if len(speeds) == 1:
        return torch.zeros_like(speed, dtype=torch.int64)
    x = (speed - speeds[0]) / (speeds[-1] - speeds[0])
    return torch.round(x * (len(speeds) - 1)).clamp(0, len(speeds) - 1).to(torch.int64)


def rollout_ego(state: EgoState, plans: torch.Tensor, action_names: list[str], frames_per_step: int,
                sim_dt: float) -> torch.Tensor:
    """Positions and velocities of the ego at the end of each plan step, in the ego frame at the decision.

    plans: (N, H) int64 meta-action indices into `action_names`. Returns (N, H, 4): x, y [m] and vx, vy [m/s].
    """
    N, H = plans.shape
    dev, dt = plans.device, torch.float64
    speeds = torch.tensor(state.target_speeds, device=dev, dtype=dt)
    x = torch.zeros(N, device=dev, dtype=dt)
    y = torch.full((N,), state.lateral, device=dev, dtype=dt)
    psi = torch.full((N,), state.heading, device=dev, dtype=dt)
    v = torch.full((N,), state.speed, device=dev, dtype=dt)
    target_v = torch.full((N,), state.target_speed, device=dev, dtype=dt)
    target_lane = torch.full((N,), state.target_lane, device=dev, dtype=torch.int64)
    index = {name: i for i, name in enumerate(action_names)}
    half = state.length / 2
    out = torch.empty(N, H, 4, device=dev, dtype=dt)
    for h in range(H):
        a = plans[:, h]
        if "FASTER" in index or "SLOWER" in index:
            step = (a == index.get("FASTER", -1)).to(torch.int64) - (a == index.get("SLOWER", -1)).to(torch.int64)
            moved = step != 0
            new_v = speeds[(speed_to_index(v, state.target_speeds) + step).clamp(0, len(speeds) - 1)]
            target_v = torch.where(moved, new_v, target_v)
        if "LANE_LEFT" in index or "LANE_RIGHT" in index:
            shift = (a == index.get("LANE_RIGHT", -1)).to(torch.int64) - (a == index.get("LANE_LEFT", -1)).to(
                torch.int64)
            # highway-env moves the target lane (not the occupied one) by one, clipped to the road's lanes.
            target_lane = (target_lane + shift).clamp(0, state.lanes - 1)
        centre = (target_lane - state.lane).to(dt) * state.lane_width  # target lane centre, lateral [m]
        for _ in range(frames_per_step):
            lateral_speed = -KP_LATERAL * (y - centre)
            heading_cmd = torch.asin((lateral_speed / _not_zero(v)).clamp(-1, 1)).clamp(-math.pi / 4, math.pi / 4)
            rate = KP_HEADING * _wrap(heading_cmd - psi)
            slip = torch.asin((half / _not_zero(v) * rate).clamp(-1, 1))
            steering = torch.atan(2 * torch.tan(slip)).clamp(-MAX_STEERING_ANGLE, MAX_STEERING_ANGLE)
            accel = KP_A * (target_v - v)
            accel = torch.where(v > MAX_SPEED, torch.minimum(accel, MAX_SPEED - v), accel)
            beta = torch.atan(0.5 * torch.tan(steering))
            x = x + v * torch.cos(psi + beta) * sim_dt
            y = y + v * torch.sin(psi + beta) * sim_dt
            psi = psi + v * torch.sin(beta) / half * sim_dt
            v = v + accel * sim_dt
        out[:, h] = torch.stack([x, y, v * torch.cos(psi), v * torch.sin(psi)], dim=-1)
    # Lane frame -> ego frame: origin at the ego (lateral offset removed), rotated by the lane's heading.
    out[..., 1] -= state.lateral
    c, s = math.cos(state.lane_heading), math.sin(state.lane_heading)
    rot = torch.tensor([[c, -s], [s, c]], device=dev, dtype=dt)
    out[..., :2] = out[..., :2] @ rot.T
    out[..., 2:] = out[..., 2:] @ rot.T
    return out.to(torch.float32)


def _not_zero(v: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    return torch.where(v.abs() > eps, v, torch.full_like(v, eps))


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return (angle + math.pi) % (2 * math.pi) - math.pi
