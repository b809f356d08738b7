"""Ego-centric scene tensors from recorded episodes, for the forecaster and its baselines.

A *scene* is taken at one policy decision s of an episode: the ego and its V nearest tracks (by distance at the
decision frame) with `history_len` past frames, the ego's actions over the next H policy steps, and the future
states of the same agents at each of the next H decisions. Everything is expressed in the ego frame at the decision:
origin at the ego's position, x along its heading, y to its right (highway-env's convention), so a scene does not
depend on where on the map it happened. Agent slot 0 is always the ego; empty slots are masked.

This module turns numpy episodes into numpy arrays; it knows nothing of torch or of models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from drive_mbrl.errors import ConfigError
from drive_mbrl.types import EGO_TRACK, Episode

X, Y, VX, VY, HEADING, LENGTH, WIDTH = range(7)
HIST_FEATURES = ("x", "y", "vx", "vy", "cos_heading", "sin_heading", "length", "width", "lane_offset",
                 "cos_lane", "sin_lane", "present")
"""Per-agent, per-history-frame input features (ego frame; [m], [m/s], unitless). `lane_offset` [m] is the lateral
offset from the agent's lane centre (+ right), `cos_lane`/`sin_lane` the lane's direction in the ego frame."""
PRESENT = HIST_FEATURES.index("present")
TARGET_FEATURES = ("x", "y", "vx", "vy")
"""Predicted per-agent, per-horizon-step quantities (ego frame at the decision; [m], [m/s])."""


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are cut from episodes."""

    agents: int = 8
    """V + 1: the ego plus the V nearest tracks."""
    history_len: int = 5
    """Past frames per agent, the decision frame included."""
    history_stride: int = 1
    """Recorded frames between history frames."""
    horizon: int = 5
    """H: future policy steps predicted (H x policy_dt seconds ahead)."""
    pad_dt: float = 0.0
    """[s] between history frames when absent frames are padded (`pad_history`); 0 leaves them zero."""


@dataclass
class Scenes:
    """A batch of B scenes (numpy). Shapes: B scenes, A = V + 1 agents, L history frames, H horizon steps."""

    history: np.ndarray
    """(B, A, L, len(HIST_FEATURES)) float32, ego frame; zeros where absent (see the present feature)."""
    agent_mask: np.ndarray
    """(B, A) bool: slot holds a track present at the decision frame."""
    actions: np.ndarray
    """(B, H) int64 ego meta-actions over the horizon, -1 after the episode ended; from a continuous-action dataset
    (B, H, D) float32 actions in [-1, 1], NaN after the end (for a forecaster with `action_dim` D)."""
    future: np.ndarray
    """(B, A, H, len(TARGET_FEATURES)) float32 true future in the decision's ego frame; NaN where unknown."""
    future_mask: np.ndarray
    """(B, A, H) bool: the future state is known (track present, episode not ended)."""
    reward: np.ndarray
    """(B, H) float32 env reward of each future step; NaN after the end."""
    crash: np.ndarray
    """(B, H) bool: the ego crashed at the end of that step."""
    step_valid: np.ndarray
    """(B, H) bool: the episode still ran at that step."""
    lane: np.ndarray
    """(B, A, 2) float32 at the decision: lateral offset from the lane centre [m] (+ right) and the lane's heading
    [rad] in the ego frame; 0 where absent."""
    episode: np.ndarray
    """(B,) int64 episode index (for splits by episode)."""
    step: np.ndarray
    """(B,) int64 decision index within its episode (0: the first decision, when every track is one frame old)."""
    track: np.ndarray
    """(B, A) int64 track id of each slot (-1 empty)."""

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def subset(self, index: np.ndarray) -> Scenes:
        return Scenes(**{k: v[index] for k, v in self.__dict__.items()})


