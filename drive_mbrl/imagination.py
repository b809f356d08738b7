"""The two gymnasium environments the reactive policy trains on, with the same observation and action spaces:

- `PolicyEnv`: the real scenario (highway-env) seen through the project's own perception — the track recorder
  and `features.policy_observation` — so a policy trained here drives `agent=policy` unchanged.
- `ImaginationEnv`: the learned forecaster as a batched `gymnasium.vector.VectorEnv` (Dyna). Every rollout starts
  from a real recorded scene and rolls forward with the model, one policy step per call for all B envs at once.

Imagination, per step and env (all envs in one batched forecaster call):
  1. the newest `history_len` frames of every agent, expressed in the ego's current frame, go into the
     forecaster with the plan [action, IDLE, ...]; every member predicts every agent one policy step ahead;
  2. the rollout's own member (drawn at reset: trajectory sampling, as in PETS) and one mode per agent (drawn by
     its probability; the ego's most likely mode, which only `ego_model="learned"` uses) give the agents' next
     positions and velocities (the mode's mean); the frames in between are
     filled by cubic Hermite interpolation (positions and velocities at both ends), headings follow the velocity,
     lane offsets follow the lateral motion (straight lanes of `lane_width`, lane numbers change at lane edges).
     With `ego_model="kinematic"` (`auto`, the default, picks it where the road has `lanes_count`) the ego's own
     frames come instead from highway-env's controller and kinematic bicycle under the meta-action
     (`egomotion.controller_frame`, the equations the planner's ego uses): the model cannot then imagine the ego
     braking or swerving on its own, which the policy would otherwise learn to exploit;
  3. reward = the chosen member's reward head (which learned highway-env's reward on crash steps too), or with the
     kinematic ego on a highway scenario (`reward="kinematic"`) highway-env's own reward formula on the ego's speed
     and target lane (`egomotion.highway_reward`); the rollout ends in a crash (terminated) when the ego's box
     (grown by `crash_margin`) overlaps another agent's at any new frame, or with the probability the member's
     crash head gives for this step (`crash_head`: the learned signal also sees crashes that the mean trajectories
     miss);
  4. model uncertainty is not ignored: when the members disagree more than the calibrated `uncertainty_level`
     quantile (stored in the checkpoint by `fit`), the rollout is truncated there, and an optional penalty
     (`uncertainty_penalty` x disagreement / limit) is subtracted from the reward;
  5. rollouts are truncated after `horizon` steps. Autoreset follows gymnasium's next-step rule.

Shapes: B envs, A agents (slot 0 the ego), W stored frames, F = len(HIST_FEATURES). Positions [m] and velocities
[m/s] of the stored frames are kept in the frame of the rollout's start scene (ego frame at the start).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from drive_mbrl.egomotion import controller_frame, highway_reward, highway_reward_spec, lane_shift
from drive_mbrl.features import (
    EGO_TRACK,
    HIST_FEATURES,
    SceneSpec,
    episode_target_speeds,
    history_stride,
    live_policy_observation,
    live_target_speed,
    next_target_speed,
    policy_obs_dim,
    policy_observation,
    scenario_target_speeds,
    scene_history,
)
from drive_mbrl.forecaster import UNCERTAINTY_LEVELS, low_precision, native_precision, plan_uncertainty, with_ego

X, Y, VX, VY, COS, SIN, LEN, WID, OFFSET, COS_LANE, SIN_LANE, PRESENT = range(len(HIST_FEATURES))


def observation_space(agents: int, set_points: bool = True) -> gym.spaces.Box:
    return gym.spaces.Box(-np.inf, np.inf, (policy_obs_dim(agents, set_points),), np.float32)


class PolicyEnv(gym.Env):
    """A scenario's real env with the policy's observation. env_config: scenario (name or path), agents (V + 1),
    history_dt [s] (the policy's frame gap), set_points (the ego's target speed observed; default true),
    seed_offset (the first reset's seed unless one is given; each reset without a seed takes the one after the
    last)."""

    def __init__(self, config: dict[str, Any] | None = None):
        from drive_mbrl.rollout import recording_stride
        from drive_mbrl.scenarios import env_timing, load_scenario, make_env
        from drive_mbrl.tracking import TrackRecorder

        config = dict(config or {})
        self.scenario = load_scenario(config.get("scenario", "highway"))
        self.env = make_env(self.scenario)
        sim_hz, policy_hz = env_timing(self.env)
        self.recorder = TrackRecorder(self.scenario.perception_range, recording_stride(sim_hz, policy_hz, 0),
                                      1.0 / sim_hz)
        agents = int(config.get("agents", 8))
        self.scene_spec = SceneSpec(agents=agents, history_len=2, history_stride=history_stride(
            float(config.get("history_dt", 1.0)), self.recorder.frame_dt), horizon=1)
        self.set_points = bool(config.get("set_points", True))
        self.observation_space = observation_space(agents, self.set_points)
        self.action_space = self.env.action_space
        self._next_seed = int(config.get("seed_offset", 0))

    def _obs(self) -> np.ndarray:
        return live_policy_observation(self.recorder, self.scene_spec, live_target_speed(self.env, self.set_points))

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        from drive_mbrl.scenarios import reset_env

        super().reset(seed=seed)
        if seed is None:
            seed = self._next_seed
        self._next_seed = int(seed) + 1  # later resets without a seed go on from here
        reset_env(self.env, int(seed))
        self.recorder.attach(self.env)
        return self._obs(), {"seed": int(seed)}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        _, reward, terminated, truncated, info = self.env.step(int(action))
        crashed = bool(self.env.unwrapped.vehicle.crashed)
        return self._obs(), float(reward), bool(terminated), bool(truncated), {"crashed": crashed,
                                                                                "speed": float(info.get("speed", 0))}

    def close(self) -> None:
        self.env.close()


@dataclass(frozen=True)
class ImaginationConfig:
    checkpoint: str
    """Forecaster checkpoint folder."""
    datasets: tuple[str, ...]
    """Recorded episodes whose decisions are the start states."""
    horizon: int = 10
    """Imagined policy steps per rollout at most."""
    uncertainty_level: float = 0.99
    """Calibrated disagreement quantile (one of forecaster.UNCERTAINTY_LEVELS) beyond which a rollout stops."""
    uncertainty_penalty: float = 0.0
    """Reward penalty per unit of disagreement / limit."""
    crash_head: bool = True
    """Also end rollouts in a crash with the forecaster's predicted crash probability of the step."""
    lane_width: float = 4.0
    """[m] lane width of the scenario's straight lanes (highway-env's default)."""
    agents: int = 8
    """Slots of the policy's observation (the forecaster's agents are used for the model)."""
    policy_history_dt: float = 1.0
    set_points: bool = True
    """The observation ends with the ego's target speed, replayed from the actions as highway-env sets it."""
    seed: int = 0
    device: str = "cpu"
    """Where the model and the envs' state live: cpu, cuda, or auto (CUDA when present)."""
    ego_model: str = "auto"
    """The ego's own motion: `learned` (the forecaster's prediction for the ego), `kinematic` (highway-env's
    controllers under the meta-action on straight lanes, as the planner's default ego; needs the scenario's
    `lanes_count`) or `auto` (kinematic where the scenario has `lanes_count`, else learned)."""
    reward: str = "learned"
    """The reward: `learned` (the member's reward head) or `kinematic` (highway-env's HighwayEnv reward on the
    kinematic ego's speed and target lane, with the collision term on imagined crashes: `egomotion.highway_reward`;
    needs the kinematic ego on a highway-v0 / highway-fast-v0 scenario). The learned head trained the safer policy
    on highway (2026-11-27, three seeds: 1-4 % real crashes against 10-28 %): the exact formula pays PPO for speed
    in full, and the crashes it then met on the real road were ones the imagination did not show."""
    crash_margin: tuple[float, float] = (0.0, 0.0)
    """[m] added to the sums of half lengths and half widths before the ego's box counts as overlapping another
    (0: the boxes themselves)."""
    precision: str = "auto"
    """The forecaster's network: fp32, bf16 (`forecaster.low_precision`: about 2.5x the imagined steps/s on a
    CPU with native bfloat16 matmuls; inputs, outputs and the env's state stay fp32), or auto (bf16 where the
    device has native bfloat16 matmuls: `forecaster.native_precision`)."""


