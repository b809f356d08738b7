"""The ego's own motion under candidate plans: highway-env's MDPVehicle controller under meta-actions, or its
kinematic bicycle under continuous actions (`rollout_ego_continuous`), vectorised in torch.

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


EGO_PATH_CHANNELS = ("x", "y", "vx", "vy", "lane_speed", "target_lane")
"""Channels of `rollout_ego`'s path: x, y [m] and vx, vy [m/s] in the decision's ego frame, the speed along the
lane [m/s] (v cos of the heading relative to the lane) and the target lane id (0 = leftmost)."""
EGO_FIELDS = ("speed", "heading", "lateral", "lane_heading", "lane", "target_lane", "lanes", "lane_width",
              "target_speed", "length")
"""Order of `ego_vector`: EgoState's scalar fields (lane numbers as floats), the target speeds go separately."""


def ego_vector(state: EgoState) -> tuple[torch.Tensor, torch.Tensor]:
    """EgoState as tensors: (len(EGO_FIELDS),) float64 in that order and target_speeds (S,) float64 [m/s]."""
    values = torch.tensor([float(getattr(state, name)) for name in EGO_FIELDS], dtype=torch.float64)
    return values, torch.tensor(state.target_speeds, dtype=torch.float64)


def speed_to_index(speed: torch.Tensor, speeds: torch.Tensor) -> torch.Tensor:
    """Index of the closest allowed speed (highway-env's `MDPVehicle.speed_to_index`, uniform speeds (S,))."""
    if speeds.shape[0] == 1:
        return torch.zeros_like(speed, dtype=torch.int64)
    x = (speed - speeds[0]) / (speeds[-1] - speeds[0])
    return torch.round(x * (speeds.shape[0] - 1)).clamp(0, speeds.shape[0] - 1).to(torch.int64)


def rollout_ego(state: EgoState, plans: torch.Tensor, action_names: list[str], frames_per_step: int,
                sim_dt: float) -> torch.Tensor:
    """Positions and velocities of the ego at the end of each plan step, in the ego frame at the decision.

    plans: (N, H) int64 meta-action indices into `action_names`. Returns (N, H, 6), `EGO_PATH_CHANNELS`: x, y [m]
    and vx, vy [m/s] in the ego frame, the speed along the lane [m/s] and the target lane (what highway-env's
    reward reads: `highway_reward`).
    """
    ego, speeds = ego_vector(state)
    return rollout_ego_tensors(ego.to(plans.device), speeds.to(plans.device), plans, action_names, frames_per_step,
                               sim_dt)


def rollout_ego_tensors(ego: torch.Tensor, speeds: torch.Tensor, plans: torch.Tensor, action_names: list[str],
                        frames_per_step: int, sim_dt: float) -> torch.Tensor:
    """`rollout_ego` on the ego's state as tensors (`ego_vector`): ego (len(EGO_FIELDS),) and target speeds (S,),
    float64. Tensor-only with no data-dependent Python control flow, so it traces into an ONNX graph. Returns (N, H,
    len(EGO_PATH_CHANNELS))."""
    N, H = plans.shape
    dt = torch.float64
    v0, psi0, lateral, lane_heading, lane, lane0, lanes, lane_width, target_v0, length = ego.to(dt).unbind(0)
    speeds = speeds.to(dt)
    zeros = torch.zeros_like(plans[:, 0], dtype=dt)
    x, y, psi, v, target_v = zeros, zeros + lateral, zeros + psi0, zeros + v0, zeros + target_v0
    target_lane = zeros + lane0
    index = {name: i for i, name in enumerate(action_names)}
    half = length / 2
    steps = []
    for h in range(H):
        a = plans[:, h]
        if "FASTER" in index or "SLOWER" in index:
            step = (a == index.get("FASTER", -1)).to(torch.int64) - (a == index.get("SLOWER", -1)).to(torch.int64)
            new_v = speeds[(speed_to_index(v, speeds) + step).clamp(0, speeds.shape[0] - 1)]
            target_v = torch.where(step != 0, new_v, target_v)
        if "LANE_LEFT" in index or "LANE_RIGHT" in index:
            target_lane = torch.minimum(torch.clamp(target_lane + lane_shift(a, action_names).to(dt), min=0.0),
                                        lanes - 1)
        centre = (target_lane - lane) * lane_width  # target lane centre, lateral [m]
        for _ in range(frames_per_step):
            x, y, psi, v = controller_frame(x, y, psi, v, target_v, centre, half, sim_dt)
        steps.append(torch.stack([x, y - lateral, v * torch.cos(psi), v * torch.sin(psi), target_lane], dim=-1))
    out = torch.stack(steps, dim=1)  # (N, H, 5) lane frame, origin at the ego (lateral offset removed)
    # Lane frame -> ego frame: rotated by the lane's heading.
    c, s = torch.cos(lane_heading), torch.sin(lane_heading)
    rot = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    return torch.cat([out[..., :2] @ rot.T, out[..., 2:4] @ rot.T, out[..., 2:3], out[..., 4:]],
                     dim=-1).to(torch.float32)