def to_ego_frame(state: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Express world-frame states (..., 7) in the frame of `origin` (7,): positions, velocities and heading."""
    cos, sin = np.cos(origin[HEADING]), np.sin(origin[HEADING])
    out = state.copy()
    dx, dy = state[..., X] - origin[X], state[..., Y] - origin[Y]
    out[..., X], out[..., Y] = cos * dx + sin * dy, -sin * dx + cos * dy
    out[..., VX] = cos * state[..., VX] + sin * state[..., VY]
    out[..., VY] = -sin * state[..., VX] + cos * state[..., VY]
    out[..., HEADING] = state[..., HEADING] - origin[HEADING]
    return out


def world_to_ego(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World-frame points (..., 2) [m] in the frame of `pose` (x, y [m], heading [rad]): x forward, y to the
    right, as `to_ego_frame`."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    dx, dy = points[..., 0] - pose[0], points[..., 1] - pose[1]
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy], axis=-1)


def scene_history(state: np.ndarray, present: np.ndarray, lane_offset: np.ndarray, lane_heading: np.ndarray,
                  frame: int, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The input part of the scene at recorded frame `frame`: the ego and its V nearest tracks there.

    state (T, M, 7), present (T, M), lane_offset and lane_heading (T, M) as in `Episode`. Returns history
    (A, L, len(HIST_FEATURES)) float32 in the ego frame at `frame`, track (A,) int64 (-1 empty slot) and lane
    (A, 2) float32 (offset from the lane centre [m], lane heading in the ego frame [rad]). Used for recorded
    episodes and, by planners, for the live recording of the running episode.
    """
    A, L = spec.agents, spec.history_len
    origin = state[frame, EGO_TRACK].astype(np.float64)
    others = np.flatnonzero(present[frame])
    others = others[others != EGO_TRACK]
    dist = np.hypot(state[frame, others, X] - origin[X], state[frame, others, Y] - origin[Y])
    slots = np.concatenate([[EGO_TRACK], others[np.argsort(dist, kind="stable")][: A - 1]]).astype(np.int64)
    track = np.full(A, -1, np.int64)
    track[: len(slots)] = slots
    hist_frames = frame - spec.history_stride * np.arange(L - 1, -1, -1)
    hist = np.zeros((A, L, len(HIST_FEATURES)), np.float32)
    for j, f in enumerate(hist_frames):
        if f < 0:
            continue
        local = to_ego_frame(state[f, slots].astype(np.float64), origin)
        ok = present[f, slots]
        lane_dir = lane_heading[f, slots] - origin[HEADING]
        feats = np.stack([local[:, X], local[:, Y], local[:, VX], local[:, VY], np.cos(local[:, HEADING]),
                          np.sin(local[:, HEADING]), local[:, LENGTH], local[:, WIDTH],
                          lane_offset[f, slots], np.cos(lane_dir), np.sin(lane_dir), ok], axis=-1)
        hist[: len(slots), j] = np.where(ok[:, None], np.nan_to_num(feats), 0.0)
    if spec.pad_dt > 0:
        hist = pad_history(hist, spec.pad_dt)
    lane = np.zeros((A, 2), np.float32)
    lane[: len(slots)] = np.nan_to_num(np.stack(
        [lane_offset[frame, slots], lane_heading[frame, slots] - origin[HEADING]], axis=-1))
    return hist, track, lane


def pad_history(hist: np.ndarray, dt: float) -> np.ndarray:
    """Fill the absent frames of each agent's history (..., L, F) (present feature 0), frames `dt` [s] apart, from
    its next present frame: every feature copied, x moved back at that frame's forward speed vx (constant speed,
    lane held), the present feature left 0 so the model still knows. Agents absent throughout stay zero.

    Zero-filled frames look like a vehicle standing at the ego's origin; a track that appeared a moment ago (every
    vehicle at an episode's start) then reads as a huge acceleration. The padded history is what the
    lane-keeping baseline would have assumed.
    """
    present = hist[..., PRESENT] > 0.5  # (..., L)
    L = present.shape[-1]
    index = np.where(present, np.arange(L), L)
    source = np.minimum.accumulate(index[..., ::-1], axis=-1)[..., ::-1]  # next present frame at or after each
    fill = ~present & (source < L)
    if not fill.any():
        return hist
    out = hist.copy()
    src = np.take_along_axis(hist, np.minimum(source, L - 1)[..., None], axis=-2)  # (..., L, F)
    back = (source - np.arange(L)) * dt  # [s] from the padded frame to its source
    src[..., X] = src[..., X] - src[..., VX] * back
    src[..., PRESENT] = 0.0
    out[fill] = src[fill]
    return out


def episode_scenes(episode: Episode, spec: SceneSpec, frames_per_step: int) -> Scenes:
    """All scenes of one episode, one per policy decision that has at least one history frame."""
    state, present = episode.state, episode.present
    frames = state.shape[0]
    A, H = spec.agents, spec.horizon
    rows: list[dict[str, np.ndarray]] = []
    for s, frame in enumerate(episode.decision_frame):
        origin = state[frame, EGO_TRACK].astype(np.float64)
        hist, track, lane = scene_history(state, present, episode.lane_offset, episode.lane_heading, frame, spec)
        slots = track[track >= 0]

        future = np.full((A, H, len(TARGET_FEATURES)), np.nan, np.float32)
        fmask = np.zeros((A, H), bool)
        for h in range(H):
            f = frame + (h + 1) * frames_per_step
            if s + h >= episode.steps or f >= frames:
                break
            local = to_ego_frame(state[f, slots].astype(np.float64), origin)
            ok = present[f, slots]
            future[: len(slots), h] = np.where(ok[:, None], local[:, [X, Y, VX, VY]], np.nan)
            fmask[: len(slots), h] = ok
        steps = np.arange(s, s + H)
        valid = steps < episode.steps
        clipped = np.minimum(steps, episode.steps - 1)
        rows.append({
            "history": hist, "agent_mask": track >= 0, "track": track, "lane": lane,
            "actions": (np.where(valid[:, None], episode.action[clipped], np.nan).astype(np.float32)
                        if episode.action.ndim == 2 else np.where(valid, episode.action[clipped], -1)),
            "future": future, "future_mask": fmask,
            "reward": np.where(valid, episode.reward[clipped], np.nan).astype(np.float32),
            "crash": valid & episode.crashed[clipped], "step_valid": valid,
            "episode": np.int64(episode.index), "step": np.int64(s),
        })
    return Scenes(**{k: np.stack([r[k] for r in rows]) for k in rows[0]})


def dataset_scenes(episodes: list[Episode], spec: SceneSpec, manifest: dict) -> Scenes:
    """Scenes of every episode of a dataset, concatenated."""
    frames_per_step = round(manifest["policy_dt"] / manifest["dt"])
    if frames_per_step < 1:
        raise ConfigError("dataset dt is longer than its policy dt; re-collect with record_hz=0")
    parts = [episode_scenes(ep, spec, frames_per_step) for ep in episodes if ep.steps > 0]
    return Scenes(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in Scenes.__dataclass_fields__})