def start_states(paths: tuple[str, ...] | list[str], agents: int, window: int, frame_dt: float, pad: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every decision of the datasets as a start state: history (N, A, W, F) in the ego frame at the decision
    with frames `frame_dt` [s] apart (absent frames padded as `features.pad_history` when `pad`, else zero), the
    ego's lane number (N,) and its target speed (N,) [m/s]."""
    from drive_mbrl.data import load_dataset

    hist, lanes, targets = [], [], []
    for path in paths:
        manifest, episodes = load_dataset(Path(path))
        spec = SceneSpec(agents=agents, history_len=window, history_stride=history_stride(frame_dt, manifest["dt"]),
                         horizon=1, pad_dt=frame_dt if pad else 0.0)
        for ep in episodes:
            target = episode_target_speeds(ep, manifest)
            for s, frame in enumerate(ep.decision_frame):
                if ep.crashed[:s].any():  # the state just before a crash is a start too
                    break
                h, _, _ = scene_history(ep.state, ep.present, ep.lane_offset, ep.lane_heading, int(frame), spec)
                hist.append(h)
                lanes.append(int(ep.lane_id[frame, EGO_TRACK]))
                targets.append(target[s])
    if not hist:
        raise ValueError(f"no start states in {list(paths)}")
    return np.stack(hist), np.asarray(lanes, np.int64), np.asarray(targets, np.float64)


def ego_controls(datasets: tuple[str, ...] | list[str]) -> tuple[list[str], tuple[float, ...]]:
    """Action names and the ego's target speeds [m/s] of the first dataset's scenario (from its manifest); IDLE
    must be among the actions (the imagined plan after its first step)."""
    from drive_mbrl.data import read_manifest

    manifest = read_manifest(Path(datasets[0]))
    names = list(manifest["action_names"])
    if "IDLE" not in names:
        raise ValueError(f"dataset {datasets[0]} has no IDLE action ({names})")
    return names, scenario_target_speeds(manifest.get("env_config_resolved", {}))


def ego_road(datasets: tuple[str, ...] | list[str]) -> tuple[int | None, int, float]:
    """What the kinematic ego needs of the first dataset's scenario (its manifest): the number of lanes (None when
    the scenario sets no `lanes_count`: not a straight multi-lane road), the simulation frames per policy step and
    the simulation step [s]."""
    from drive_mbrl.data import read_manifest

    manifest = read_manifest(Path(datasets[0]))
    lanes = manifest.get("env_config_resolved", {}).get("lanes_count")
    sim_hz = int(manifest["simulation_hz"])
    return None if lanes is None else int(lanes), round(sim_hz * float(manifest["policy_dt"])), 1.0 / sim_hz


def dataset_reward(datasets: tuple[str, ...] | list[str]) -> Any:
    """The `egomotion.HighwayReward` of the first dataset's scenario (its manifest), or None where it is not a
    highway env with meta-actions."""
    from drive_mbrl.data import read_manifest

    manifest = read_manifest(Path(datasets[0]))
    return highway_reward_spec(manifest["scenario"]["env_id"], manifest.get("env_config_resolved", {}),
                               manifest.get("action_space") == "continuous")


def hermite(p0: torch.Tensor, v0: torch.Tensor, p1: torch.Tensor, v1: torch.Tensor, s: torch.Tensor,
            T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Hermite positions and velocities at fractions s (S,) of a step of T [s] between states (p0, v0) and
    (p1, v1), each (..., 2). Returns (..., S, 2) twice; exact for constant acceleration."""
    s = s[:, None]
    p0, v0, p1, v1 = (x[..., None, :] for x in (p0, v0, p1, v1))
    pos = (2 * s**3 - 3 * s**2 + 1) * p0 + (s**3 - 2 * s**2 + s) * T * v0 + (-2 * s**3 + 3 * s**2) * p1 \
        + (s**3 - s**2) * T * v1
    vel = ((6 * s**2 - 6 * s) * p0 + (-6 * s**2 + 6 * s) * p1) / T + (3 * s**2 - 4 * s + 1) * v0 \
        + (3 * s**2 - 2 * s) * v1
    return pos, vel


def rotate(xy: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate vectors (..., 2) by angle (...) [rad] (counter-clockwise in x-y)."""
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    return torch.cat([c * xy[..., :1] - s * xy[..., 1:], s * xy[..., :1] + c * xy[..., 1:]], dim=-1)


class ImaginationEnv(gym.vector.VectorEnv):
    """The learned model as B batched envs (see the module docstring)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: ImaginationConfig, num_envs: int,
                 starts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        from drive_mbrl.fit import load_forecaster, resolve_device
        from drive_mbrl.runtime import keep_freed_memory

        keep_freed_memory()  # RLlib's env runners are processes of their own
        self.config = config
        self.dev = dev = resolve_device(config.device)
        self.model, meta = load_forecaster(config.checkpoint, dev)
        self.precision = native_precision(config.precision, dev)
        self.model = low_precision(self.model, self.precision)
        mc = self.model.config
        self.frame_dt = float(meta["history_dt"])
        self.sub = history_stride(mc.policy_dt, self.frame_dt)
        """Stored frames per policy step."""
        self.gap = history_stride(config.policy_history_dt, self.frame_dt)
        self.W = max(mc.history_len, self.gap + 1)
        self.A = mc.agents
        if config.agents > self.A:
            raise ValueError(f"the policy observes {config.agents} slots, the forecaster only {self.A}")
        hist, lanes, target = starts if starts is not None else start_states(config.datasets, self.A, self.W,
                                                                             self.frame_dt, mc.pad_history)
        self.starts_hist, self.starts_lane = torch.as_tensor(hist, device=dev), torch.as_tensor(lanes, device=dev)
        self.starts_target = np.asarray(target, np.float64)
        """(N,) [m/s] the ego's target speed at each start (kept on the CPU: numpy bookkeeping)."""
        limit = self.model.uncertainty_quantiles[0, UNCERTAINTY_LEVELS.index(config.uncertainty_level)]
        self.dis_limit = float(limit)
        self.num_envs = num_envs
        self.single_observation_space = observation_space(config.agents, config.set_points)
        self.single_action_space = gym.spaces.Discrete(mc.num_actions)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.names, self.target_speeds = ego_controls(config.datasets)
        self.idle = self.names.index("IDLE")
        if config.ego_model not in ("auto", "learned", "kinematic"):
            raise ValueError(f"ego_model must be auto, learned or kinematic, got {config.ego_model!r}")
        self.lanes, self.frames_per_step, self.sim_dt = ego_road(config.datasets)
        if config.ego_model == "kinematic" and self.lanes is None:
            raise ValueError(f"ego_model=kinematic needs a straight multi-lane road (lanes_count in the scenario's "
                             f"env config), and {config.datasets[0]}'s scenario has none: use ego_model=learned")
        self.ego_model = "learned" if config.ego_model == "learned" or self.lanes is None else "kinematic"
        """The ego's motion in effect (`ImaginationConfig.ego_model` with auto resolved)."""
        if config.reward not in ("learned", "kinematic"):
            raise ValueError(f"reward must be learned or kinematic, got {config.reward!r}")
        spec = dataset_reward(config.datasets) if self.ego_model == "kinematic" else None
        if config.reward == "kinematic" and spec is None:
            raise ValueError(f"reward=kinematic needs the kinematic ego on a highway-v0 / highway-fast-v0 scenario "
                             f"with meta-actions ({config.datasets[0]}'s is not, or the ego is learned): use "
                             f"reward=learned")
        self.reward_spec = None if config.reward == "learned" else spec
        """The HighwayReward in effect, or None for the learned reward head."""
        self.crash_margin = torch.tensor(config.crash_margin, device=dev)
        if self.ego_model == "kinematic" and self.frames_per_step % self.sub:
            raise ValueError(f"{self.frames_per_step} simulation frames per step cannot be stored as {self.sub} "
                             f"frames: choose a history_dt that divides the simulation step")
        self.gen = torch.Generator(device=dev).manual_seed(config.seed)
        B, A, W = num_envs, self.A, self.W
        self.pos = torch.zeros(B, A, W, 2, device=dev)
        self.vel = torch.zeros(B, A, W, 2, device=dev)
        self.present = torch.zeros(B, A, W, dtype=torch.bool, device=dev)
        self.offset = torch.zeros(B, A, W, device=dev)
        self.size = torch.zeros(B, A, 2, device=dev)
        self.lane_dir = torch.zeros(B, A, device=dev)
        self.lane = torch.zeros(B, dtype=torch.long, device=dev)
        self.target_lane = torch.zeros(B, dtype=torch.long, device=dev)
        """The ego's target lane (kinematic ego): its lane at the start, moved by LANE_LEFT / LANE_RIGHT."""
        self.lane_speed = torch.zeros(B, device=dev)
        """[m/s] the kinematic ego's speed along its lane at the end of the last step."""
        self.target = np.zeros(B, np.float64)
        self.member = torch.zeros(B, dtype=torch.long, device=dev)
        self.t = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)

    # -- state <-> features ------------------------------------------------------------------------------------
    def _load(self, envs: torch.Tensor) -> None:
        """Reset `envs` (indices) to random start states."""
        pick = torch.randint(len(self.starts_lane), (len(envs),), generator=self.gen, device=self.dev)
        h = self.starts_hist[pick]  # (n, A, W, F) ego frame at the start = this rollout's reference frame
        self.pos[envs], self.vel[envs] = h[..., X:Y + 1], h[..., VX:VY + 1]
        self.present[envs] = h[..., PRESENT] > 0.5
        self.offset[envs] = h[..., OFFSET]
        self.size[envs] = h[:, :, -1, LEN:WID + 1]
        self.lane_dir[envs] = torch.atan2(h[:, :, -1, SIN_LANE], h[:, :, -1, COS_LANE])
        self.lane[envs] = self.starts_lane[pick]
        self.target_lane[envs] = self.starts_lane[pick]
        self.target[envs.cpu().numpy()] = self.starts_target[pick.cpu().numpy()]
        self.member[envs] = torch.randint(self.model.config.members, (len(envs),), generator=self.gen,
                                          device=self.dev)
        self.t[envs] = 0
        self.done[envs] = False

    def _heading(self) -> torch.Tensor:
        """(B, A, W) heading [rad] in the reference frame from the velocity (0 when nearly stopped)."""
        return torch.atan2(self.vel[..., 1], self.vel[..., 0]) * (self.vel.norm(dim=-1) > 0.1)

    def _features(self, frames: list[int], pad: bool = False) -> torch.Tensor:
        """(B, A, len(frames), F) scene features of the stored frames in the ego's current frame; absent frames
        zero, or when `pad` as stored (the start states' padding, `features.pad_history`) for agents present now."""
        heading = self._heading()
        origin, yaw = self.pos[:, 0, -1], heading[:, 0, -1]  # (B, 2), (B,)
        idx = torch.as_tensor(frames, device=self.dev)
        pos = rotate(self.pos[:, :, idx] - origin[:, None, None], -yaw[:, None, None])
        vel = rotate(self.vel[:, :, idx], -yaw[:, None, None])
        rel = heading[:, :, idx] - yaw[:, None, None]
        lane = (self.lane_dir - yaw[:, None])[:, :, None].expand_as(rel)
        size = self.size[:, :, None].expand(-1, -1, len(frames), -1)
        feats = torch.cat([pos, vel, torch.cos(rel)[..., None], torch.sin(rel)[..., None], size,
                           self.offset[:, :, idx, None], torch.cos(lane)[..., None], torch.sin(lane)[..., None],
                           self.present[:, :, idx, None].float()], dim=-1)
        return feats * (self.present[:, :, -1:, None] if pad else self.present[:, :, idx, None])

    def _observe(self) -> np.ndarray:
        """The policy's observation of every env, its slots chosen as on the road (`features.scene_history`): the
        ego, then the present agents nearest first at the newest frame (the start scene's order drifts as the
        rollout goes on), then the empty slots; the first `config.agents` of them."""
        hist = self._features([self.W - 1 - self.gap, self.W - 1])  # (B, A, 2, F)
        dist = torch.where(self.present[:, 1:, -1], hist[:, 1:, -1, X:Y + 1].norm(dim=-1), torch.inf)  # (B, A-1)
        order = torch.cat([torch.zeros_like(dist[:, :1], dtype=torch.long),
                           torch.argsort(dist, dim=1, stable=True) + 1], dim=1)[:, : self.config.agents]
        hist = hist.gather(1, order[:, :, None, None].expand(-1, -1, *hist.shape[2:]))
        return policy_observation(hist.cpu().numpy(), self.lane.cpu().numpy(),
                                  self.target if self.config.set_points else None)

    # -- gymnasium API -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self.gen.manual_seed(int(seed))
        self._load(torch.arange(self.num_envs, device=self.dev))
        return self._observe(), {}

    @torch.no_grad()
    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = torch.as_tensor(np.asarray(actions), dtype=torch.long, device=self.dev).reshape(self.num_envs)
        B, A, mc = self.num_envs, self.A, self.model.config
        restart = self.done.clone()
        speed = self.vel[:, 0, -1].norm(dim=-1).cpu().numpy()  # the ego's set-point moves at the decision
        self.target = next_target_speed(self.target, speed, actions.cpu().numpy(), self.names, self.target_speeds)
        hist = self._features(list(range(self.W - mc.history_len, self.W)), mc.pad_history)
        mask = with_ego(self.present[:, :, -1])
        plans = torch.full((B, 1, mc.horizon), self.idle, dtype=torch.long, device=self.dev)
        plans[:, 0, 0] = actions
        out = self.model.decode(self.model.encode(hist, mask), hist, mask, plans)
        disagreement = plan_uncertainty({k: v[:, :, 0] for k, v in out.items()}, mask)[0]  # (B,)
        b = torch.arange(B, device=self.dev)
        mean = out["mean"][self.member, b, 0, :, :, 0]  # (B, A, K, 4) one step ahead, current ego frame
        logits = out["logits"][self.member, b, 0]  # (B, A, K)
        mode = torch.multinomial(logits.exp().reshape(B * A, -1), 1, generator=self.gen).reshape(B, A)
        mode[:, 0] = logits[:, 0].argmax(-1)
        nxt = mean.gather(2, mode[:, :, None, None].expand(-1, -1, 1, 4))[:, :, 0]  # (B, A, 4)
        reward = out["reward"][self.member, b, 0, 0].clamp(0.0, 1.0)
        crash_p = torch.sigmoid(out["crash_logit"][self.member, b, 0, 0])
        head_crash = torch.rand(B, generator=self.gen, device=self.dev) < crash_p if self.config.crash_head \
            else torch.zeros(B, dtype=torch.bool, device=self.dev)
        # Back to the reference frame, then interpolate the frames in between.
        heading = self._heading()
        origin, yaw = self.pos[:, 0, -1], heading[:, 0, -1]
        p1 = rotate(nxt[..., :2], yaw[:, None]) + origin[:, None]
        v1 = rotate(nxt[..., 2:], yaw[:, None])
        s = torch.arange(1, self.sub + 1, dtype=torch.float32, device=self.dev) / self.sub
        pos, vel = hermite(self.pos[:, :, -1], self.vel[:, :, -1], p1, v1, s, mc.policy_dt)  # (B, A, sub, 2)
        if self.ego_model == "kinematic":
            ego_pos, ego_vel = self._kinematic_ego(actions, heading[:, 0, -1])
            pos, vel = torch.cat([ego_pos[:, None], pos[:, 1:]], 1), torch.cat([ego_vel[:, None], vel[:, 1:]], 1)
        normal = torch.stack([-torch.sin(self.lane_dir), torch.cos(self.lane_dir)], -1)  # (B, A, 2) to the right
        lateral = ((pos - self.pos[:, :, -1:]) * normal[:, :, None]).sum(-1)
        offset = self.offset[:, :, -1:] + lateral  # (B, A, sub)
        crossed = torch.round(offset / self.config.lane_width)
        ego_cross = crossed[:, 0, -1].long()
        offset = offset - crossed * self.config.lane_width
        present = self.present[:, :, -1:].expand(-1, -1, self.sub)
        crash = self._overlap(pos, vel, present) | head_crash
        if self.reward_spec is not None:
            reward = highway_reward(self.lane_speed, self.target_lane.to(self.lane_speed.dtype), self.reward_spec,
                                    float(self.lanes), crash)
        self.pos = torch.cat([self.pos[:, :, self.sub:], pos], dim=2)
        self.vel = torch.cat([self.vel[:, :, self.sub:], vel], dim=2)
        self.present = torch.cat([self.present[:, :, self.sub:], present], dim=2)
        self.offset = torch.cat([self.offset[:, :, self.sub:], offset], dim=2)
        self.lane = self.lane + ego_cross
        self.t += 1
        if self.config.uncertainty_penalty:
            reward = reward - self.config.uncertainty_penalty * disagreement / self.dis_limit
        terminated = crash
        unsure = disagreement > self.dis_limit
        truncated = ~terminated & ((self.t >= self.config.horizon) | unsure)
        # Gymnasium's next-step autoreset: envs that ended at the previous call restart now, their action ignored.
        if restart.any():
            self._load(restart.nonzero()[:, 0])
            reward[restart], terminated[restart], truncated[restart] = 0.0, False, False
        self.done = terminated | truncated
        crash, unsure, restart = crash.cpu().numpy(), unsure.cpu().numpy(), restart.cpu().numpy()
        infos = {"crashed": crash & ~restart, "unsure": unsure & ~restart}
        return (self._observe(), reward.cpu().numpy().astype(np.float32), terminated.cpu().numpy(),
                truncated.cpu().numpy(), infos)

    def _kinematic_ego(self, actions: torch.Tensor, heading: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ego's next `sub` stored frames under meta-actions (B,) from highway-env's controllers on its straight
        lane (`egomotion.controller_frame`), after moving its target lane; heading (B,) [rad] its heading now in the
        reference frame. Uses the set-point `self.target` already moved by the action. Returns positions and
        velocities (B, sub, 2) in the reference frame."""
        self.target_lane = (self.target_lane + lane_shift(actions, self.names)).clamp(0, self.lanes - 1)
        lane_dir = self.lane_dir[:, 0]
        x = torch.zeros_like(lane_dir)
        y0 = self.offset[:, 0, -1]
        y, v = y0, self.vel[:, 0, -1].norm(dim=-1)
        psi = torch.remainder(heading - lane_dir + torch.pi, 2 * torch.pi) - torch.pi
        centre = (self.target_lane - self.lane).to(x.dtype) * self.config.lane_width
        target_v = torch.as_tensor(self.target, dtype=x.dtype, device=self.dev)
        half = self.size[:, 0, 0] / 2
        frames = []
        every = self.frames_per_step // self.sub
        for f in range(1, self.frames_per_step + 1):
            x, y, psi, v = controller_frame(x, y, psi, v, target_v, centre, half, self.sim_dt)
            if f % every == 0:
                frames.append(torch.stack([x, y - y0, v * torch.cos(psi), v * torch.sin(psi)], -1))
        lane_frame = torch.stack(frames, 1)  # (B, sub, 4): travel along / across the lane, velocity
        self.lane_speed = lane_frame[:, -1, 2]
        angle = lane_dir[:, None]
        return (rotate(lane_frame[..., :2], angle) + self.pos[:, 0, -1:, :],
                rotate(lane_frame[..., 2:], angle))

    def _overlap(self, pos: torch.Tensor, vel: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B,) the ego's box overlaps a present agent's at any of the new frames (boxes aligned with the ego)."""
        yaw = torch.atan2(vel[:, 0, :, 1], vel[:, 0, :, 0])  # (B, sub)
        rel = rotate(pos[:, 1:] - pos[:, :1], -yaw[:, None])  # (B, A-1, sub, 2)
        reach = (self.size[:, 1:] + self.size[:, :1]) / 2 + self.crash_margin  # (B, A-1, 2)
        hit = (rel.abs() < reach[:, :, None]).all(-1) & present[:, 1:]
        return hit.any(-1).any(-1)

    def close_extras(self, **kwargs: Any) -> None:
        pass


class SingleImaginationEnv(gym.Env):
    """One imagined rollout at a time as a plain `gymnasium.Env` (gymnasium's env checker, single-env users)."""

    def __init__(self, config: ImaginationConfig, starts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None):
        self.vec = ImaginationEnv(config, 1, starts)
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, _ = self.vec.reset(seed=seed)
        return obs[0], {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, term, trunc, info = self.vec.step(np.asarray([action]))
        return obs[0], float(reward[0]), bool(term[0]), bool(trunc[0]), {k: bool(v[0]) for k, v in info.items()}


def imagination_throughput(env: ImaginationEnv, steps: int, seed: int = 0) -> float:
    """Imagined transitions per second over `steps` batched calls with random actions."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(env.single_action_space.n, size=env.num_envs))
    return steps * env.num_envs / (time.perf_counter() - start)


def random_steps(scenario: str, steps: int, seed: int = 0, agents: int = 8, history_dt: float = 1.0,
                 set_points: bool = True) -> tuple[np.ndarray, float]:
    """`steps` random-action steps of `PolicyEnv` (reset seeds from `seed`): their observations (steps, D) and the
    wall time [s] of the loop (env, perception and observation; resets included)."""
    env = PolicyEnv({"scenario": scenario, "seed_offset": seed, "agents": agents, "history_dt": history_dt,
                     "set_points": set_points})
    rng = np.random.default_rng(seed)
    obs = [env.reset()[0]]
    start = time.perf_counter()
    for _ in range(steps - 1):
        o, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        obs.append(env.reset()[0] if term or trunc else o)
    seconds = time.perf_counter() - start
    env.close()
    return np.stack(obs), seconds


def real_throughput(scenario: str, steps: int, seed: int = 0) -> float:
    """Real env steps per second of `PolicyEnv` (with perception) over `steps` random-action steps."""
    _, seconds = random_steps(scenario, steps + 1, seed)
    return steps / seconds
