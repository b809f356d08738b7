"""`agent=mpc`: the risk-aware MPC planner on a learned forecaster, as an `Agent` of the episode loop.

At every policy step it cuts the current scene from the running episode's own track recording (the same
`features.scene_history` that training data went through), plans with `planning.plan_scene`, and executes the
first action of the chosen plan, or hands the step to its fallback and records why (`last_fallback`, stored per
step in the episode). `planner.fallback=slower` (default): SLOWER (braking) whatever the reason; `least_risk`: the
least risky plan when no plan passes the chance constraint (braking plans are among the candidates), SLOWER when
the model's output is not to be trusted (not finite, too uncertain); `policy`: the reactive policy's action,
whatever the reason. The previous plan, shifted by one step, warm-starts the next search (after a fallback step
nothing does: the executed action was not the plan's); with `planner.policy` the reactive policy also proposes a
share of the candidates.

In a continuous-action scenario (a forecaster with `action_dim` > 0) it plans (H, D) action sequences
(`planning.plan_continuous`) with the ego's kinematic bicycle under each plan (`continuous_ego_path`) and a charge
for leaving the road (`road_frame`, `planning.offroad_costs`); its braking fallback is `braking_control`.

After each step the episode loop stores `step_log()`: the chosen plan, the best `LOG_CANDIDATES` distinct candidates
with their cost, risk and collision probability, and the predicted futures of the scene's agents under the chosen
plan (per mode, with uncertainty and mode probabilities) in the decision's ego frame, with the ego pose and the track
id of each agent slot so a replay can draw them on the map (`decision_log`). The fallback reason is the episode's
own `fallback` field.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from drive_mbrl.config import PlannerConfig, validate
from drive_mbrl.errors import ConfigError
from drive_mbrl.features import HEADING, X, Y, history_stride, live_history, next_route_lane, world_to_ego

LOG_CANDIDATES = 5
"""Candidate plans kept per step in the step log (the best by cost, distinct)."""


def planner_config(options: dict[str, Any] | PlannerConfig | None) -> PlannerConfig:
    """A validated PlannerConfig from a dict of overrides (unknown keys are an error)."""
    if isinstance(options, PlannerConfig):
        config = options
    else:
        known = {f.name for f in fields(PlannerConfig)}
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise ConfigError(f"planner has no setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = PlannerConfig(**(options or {}))
    validate(config, "planner.")
    return config


class MPCAgent:
    """Plans with a forecaster checkpoint (see the module docstring). `fault` (tests): a hook applied to the
    forecaster's outputs before scoring."""

    drives_itself = False

    def __init__(self, checkpoint: str = "", planner: dict[str, Any] | PlannerConfig | None = None,
                 fault: Any = None, weights: str = ""):
        import torch

        from drive_mbrl.fit import load_forecaster, resolve_device, scene_spec
        from drive_mbrl.forecaster import compiled, low_precision, planning_precision
        from drive_mbrl.runtime import keep_freed_memory

        if not checkpoint:
            raise ConfigError("agent=mpc needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
        self.settings = planner_config(planner)
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        keep_freed_memory()  # also in Ray workers, which do not pass through the CLI
        self.device = resolve_device(self.settings.device)
        if weights:  # the digest the options were made with (`cli.mpc_options`): the same weights, or stop
            from drive_mbrl.fit import forecaster_digest

            if forecaster_digest(checkpoint) != weights:
                raise ConfigError(f"the forecaster in {checkpoint} changed since this run's options were made (its "
                                  "weights' sha256 differs): start the run again")
        self.model, self.meta = load_forecaster(checkpoint, self.device)
        self.model = low_precision(self.model, planning_precision(self.settings.precision, self.meta, self.device))
        if self.settings.compile:
            self.model = compiled(self.model)
        c = self.model.config
        if c.action_dim and (self.settings.ego_model == "route" or self.settings.policy):
            raise ConfigError(f"the forecaster in {checkpoint} takes continuous actions: plan them with "
                              "planner.ego_model=kinematic or learned (the route ego model follows meta-actions) "
                              "and without planner.policy (the reactive policy drives meta-actions)")
        self.spec = scene_spec(c, 1, self.meta["history_dt"])
        self.fault = fault
        self.policy = None
        if self.settings.policy:
            from drive_mbrl.policy import PolicyAgent

            self.policy = PolicyAgent(self.settings.policy, threads=self.settings.threads)
        elif self.settings.fallback == "policy":
            raise ConfigError("planner.fallback=policy needs planner.policy=<policy folder>")
        self.last_fallback = ""
        self.last_decision: Any = None
        self._recorder: Any = None
        self._track = np.full(self.spec.agents, -1, np.int64)
        self._ego_pose = np.full(3, np.nan)

    def reset(self, env: Any, seed: int) -> None:
        import torch

        from drive_mbrl.scenarios import action_names, env_timing, is_continuous

        self._generator = torch.Generator(device=self.device).manual_seed(self.settings.seed * 1_000_003 + seed)
        self._warm: Any = None
        self._replan: Any = None
        self.last_fallback = ""
        self._continuous = is_continuous(env)
        self._reward = ego_reward_spec(getattr(env.unwrapped.spec, "id", "") or getattr(env.spec, "id", ""),
                                       env.unwrapped.config, self.settings, self._continuous)
        if self._continuous or self.model.config.action_dim:
            self._names = action_names(env)
            if not self._continuous or len(self._names) != self.model.config.action_dim:
                raise ConfigError(f"the forecaster was trained for {self.model.config.action_dim or 'meta'}-"
                                  f"dimensional actions, this scenario takes {self._names}: use a checkpoint trained "
                                  "on this scenario")
            sim_hz, policy_hz = env_timing(env)
            self._frames_per_step, self._sim_dt = sim_hz // policy_hz, 1.0 / sim_hz
            return
        names = env.unwrapped.action_type.actions_indexes
        if env.action_space.n != self.model.config.num_actions:
            raise ConfigError(f"the forecaster was trained for {self.model.config.num_actions} actions, this "
                              f"scenario has {env.action_space.n}: use a checkpoint trained on this scenario")
        if self.policy is not None:
            self.policy.reset(env, seed)
        self._fallback_action = int(names["SLOWER"])
        self._names = action_names(env)
        sim_hz, policy_hz = env_timing(env)
        self._frames_per_step, self._sim_dt = sim_hz // policy_hz, 1.0 / sim_hz
        self._idle = int(names.get("IDLE", 0))
        if self.settings.ego_model == "route" and {"LANE_LEFT", "LANE_RIGHT"} & set(names):
            raise ConfigError("planner.ego_model=route keeps the ego on its route's lane centres, but this scenario's "
                              "actions change lanes: use planner.ego_model=kinematic (straight lanes) or learned")

    def attach_tracks(self, recorder: Any) -> None:
        """Called by the episode loop after each reset with its track recorder (the planner's perception)."""
        if self.policy is not None:
            self.policy.attach_tracks(recorder)
        from drive_mbrl.fit import scene_spec

        stride = history_stride(self.meta["history_dt"], recorder.frame_dt)
        self.spec = scene_spec(self.model.config, stride, self.meta["history_dt"])
        self._recorder = recorder

    def scene(self) -> tuple[np.ndarray, np.ndarray]:
        """The current scene: history (A, L, F) float32 and agent_mask (A,) bool, ego frame. Keeps the slots' track
        ids and the ego pose (x, y [m], heading [rad], world frame) of the frame for the step log."""
        history, track, _, arrays = live_history(self._recorder, self.spec)
        self._track, self._ego_pose = track, arrays["state"][-1, 0, [X, Y, HEADING]].astype(np.float64)
        return history, track >= 0

    def act(self, obs: Any, env: Any) -> int | np.ndarray:
        import torch

        from drive_mbrl.planning import plan_scene

        if self._recorder is None:
            raise RuntimeError("MPCAgent.act before attach_tracks: run it through rollout.EpisodeRunner")
        history, mask = self.scene()
        ego_path = plan_cost = ego_reward = None
        if self._continuous:
            from drive_mbrl.planning import offroad_costs

            own = continuous_ego_path(env, self._frames_per_step, self._sim_dt, self.device)
            road = road_frame(env)
            plan_cost = lambda plans: offroad_costs(own(plans), road, self.settings)  # noqa: E731
            if self.settings.ego_model == "kinematic":
                ego_path = own
        elif self.settings.ego_model in ("kinematic", "route"):
            from drive_mbrl.egomotion import rollout_ego, rollout_ego_on_path

            state = ego_state(env)
            if self.settings.ego_model == "kinematic":
                ego_path = lambda plans: rollout_ego(state, plans, self._names,  # noqa: E731
                                                     self._frames_per_step, self._sim_dt)
                if self._reward is not None:
                    from drive_mbrl.egomotion import path_reward

                    ego_reward = lambda path: path_reward(path, self._reward, state.lanes)  # noqa: E731
            else:  # as far as the ego can drive within the horizon and the lookahead
                reach = max(*state.target_speeds, state.speed, 1.0) * (self.model.config.horizon +
                                                                       self.settings.lookahead + 1) * \
                    self._frames_per_step * self._sim_dt
                path = torch.as_tensor(route_path(env, reach, ROUTE_STEP, self._ego_pose), device=self.device)
                ego_path = lambda plans: rollout_ego_on_path(state, path, ROUTE_STEP, plans,  # noqa: E731
                                                             self._names, self._frames_per_step, self._sim_dt)
        proposal = None
        with torch.inference_mode():
            if self.policy is not None:
                logits = self.policy.net(torch.as_tensor(self.policy.observation())[None])[0]
                proposal = torch.softmax(logits, -1).to(self.device)
            inputs = (torch.as_tensor(history, device=self.device), torch.as_tensor(mask, device=self.device),
                      self.settings)
            extras = (self._warm, self.fault, ego_path, proposal, plan_cost, ego_reward)
            self._replan = lambda generator: plan_scene(self.model, *inputs, generator, *extras)
            decision = self._replan(self._generator)
        self.last_decision = decision
        self.last_fallback = decision.fallback
        plan = decision.plan
        if decision.least_risk is not None and self.settings.fallback == "least_risk":
            plan = decision.least_risk
        elif decision.fallback:
            self._warm = None  # the executed action is not the plan's: nothing to shift
            if self.settings.fallback == "policy" and proposal is not None:
                return int(proposal.argmax())
            return braking_control(env) if self._continuous else self._fallback_action
        if self._continuous:  # the next search starts from this plan shifted, its last action held
            self._warm = torch.cat([plan[1:], plan[-1:]])
            return plan[0].cpu().numpy().astype(np.float32)
        self._warm = torch.cat([plan[1:], torch.full_like(plan[:1], self._idle)])
        return int(plan[0])

    def replan(self, generator: Any) -> Any:
        """Plan the last decision's scene again, with the same inputs (warm start, ego path, proposal) and the
        random draws of `generator`: another sample of what the planner thinks of that state. Changes nothing the
        agent does next."""
        import torch

        if self._replan is None:
            raise RuntimeError("MPCAgent.replan before act")
        with torch.inference_mode():
            return self._replan(generator)

    def step_log(self) -> dict[str, np.ndarray]:
        """What the last decision planned and predicted (`decision_log`), for the episode's step log."""
        return decision_log(self.last_decision, self._track, self._ego_pose, LOG_CANDIDATES)


def decision_log(decision: Any, track: np.ndarray, ego_pose: np.ndarray, top: int) -> dict[str, np.ndarray]:
    """One step's planning record as fixed-shape arrays (`planning.Decision` with candidates, scores and futures).

    track: (A,) int64 track id of each agent slot (-1 empty); ego_pose: (3,) x, y [m], heading [rad] of the ego in
    the world frame at the decision (the origin of the ego frame: x forward, y to the right). Returns
        plan (H,) int8 the chosen plan; least_risk (H,) int8 (-1 when not computed); for continuous actions
            (H, D) float32 each (NaN when not computed)
        cand_plan (C, H) int8 ((C, H, D) float32), cand_cost / cand_risk / cand_collision_prob (C,) float32: the
            best `top` distinct candidates by cost (+inf: rejected by the chance constraint); rows -1 / NaN when
            fewer were scored
        cost, collision_prob, disagreement [m], spread [m]: () float32 of the chosen plan
        track (A,) int32, ego_pose (3,) float64
        future_mean (A, K, H, 2) float32 and future_std (A, K, H, 2) float16 [m]: ego-frame positions per mode
            and their predicted std, future_prob (A, K) float16 mode probabilities, future_disagreement (A, H)
            float16 [m] (epistemic: std across members of the expected position, norm over x, y), see
            `representative_futures`; NaN in empty slots.
    """
    # Meta-action plans are stored as int8 (-1: none); continuous plans (H, D) as float32 (NaN: none).
    continuous = decision.plan.is_floating_point()
    dtype, none = (np.float32, np.nan) if continuous else (np.int8, -1)
    shape = tuple(decision.plan.shape)
    scores = {k: v.detach().cpu().numpy() for k, v in decision.scores.items()}
    plans = decision.candidates.detach().cpu().numpy()
    order = np.argsort(scores["cost"], kind="stable")
    _, first = np.unique(plans[order], axis=0, return_index=True)  # first (cheapest) occurrence of each plan
    keep = order[np.sort(first)[:top]]
    cand_plan = np.full((top, *shape), none, dtype)
    cand_plan[: len(keep)] = plans[keep]
    cand = {}
    for name in ("cost", "risk", "collision_prob"):
        cand["cand_" + name] = np.full(top, np.nan, np.float32)
        cand["cand_" + name][: len(keep)] = scores[name][keep]
    least_risk = decision.least_risk.cpu().numpy() if decision.least_risk is not None else np.full(shape, none)
    mask = track >= 0
    return {
        "plan": decision.plan.cpu().numpy().astype(dtype), "least_risk": least_risk.astype(dtype),
        "cand_plan": cand_plan, **cand,
        **{name: np.float32(getattr(decision, name)) for name in ("cost", "collision_prob", "disagreement",
                                                                    "spread")},
        "track": track.astype(np.int32), "ego_pose": np.asarray(ego_pose, np.float64),
        **representative_futures({k: v.detach().cpu() for k, v in decision.futures.items()}, mask),
    }


def representative_futures(futures: dict[str, Any], agent_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Compress an ensemble's futures to one member per agent: mode identities differ between members (each learnt
    its own modes), so modes are not averaged across members; instead each agent's modes come from the member whose
    expected trajectory is closest to the ensemble's (the medoid-like member), and the members' spread is kept as
    `future_disagreement`.

    futures: torch tensors mean, log_std (E, A, K, H, 2) [m], logits (E, A, K); agent_mask (A,) bool. Returns
    future_mean (A, K, H, 2) float32, future_std (A, K, H, 2) float16, future_prob (A, K) float16,
    future_disagreement (A, H) float16; NaN where the slot is empty.
    """
    mean, std, prob = futures["mean"].double(), futures["log_std"].double().exp(), futures["logits"].double().exp()
    A = mean.shape[1]
    expected = (prob[..., None, None] * mean).sum(2)  # (E, A, H, 2)
    member = ((expected - expected.mean(0)) ** 2).sum((-1, -2)).argmin(0)  # (A,)
    empty = ~np.asarray(agent_mask, bool)

    def own(x: Any, dtype: Any) -> np.ndarray:
        with np.errstate(over="ignore"):  # an exploding std stays inf in float16
            out = x.numpy().astype(dtype)  # (A, ...)
        out[empty] = np.nan
        return out

    slots = np.arange(A)
    return {"future_mean": own(mean[member, slots], np.float32), "future_std": own(std[member, slots], np.float16),
            "future_prob": own(prob[member, slots], np.float16),
            "future_disagreement": own(expected.std(0, unbiased=False).norm(dim=-1), np.float16)}



ROUTE_STEP = 0.5
"""[m] spacing of the route centre-line points of `planner.ego_model=route`."""


def route_path(env: Any, length: float, step: float, ego_pose: np.ndarray) -> np.ndarray:
    """The centre line of the ego's planned route ahead: points every `step` [m] from the ego's projection on its
    target lane, `length` [m] along highway-env's route (`ControlledVehicle.route`; the lane's end continues the
    last lane), in the ego frame of `ego_pose` (x, y [m], heading [rad] in the world frame: x forward, y to the
    right, as `features.to_ego_frame`). Returns (P, 2) float64, P = length / step + 1 (torch-free)."""
    base = env.unwrapped
    ego, network = base.vehicle, base.road.network
    index = ego.target_lane_index
    lane = network.get_lane(index)
    s = float(lane.local_coordinates(ego.position)[0])
    route = list(ego.route or [])  # next_lane pops the route it is given: never the vehicle's own
    points = np.empty((int(round(length / step)) + 1, 2))
    last = False
    for k in range(len(points)):
        while s > lane.length and not last:
            following = next_route_lane(network, index, route)
            last = following is None
            if not last:
                s, index = s - lane.length, following
                lane = network.get_lane(index)
        points[k] = lane.position(s, 0)
        s += step
    return world_to_ego(points, ego_pose)


def reachable_lanes(network: Any, lane_index: tuple) -> int:
    """Side lanes 0, 1, ... of `lane_index`'s road segment up to the first one a lane change may not enter
    (highway-env's `forbidden` lanes, such as merge-v0's on-ramp beside the main road: LANE_RIGHT towards it leaves
    the ego where it is)."""
    count = 0
    for side in network.all_side_lanes(lane_index):
        if network.get_lane(side).forbidden:
            break
        count += 1
    return count


def _on_lane(env: Any) -> dict[str, Any]:
    """The ego against its lane (any highway-env vehicle on straight lanes): its offset from the lane centre
    `lateral` [m] (+ right), its `heading` relative to the lane [rad] (not wrapped), the lane's number, width [m]
    and the road's lane count (every lane reachable on its edge)."""
    base = env.unwrapped
    ego, network = base.vehicle, base.road.network
    lane = network.get_lane(ego.lane_index)
    s, lateral = lane.local_coordinates(ego.position)
    index = int(ego.lane_index[2])
    return dict(lateral=float(lateral), heading=float(ego.heading) - float(lane.heading_at(s)), lane=index,
                lanes=max(reachable_lanes(network, ego.lane_index), index + 1), lane_width=float(lane.width_at(s)))