def physics_baselines(scenes: Scenes, policy_dt: float) -> dict[str, np.ndarray]:
    """Physics predictions of every slot's future positions, from its state at the decision, in the ego frame.

    Returns name -> (B, A, H, 2) positions [m]:
      - `constant_velocity`: p + v t.
      - `cv_lane_keeping`: constant velocity with the lateral position held: the velocity's component along the
        lane direction u, p + (v . u) t u (the offset from the lane centre stays as it is).
      - `highway_env_constant_speed`: highway-env's own `predict_trajectory_constant_speed`: the current speed
        along the lane centre, p - offset n + |v| t u (n the lane's right normal). Lanes are taken as straight over
        the horizon, which is exact on highway, merge's main road and intersection approaches.
    """
    H = scenes.future.shape[2]
    t = (np.arange(1, H + 1) * policy_dt)[:, None]  # (H, 1)
    p = scenes.history[:, :, -1, None, 0:2]  # (B, A, 1, 2)
    v = scenes.history[:, :, -1, None, 2:4]
    offset, psi = scenes.lane[..., 0, None, None], scenes.lane[..., 1]
    u = np.stack([np.cos(psi), np.sin(psi)], axis=-1)[:, :, None]  # (B, A, 1, 2)
    n = np.stack([-np.sin(psi), np.cos(psi)], axis=-1)[:, :, None]
    v_lon = (v * u).sum(-1, keepdims=True)
    speed = np.linalg.norm(v, axis=-1, keepdims=True)
    return {
        "constant_velocity": p + v * t,
        "cv_lane_keeping": p + v_lon * t * u,
        "highway_env_constant_speed": p - offset * n + speed * t * u,
    }


def history_stride(history_dt: float, frame_dt: float) -> int:
    """Recorded frames per history step; raises ConfigError unless `history_dt` [s] is a whole multiple of the
    recording's `frame_dt` [s]."""
    stride = history_dt / frame_dt
    if abs(stride - round(stride)) > 1e-6 or round(stride) < 1:
        raise ConfigError(f"the model's history step ({history_dt} s) is not a multiple of the recording's frame "
                          f"time ({frame_dt} s): record with record_hz=0")
    return int(round(stride))