@dataclass(frozen=True)
class HighwayReward:
    """highway-env's `HighwayEnv` reward (highway-v0, highway-fast-v0; 1.10-1.12) as its config sets it: per policy
    step high_speed x clip((forward speed - low) / (high - low), 0, 1) + right_lane x lane / (lanes - 1)
    (+ collision when crashed), mapped from [collision, high_speed + right_lane] onto [0, 1] when normalised, and
    x 1 on the road."""

    speed_range: tuple[float, float]
    """[m/s] `reward_speed_range`."""
    high_speed: float
    right_lane: float
    collision: float
    normalize: bool


HIGHWAY_REWARD_ENVS = ("highway-v0", "highway-fast-v0")


def highway_reward_spec(env_id: str, config: dict, continuous: bool = False) -> HighwayReward | None:
    """The reward of a highway env with meta-actions from its id and resolved config (the env's `config`, or a
    manifest's `env_config_resolved`); None for any other env (merge, roundabout, intersection pay other terms) and
    for continuous actions (no kinematic meta-action ego to read it from)."""
    if env_id not in HIGHWAY_REWARD_ENVS or continuous:
        return None
    low, high = config["reward_speed_range"]
    return HighwayReward((float(low), float(high)), float(config["high_speed_reward"]),
                         float(config["right_lane_reward"]), float(config["collision_reward"]),
                         bool(config.get("normalize_reward", True)))


def highway_reward(lane_speed: torch.Tensor, target_lane: torch.Tensor, spec: HighwayReward,
                   lanes: torch.Tensor | float, crashed: torch.Tensor | None = None) -> torch.Tensor:
    """The reward the env pays at the end of a policy step, from what HighwayEnv's `_rewards` reads of the ego:
    its speed along the lane [m/s] and its target lane id (0 = leftmost) at the end of the step (`rollout_ego`'s
    channels 4 and 5), on a road of `lanes` lanes; crashed (same shape, bool): the step ends in a crash (without:
    none does). Returns float32 of lane_speed's shape."""
    low, high = spec.speed_range
    speed = ((lane_speed - low) / (high - low)).clamp(0.0, 1.0)
    lane = target_lane / torch.clamp(torch.as_tensor(lanes, dtype=lane_speed.dtype) - 1, min=1.0)
    reward = spec.high_speed * speed + spec.right_lane * lane
    if crashed is not None:
        reward = reward + spec.collision * crashed.to(reward.dtype)
    if spec.normalize:
        reward = (reward - spec.collision) / (spec.high_speed + spec.right_lane - spec.collision)
    return reward.to(torch.float32)


def path_reward(path: torch.Tensor, spec: HighwayReward, lanes: torch.Tensor | float) -> torch.Tensor:
    """`highway_reward` of each step of `rollout_ego`'s path (..., H, len(EGO_PATH_CHANNELS)) without crashes:
    (..., H) float32 (a planner's `EgoReward`)."""
    return highway_reward(path[..., EGO_PATH_CHANNELS.index("lane_speed")],
                          path[..., EGO_PATH_CHANNELS.index("target_lane")], spec, lanes)