def ego_reward_spec(env_id: str, env_config: dict[str, Any], settings: PlannerConfig, continuous: bool) -> Any:
    """The `egomotion.HighwayReward` the planner scores the ego's steps with (`planner.reward`) on the env
    `env_id` with its resolved config, or None for the forecaster's learned reward. `kinematic` where it cannot
    apply is an error; `auto` then falls back to learned."""
    from drive_mbrl.egomotion import highway_reward_spec

    if settings.reward == "learned":
        return None
    spec = highway_reward_spec(env_id, env_config, continuous)
    usable = spec is not None and settings.ego_model == "kinematic"
    if settings.reward == "kinematic" and not usable:
        raise ConfigError(f"planner.reward=kinematic scores highway-env's HighwayEnv reward (highway-v0, "
                          f"highway-fast-v0) on the kinematic ego under meta-actions; this scenario runs {env_id} "
                          f"with {'continuous' if continuous else 'meta'} actions and planner.ego_model="
                          f"{settings.ego_model}: use planner.reward=learned (or auto)")
    return spec if usable else None


def ego_values(env: Any) -> dict[str, Any]:
    """The ego's own set-points and lane from the simulator (what the ego knows about itself), as the fields of
    `egomotion.EgoState` (torch-free, for the onboard runner too). Duck-typed on highway-env's MDPVehicle and
    straight lanes."""
    ego = env.unwrapped.vehicle
    lane = _on_lane(env)
    return dict(speed=float(ego.speed), heading=lane["heading"], lateral=lane["lateral"],
                lane_heading=-lane["heading"], lane=lane["lane"], target_lane=int(ego.target_lane_index[2]),
                lanes=lane["lanes"], lane_width=lane["lane_width"], target_speed=float(ego.target_speed),
                target_speeds=tuple(float(v) for v in ego.target_speeds), length=float(ego.LENGTH))