def live_history(recorder: Any, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The scene at the newest frame of a running episode's track recording (duck-typed: `frames` and
    `arrays(frames)` as in tracking.TrackRecorder): history (A, L, F), track (A,), lane (A, 2) as
    `scene_history`, plus the recorder arrays of the history window (for lane ids)."""
    last = recorder.frames - 1
    window = [int(f) for f in last - spec.history_stride * np.arange(spec.history_len - 1, -1, -1) if f >= 0]
    arrays = recorder.arrays(window)
    history, track, lane = scene_history(arrays["state"], arrays["present"], arrays["lane_offset"],
                                         arrays["lane_heading"], len(window) - 1, replace(spec, history_stride=1))
    return history, track, lane, arrays


POLICY_FEATURES = (*HIST_FEATURES, "dvx", "dvy")
"""Per-slot features of the policy's observation: the scene features at the decision frame plus the change of
velocity [m/s] since the previous history frame (0 where the slot was absent at either)."""
POLICY_EGO_FEATURES = ("lane", "target_speed")
"""After the slots: the ego's lane number (0 = leftmost) and, for policies with set-points, its target speed [m/s]
(the set-point FASTER / SLOWER move; what the planner knows of the ego and its tracks do not show)."""
DEFAULT_TARGET_SPEEDS = (20.0, 25.0, 30.0)
"""[m/s] highway-env's MDPVehicle.DEFAULT_TARGET_SPEEDS: what FASTER / SLOWER choose from unless the scenario's
action config sets `target_speeds`."""
ROUTE_POLYLINE_STEP = 1.0
"""[m] between the points of `route_polyline`."""
ROUTE_POLYLINE_MAX = 1000.0
"""[m] `route_polyline` stops here (a route on a road with a cycle, such as a roundabout's ring, has no end)."""


def next_route_lane(network: Any, index: tuple, route: list) -> tuple | None:
    """The lane after `index` on highway-env's road `network` along `route` (popped as it is followed, so pass a
    copy, never the vehicle's own), or None at a dead end (highway-env's `next_lane` then returns `index`)."""
    lane = network.get_lane(index)
    following = network.next_lane(index, route=route, position=lane.position(lane.length, 0))
    return None if following == index else following


def route_polyline(env: Any) -> np.ndarray:
    """(P, 2) [m] the centre line of the ego's route as highway-env holds it now (`ControlledVehicle.route`, read
    at the episode's reset): from the start of the ego's lane through the route's lanes to the last one's end, a
    point every `ROUTE_POLYLINE_STEP` m (and each lane's end), world frame, at most `ROUTE_POLYLINE_MAX` m long.
    Without a planned route (highway) it follows the road on from the ego's lane. Numpy only."""
    base = env.unwrapped
    ego, network = base.vehicle, base.road.network
    index, route = ego.lane_index, list(ego.route or [])  # next_lane pops the route it is given
    planned = bool(route)
    points: list[np.ndarray] = []
    while True:
        lane = network.get_lane(index)
        room = ROUTE_POLYLINE_MAX - len(points) * ROUTE_POLYLINE_STEP
        points += [lane.position(s, 0) for s in np.arange(0.0, min(lane.length, room), ROUTE_POLYLINE_STEP)]
        end = lane.position(min(lane.length, room), 0)
        following = next_route_lane(network, index, route)
        # the route's last lane, a dead end, or far enough (a route-less ring)
        if (planned and not route) or following is None or room <= lane.length:
            return np.asarray([*points, end], np.float64)
        index = following


def route_ahead(polyline: np.ndarray, pose: np.ndarray, ahead: tuple[float, ...]) -> np.ndarray:
    """(2K,) float32: x, y [m] in the ego frame of `pose` (x, y [m], heading [rad], world frame) of the points
    `ahead` (K,) [m] along `polyline` (P, 2), P >= 2, measured from the ego's projection onto it; past the
    polyline's end its last segment continues straight. What the ego's route does ahead (where it turns), which
    the tracks around it do not show."""
    seg = np.diff(polyline, axis=0)  # (P-1, 2)
    length = np.hypot(seg[:, 0], seg[:, 1])
    cum = np.concatenate([[0.0], np.cumsum(length)])
    rel = np.asarray(pose[:2], np.float64) - polyline[:-1]
    t = np.clip((rel * seg).sum(1) / np.maximum(length**2, 1e-12), 0.0, 1.0)
    gap = np.hypot(*(rel - t[:, None] * seg).T)
    k = int(np.argmin(gap))
    target = cum[k] + t[k] * length[k] + np.asarray(ahead, np.float64)  # (K,) arc length
    points = np.stack([np.interp(target, cum, polyline[:, 0]), np.interp(target, cum, polyline[:, 1])], -1)
    beyond = np.maximum(target - cum[-1], 0.0)[:, None]
    points = points + beyond * seg[-1] / max(length[-1], 1e-12)
    return world_to_ego(points, pose).reshape(-1).astype(np.float32)


def route_feature_names(ahead: tuple[float, ...]) -> tuple[str, ...]:
    """Names of `route_ahead`'s columns in the policy's observation."""
    return tuple(f"route_{axis}_{d:g}m" for d in ahead for axis in ("x", "y"))


def policy_observation(history: np.ndarray, ego_lane: np.ndarray | int,
                       target_speed: np.ndarray | float | None = None) -> np.ndarray:
    """The reactive policy's observation, from a two-frame scene history (ego frame, slot 0 the ego).

    history (..., A, 2, len(HIST_FEATURES)) float32, ego_lane (...) the ego's lane number within its road edge
    (0 = leftmost, highway-env's lane_index[2]), target_speed (...) [m/s] the ego's set-point or None. Returns
    (..., policy_obs_dim(A, target_speed is not None)) float32: every slot's `POLICY_FEATURES` flattened
    slot-major, then `POLICY_EGO_FEATURES` (the target speed only when given). Numpy only (the onboard runner uses
    it).
    """
    last, prev = history[..., -1, :], history[..., -2, :]
    both = (last[..., -1] > 0.5) & (prev[..., -1] > 0.5)
    dv = np.where(both[..., None], last[..., VX:VY + 1] - prev[..., VX:VY + 1], 0.0)
    slots = np.concatenate([last, dv], axis=-1)
    flat = slots.reshape(*slots.shape[:-2], -1)
    ego = [ego_lane] if target_speed is None else [ego_lane, target_speed]
    column = np.zeros(flat.shape[:-1] + (1,), np.float32)
    ego_cols = [np.asarray(v, dtype=np.float32)[..., None] + column for v in ego]
    return np.concatenate([flat, *ego_cols], axis=-1).astype(np.float32)


def live_policy_observation(recorder: Any, spec: SceneSpec, target_speed: float | None = None,
                            route: np.ndarray | None = None, ahead: tuple[float, ...] = ()) -> np.ndarray:
    """(D,) the policy's observation at the newest frame of a running episode's track recording (`live_history`
    with `spec.history_len` 2) and the ego's live target speed [m/s] (None: a policy without set-points), then
    `route_ahead` on the ego's `route_polyline` at the `ahead` distances (policies that observe their route):
    what `agent=policy`, `agent=onnx` and RLlib's real env all feed the policy."""
    history, _, _, arrays = live_history(recorder, spec)
    obs = policy_observation(history, int(arrays["lane_id"][-1, EGO_TRACK]), target_speed)
    if not ahead:
        return obs
    pose = arrays["state"][-1, EGO_TRACK, [X, Y, HEADING]].astype(np.float64)
    return np.concatenate([obs, route_ahead(route, pose, ahead)])


def policy_ego_features(set_points: bool) -> tuple[str, ...]:
    """The `POLICY_EGO_FEATURES` a policy observes (the target speed only with set-points)."""
    return POLICY_EGO_FEATURES if set_points else POLICY_EGO_FEATURES[:1]


def policy_obs_dim(agents: int, set_points: bool = True, route_points: int = 0) -> int:
    return agents * len(POLICY_FEATURES) + len(policy_ego_features(set_points)) + 2 * route_points


def live_target_speed(env: Any, set_points: bool) -> float | None:
    """The live ego's target speed [m/s] (highway-env's MDPVehicle), or None for a policy without set-points: the
    one read of the set-point for every live observer (agent=policy, agent=onnx, RLlib's real env)."""
    return float(env.unwrapped.vehicle.target_speed) if set_points else None


def scenario_target_speeds(env_config: dict[str, Any]) -> tuple[float, ...]:
    """[m/s] the discrete target speeds of a scenario's ego (its resolved env config: a manifest's
    `env_config_resolved`)."""
    speeds = (env_config.get("action") or {}).get("target_speeds")
    return tuple(float(v) for v in speeds) if speeds is not None else DEFAULT_TARGET_SPEEDS


def speed_index(speed: np.ndarray | float, target_speeds: tuple[float, ...]) -> np.ndarray:
    """Index of the target speed nearest to `speed` [m/s] (highway-env's MDPVehicle.speed_to_index: uniform
    spacing assumed)."""
    n = len(target_speeds)
    if n == 1:  # a single set-point: index 0 whatever the speed
        return np.zeros(np.shape(speed), np.int64)
    x = (np.asarray(speed, np.float64) - target_speeds[0]) / (target_speeds[-1] - target_speeds[0])
    return np.clip(np.round(x * (n - 1)), 0, n - 1).astype(np.int64)


def next_target_speed(target_speed: np.ndarray | float, speed: np.ndarray | float, action: np.ndarray | int,
                      action_names: list[str] | tuple[str, ...], target_speeds: tuple[float, ...]) -> np.ndarray:
    """The ego's set-point after a meta-action, as highway-env's MDPVehicle.act sets it: FASTER / SLOWER take the
    target speed one above / below the one nearest to the current `speed` [m/s] (clipped to the list); every other
    action keeps `target_speed`. Broadcasts over arrays of envs."""
    grid = np.asarray(target_speeds, np.float64)
    base = speed_index(speed, target_speeds)
    action = np.asarray(action)
    step = np.zeros(np.broadcast(base, action).shape, np.int64)
    for name, delta in (("FASTER", 1), ("SLOWER", -1)):
        if name in action_names:
            step = np.where(action == action_names.index(name), delta, step)
    moved = grid[np.clip(base + step, 0, len(grid) - 1)]
    return np.where(step != 0, moved, np.asarray(target_speed, np.float64))


def episode_target_speeds(episode: Episode, manifest: dict[str, Any]) -> np.ndarray:
    """(S,) float32 [m/s] the ego's target speed at each decision of a recorded episode, before its action:
    replayed from the recorded speeds and actions (the ego starts at the target speed nearest to its speed, as
    MDPVehicle quantises its initial speed). `manifest` is the dataset's (action names, env config)."""
    grid = scenario_target_speeds(manifest.get("env_config_resolved", {}))
    names = list(manifest["action_names"])
    speed = np.hypot(episode.state[:, EGO_TRACK, VX], episode.state[:, EGO_TRACK, VY]).astype(np.float64)
    out = np.zeros(episode.steps, np.float32)
    current = float(grid[int(speed_index(speed[0], grid))])
    for s, frame in enumerate(episode.decision_frame):
        out[s] = current
        current = float(next_target_speed(current, speed[frame], episode.action[s], names, grid))
    return out


def episode_policy_obs(episode: Episode, spec: SceneSpec, manifest: dict[str, Any] | None = None,
                       route: np.ndarray | None = None, ahead: tuple[float, ...] = ()) -> np.ndarray:
    """(S, D) policy observations at each decision of a recorded episode (`spec.history_len` must be 2). With the
    dataset's `manifest`, the ego's target speed (`episode_target_speeds`) is appended (policies with set-points);
    with `ahead`, `route_ahead` on the episode's `route` polyline (as `live_policy_observation`)."""
    if spec.history_len != 2:
        raise ConfigError(f"the policy observes two history frames, the spec has {spec.history_len}")
    target = episode_target_speeds(episode, manifest) if manifest is not None else None
    rows = []
    for s, frame in enumerate(episode.decision_frame):
        hist, _, _ = scene_history(episode.state, episode.present, episode.lane_offset, episode.lane_heading,
                                   int(frame), spec)
        row = policy_observation(hist, int(episode.lane_id[frame, EGO_TRACK]), None if target is None else target[s])
        if ahead:
            pose = episode.state[frame, EGO_TRACK, [X, Y, HEADING]].astype(np.float64)
            row = np.concatenate([row, route_ahead(route, pose, ahead)])
        rows.append(row)
    if rows:
        return np.stack(rows)
    return np.zeros((0, policy_obs_dim(spec.agents, manifest is not None, len(ahead))), np.float32)