def lane_shift(actions: torch.Tensor, action_names: list[str]) -> torch.Tensor:
    """How each meta-action moves the ego's target lane, int64 like `actions`: +1 for LANE_RIGHT, -1 for LANE_LEFT,
    0 otherwise. highway-env moves the target lane (not the occupied one) by one; callers clip it to the road."""
    index = {name: i for i, name in enumerate(action_names)}
    right, left = index.get("LANE_RIGHT", -1), index.get("LANE_LEFT", -1)
    return (actions == right).to(torch.int64) - (actions == left).to(torch.int64)


def controller_frame(x: torch.Tensor, y: torch.Tensor, psi: torch.Tensor, v: torch.Tensor, target_v: torch.Tensor,
                     centre: torch.Tensor, half: torch.Tensor | float, sim_dt: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One simulation frame of highway-env's ControlledVehicle on a straight lane: the lateral and heading
    controllers steer towards the lateral position `centre`, the speed controller towards `target_v`, and the
    kinematic bicycle (wheelbase 2 `half`) moves the vehicle by `sim_dt` [s]. All in a lane frame (x along the lane,
    y to its right [m]; psi [rad] relative to the lane; v [m/s]); broadcasts over any batch shape."""
    lateral_speed = -KP_LATERAL * (y - centre)
    heading_cmd = _asin((lateral_speed / _not_zero(v)).clamp(-1, 1)).clamp(-math.pi / 4, math.pi / 4)
    rate = KP_HEADING * _wrap(heading_cmd - psi)
    sin_beta, cos_beta = _slip(half / _not_zero(v) * rate)
    accel = KP_A * (target_v - v)
    accel = torch.where(v > MAX_SPEED, torch.minimum(accel, MAX_SPEED - v), accel)
    cos_psi, sin_psi = torch.cos(psi), torch.sin(psi)
    x = x + v * (cos_psi * cos_beta - sin_psi * sin_beta) * sim_dt  # v cos(psi + beta) dt
    y = y + v * (sin_psi * cos_beta + cos_psi * sin_beta) * sim_dt
    psi = psi + v * sin_beta / half * sim_dt
    return x, y, psi, v + accel * sim_dt


def rollout_ego_on_path(state: EgoState, path: torch.Tensor, step: float, plans: torch.Tensor,
                        action_names: list[str], frames_per_step: int, sim_dt: float) -> torch.Tensor:
    """The ego on a known path (its route's centre line, `mpc.route_path`) at the speeds highway-env's speed
    controller gives under each plan: a path-speed decomposition, exact in speed on any road shape and within the
    lateral controller's lag of the path. For plans without lane changes.

    path: (P, 2) [m] points every `step` [m] in the ego frame, the first at the ego; plans: (N, H) int64. Returns
    (N, H, 4): x, y [m] and vx, vy [m/s] at the end of each plan step; beyond the path's end the last segment
    continues straight."""
    on_lane = EgoState(speed=state.speed, heading=0.0, lateral=0.0, lane_heading=0.0, lane=0, target_lane=0, lanes=1,
                       lane_width=state.lane_width, target_speed=state.target_speed,
                       target_speeds=state.target_speeds, length=state.length)
    travel = rollout_ego(on_lane, plans, action_names, frames_per_step, sim_dt).to(path.dtype)  # straight lane
    distance, speed = travel[..., 0].clamp_min(0.0), travel[..., 2]  # (N, H) [m], [m/s]
    P = path.shape[0]
    seg = (distance / step).floor().clamp(0, P - 2)
    frac = (distance / step - seg)[..., None]  # > 1 past the end: extrapolates the last segment
    i = seg.to(torch.int64)
    start, end = path[i], path[i + 1]  # (N, H, 2)
    tangent = (end - start) / (end - start).norm(dim=-1, keepdim=True).clamp_min(1e-9)
    return torch.cat([start + frac * (end - start), speed[..., None] * tangent], dim=-1).to(torch.float32)


def rollout_ego_continuous(speed: float, length: float, plans: torch.Tensor,
                           ranges: tuple[tuple[float, float] | None, tuple[float, float] | None],
                           frames_per_step: int, sim_dt: float, speed_limits: tuple[float, float] = (-MAX_SPEED,
                                                                                                     MAX_SPEED)
                           ) -> torch.Tensor:
    """The ego under continuous action plans (highway-env's ContinuousAction), each action held for its policy
    step: `Vehicle.step`'s kinematic bicycle integrated at the simulation rate, from the ego at the decision (the
    origin of the ego frame, heading along x). Exact on any road shape: there is no controller and no lane.

    speed [m/s] and length [m] of the ego; plans: (N, H, D) in [-1, 1]; ranges: (acceleration [m/s^2], steering
    [rad]) ranges that [-1, 1] maps onto, in the plan's column order, None for a component the plans lack (held at
    0); speed_limits [m/s]: `Vehicle.clip_actions`' MIN_SPEED and MAX_SPEED. Returns (N, H, 4): x, y [m] and vx, vy
    [m/s] in the ego frame at the end of each plan step."""
    N, H, _ = plans.shape
    plans = plans.to(torch.float64).clamp(-1.0, 1.0)
    controls, column = [], 0
    for span in ranges:
        if span is None:
            controls.append(plans.new_zeros(N, H))
        else:  # ContinuousAction.get_action's map of [-1, 1] onto the range
            lo, hi = span
            controls.append(lo + (plans[..., column] + 1.0) / 2.0 * (hi - lo))
            column += 1
    acceleration, steering = controls
    beta = torch.atan(0.5 * torch.tan(steering))  # (N, H) slip angle of each step's held steering
    x, y, heading = (plans.new_zeros(N) for _ in range(3))
    v = plans.new_full((N,), float(speed))
    out = []
    for h in range(H):
        for _ in range(frames_per_step):
            a = acceleration[:, h]
            a = torch.where(v > speed_limits[1], torch.minimum(a, speed_limits[1] - v),
                            torch.where(v < speed_limits[0], torch.maximum(a, speed_limits[0] - v), a))
            x = x + v * torch.cos(heading + beta[:, h]) * sim_dt
            y = y + v * torch.sin(heading + beta[:, h]) * sim_dt
            heading = heading + v * torch.sin(beta[:, h]) / (length / 2) * sim_dt
            v = v + a * sim_dt
        out.append(torch.stack([x, y, v * torch.cos(heading), v * torch.sin(heading)], -1))
    return torch.stack(out, 1).to(torch.float32)


_TAN_MAX_STEERING = math.tan(MAX_STEERING_ANGLE)


def _slip(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos of the bicycle model's slip angle beta for highway-env's steering command, without inverse
    trigonometry: the controller asks for slip = asin(q), steers delta = atan(2 tan slip) clipped to
    MAX_STEERING_ANGLE, and the model slips by beta = atan(tan(delta) / 2); so beta = slip unless the clip acts,
    where tan(beta) = tan(MAX_STEERING_ANGLE) / 2. (onnxruntime has no float64 asin / atan / tan kernels.)"""
    q = q.clamp(-1, 1)
    cos_slip = (1 - q * q).sqrt()
    clipped = 2 * q.abs() > _TAN_MAX_STEERING * cos_slip  # |2 tan(slip)| > tan(max steering)
    tan_beta = _TAN_MAX_STEERING / 2
    sin_c, cos_c = tan_beta / math.sqrt(1 + tan_beta ** 2), 1 / math.sqrt(1 + tan_beta ** 2)
    return torch.where(clipped, torch.sign(q) * sin_c, q), torch.where(clipped, torch.full_like(q, cos_c), cos_slip)


def _asin(x: torch.Tensor) -> torch.Tensor:
    """asin of a float64 tensor, computed in float32 (onnxruntime has asin for float32 only; 6e-8 rad)."""
    return torch.asin(x.to(torch.float32)).to(x.dtype)


def _not_zero(v: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    return torch.where(v.abs() > eps, v, torch.full_like(v, eps))


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return (angle + math.pi) % (2 * math.pi) - math.pi