def road_frame(env: Any) -> tuple[float, float, float, float]:
    """The ego against its road, for `planning.offroad_costs`: its offset from its lane's centre [m] (+ right), its
    heading relative to the lane [rad], and the left and right edges of the road (every lane of its edge) relative
    to that lane centre [m]. Straight roads; duck-typed on highway-env's lanes."""
    lane = _on_lane(env)
    width, index = lane["lane_width"], lane["lane"]
    heading = (lane["heading"] + np.pi) % (2 * np.pi) - np.pi
    return lane["lateral"], heading, -(index + 0.5) * width, (lane["lanes"] - index - 0.5) * width


def continuous_ego_path(env: Any, frames_per_step: int, sim_dt: float, device: Any) -> Any:
    """plans (P, H, D) -> (P, H, 4) the ego's own motion under continuous plans from its state now
    (`egomotion.rollout_ego_continuous` with the env's action ranges and speed limits). The last call's result is
    kept: the planner asks for the same plans twice (the ego's futures and the off-road charge)."""
    from drive_mbrl.egomotion import rollout_ego_continuous

    ego, action_type = env.unwrapped.vehicle, env.unwrapped.action_type
    ranges = (tuple(action_type.acceleration_range) if action_type.longitudinal else None,
              tuple(action_type.steering_range) if action_type.lateral else None)
    speed, length, limits = float(ego.speed), float(ego.LENGTH), (float(ego.MIN_SPEED), float(ego.MAX_SPEED))
    last: list[Any] = [None, None]  # plans, their path

    def path(plans: Any) -> Any:
        if last[0] is not plans:
            last[:] = [plans, rollout_ego_continuous(speed, length, plans.cpu(), ranges, frames_per_step, sim_dt,
                                                     limits).to(device)]
        return last[1]

    return path


BRAKING_SPEED = 20.0
"""[m/s] the continuous fallback brakes no lower than this (the meta-actions' lowest target speed on highway)."""


def braking_control(env: Any) -> np.ndarray:
    """The continuous-action fallback, SLOWER's counterpart: shed up to 5 m/s over the next second but not below
    `BRAKING_SPEED`, with the wheel turned to line the ego up with its lane (no lane change under way). Returns the
    ContinuousAction vector (D,) float32 in [-1, 1] (acceleration, steering, as the action type has them)."""
    base = env.unwrapped
    ego = base.vehicle
    policy_dt = 1.0 / base.config["policy_frequency"]
    target = max(ego.speed - 5.0, min(ego.speed, BRAKING_SPEED))
    error = road_frame(env)[1]
    from drive_mbrl.scenarios import to_continuous_action

    return to_continuous_action(env, {"acceleration": (target - ego.speed) / policy_dt, "steering": -error})


def ego_state(env: Any) -> Any:
    """`ego_values` as an `egomotion.EgoState`, for `egomotion.rollout_ego`."""
    from drive_mbrl.egomotion import EgoState

    return EgoState(**ego_values(env))
