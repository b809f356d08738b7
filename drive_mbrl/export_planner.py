"""The whole planning step as one ONNX graph: scene and noise in, the action to execute out.

`PlannerGraph` wraps `planning.plan_step` (candidate generation from the noise inputs, the forecaster's rollout of
every distinct candidate, the kinematic ego of `egomotion.rollout_ego_tensors`, sampled costs, the risk measure,
the chance constraint, categorical CEM's refits unrolled for `planner.iterations`, the best plan and the fallback
reason) and then picks the executed action the way `mpc.MPCAgent` does. The planner settings are constants of
the graph (recorded in the contract); the random draws are inputs, so the graph is deterministic: given the same
noise it must pick the same action as the torch planner (`planner_parity`).

Knows nothing of files: export.py writes the bundle.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from drive_mbrl.config import PlannerConfig
from drive_mbrl.egomotion import EGO_FIELDS, EgoState, HighwayReward, ego_vector, path_reward, rollout_ego_tensors
from drive_mbrl.features import HIST_FEATURES, Scenes
from drive_mbrl.forecaster import Forecaster
from drive_mbrl.onboard import tensor_spec
from drive_mbrl.planning import FALLBACK_REASONS, StepNoise, draw_noise, enumerate_plans, plan_step, search_shape

PLANNER_OUTPUTS = ("action", "plan", "reason", "least_risk", "cost", "collision_prob", "disagreement", "spread",
                   "expected_return", "evaluated")
EGO_TABLE_LIMIT = 100_000
"""Largest number of action sequences whose ego paths the graph integrates all at once (`PlannerGraph._ego_path`)."""
COST_TOLERANCE = 1e-4
"""Parity of the chosen plan's cost, relative (absolute below 1): float32 sums of a few hundred terms in another
order."""
DEFAULT_TARGET_SPEEDS = (20.0, 25.0, 30.0)
"""[m/s] highway-env's MDPVehicle target speeds (for example inputs; the onboard agent passes the live ones)."""


class PlannerGraph(nn.Module):
    """history (A, L, F) float32, agent_mask (A,) bool, [warm_start (H,) int64 for CEM], [ego (len(EGO_FIELDS),)
    and target_speeds (S,) float64 for the kinematic ego], [candidates (I, P, H) for CEM], modes (I, P, E, A, M)
    float32 uniform, gauss (I, P, E, A, M, 2) float32 normal -> PLANNER_OUTPUTS (see `planner_contract`)."""

    def __init__(self, model: Forecaster, settings: PlannerConfig, action_names: list[str], frames_per_step: int,
                 sim_dt: float, reward: HighwayReward | None = None):
        super().__init__()
        self.model, self.settings, self.names, self.reward = model, settings, list(action_names), reward
        self.frames_per_step, self.sim_dt = frames_per_step, sim_dt
        self.kinematic = settings.ego_model == "kinematic"
        self.slower = self.names.index("SLOWER")
        self.input_names = [t["name"] for t in planner_contract(model, settings)["inputs"]]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs in the order of `planner_contract` (exhaustive search has no warm_start and candidates)."""
        feeds = dict(zip(self.input_names, inputs, strict=True))
        H = self.model.config.horizon
        ego_path = ego_reward = None
        if self.kinematic:
            ego_path = self._ego_path(feeds["ego"], feeds["target_speeds"])
            if self.reward is not None:
                lanes = feeds["ego"][EGO_FIELDS.index("lanes")]
                ego_reward = lambda path: path_reward(path, self.reward, lanes)  # noqa: E731
        noise = StepNoise(feeds.get("candidates", torch.zeros(1, 0, H)), feeds["modes"], feeds["gauss"])
        warm = feeds.get("warm_start", torch.zeros(H, dtype=torch.int64))
        step = plan_step(self.model, feeds["history"], feeds["agent_mask"], self.settings, noise, warm, ego_path,
                         ego_reward=ego_reward)
        step["action"] = executed_action(step, self.settings.fallback, self.slower)
        return tuple(step[k] for k in PLANNER_OUTPUTS)


    def _ego_path(self, ego: torch.Tensor, speeds: torch.Tensor) -> Any:
        """plans (P, H) -> the ego's path (P, H, 4) (`egomotion.rollout_ego_tensors`). Where every sequence fits
        `EGO_TABLE_LIMIT`, the path of every sequence is integrated once (a fixed-size batch) and each plan looks
        its row up: onnxruntime loads the graph in about a second instead of tens of seconds, as the integration's
        hundreds of nodes then have fixed shapes (buffer planning over symbolic shapes is what takes the time)."""
        nA, H = self.model.config.num_actions, self.model.config.horizon
        integrate = lambda plans: rollout_ego_tensors(ego, speeds, plans, self.names,  # noqa: E731
                                                      self.frames_per_step, self.sim_dt)
        if nA ** H > EGO_TABLE_LIMIT:
            return integrate
        table = integrate(enumerate_plans(nA, H, ego.device))  # (nA^H, H, 4), lexicographic
        weights = nA ** torch.arange(H - 1, -1, -1, device=ego.device)
        return lambda plans: table[(plans * weights).sum(-1)]


def executed_action(step: dict[str, torch.Tensor], fallback: str, slower: int) -> torch.Tensor:
    """The action `mpc.MPCAgent` executes for a `plan_step` result: the least risky plan's first action when no
    plan passed the chance constraint and `fallback` is least_risk, SLOWER on any other fallback, else the plan's
    first action. Returns a 0-d int64."""
    no_plan = step["reason"] == FALLBACK_REASONS.index("no_plan_within_collision_limit")
    first = step["plan"][0]
    if fallback == "least_risk":
        first = torch.where(no_plan, step["least_risk"][0], first)
        use_fallback = (step["reason"] != 0) & ~no_plan
    else:
        use_fallback = step["reason"] != 0
    return torch.where(use_fallback, torch.full_like(first, slower), first)


def planner_contract(model: Forecaster, settings: PlannerConfig) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the planner graph; the noise shapes follow from the settings (`search_shape`)."""
    c = model.config
    iters, P, exhaustive = search_shape(c.num_actions, c.horizon, settings)
    A, L, H, E, M = c.agents, c.history_len, c.horizon, c.members, settings.samples
    inputs = [
        tensor_spec("history", [A, L, len(HIST_FEATURES)], "float32", "per feature: scene.hist_units",
                    "one scene as the forecaster's history input, without the batch axis"),
        tensor_spec("agent_mask", [A], "bool", "1", "slot holds a track present at the decision"),
    ]
    if not exhaustive:
        inputs.append(tensor_spec("warm_start", [H], "int64", "action index", "the previous decision's plan "
                                  "shifted by one step, IDLE appended (first step: all IDLE)"))
    if settings.ego_model == "kinematic":
        inputs += [
            tensor_spec("ego", [len(EGO_FIELDS)], "float64", "m/s, rad, m, rad, lane, lane, lanes, m, m/s, m",
                        "the ego's own state in its lane, fields " + ", ".join(EGO_FIELDS) + " (egomotion.EgoState)"),
            tensor_spec("target_speeds", ["S"], "float64", "m/s", "the discrete target speeds FASTER / SLOWER pick"),
        ]
    if not exhaustive:
        inputs.append(tensor_spec("candidates", [iters, P, H], "float32", "uniform [0, 1)",
                                  "categorical CEM's draw of each candidate plan per iteration"))
    inputs += [
        tensor_spec("modes", [iters, P, E, A, M], "float32", "uniform [0, 1)",
                    "the mode each sampled future follows, per iteration, distinct plan (sorted), member, agent"),
        tensor_spec("gauss", [iters, P, E, A, M, 2], "float32", "standard normal",
                    "each sampled future's Gaussian draw of x and y"),
    ]
    outputs = [
        tensor_spec("action", [], "int64", "action index", "the action to execute now (fallback applied)"),
        tensor_spec("plan", [H], "int64", "action index", "the best plan found (before any fallback)"),
        tensor_spec("reason", [], "int64", "index into planner.fallback_reasons", "why control goes to the "
                    "fallback (0: it does not)"),
        tensor_spec("least_risk", [H], "int64", "action index", "the plan of least collision probability"),
        tensor_spec("cost", [], "float32", "cost", "the best plan's risk-measured cost (+inf: none feasible)"),
        tensor_spec("collision_prob", [], "float32", "probability", "the best plan's collision probability"),
        tensor_spec("disagreement", [], "float32", "m", "the best plan's member disagreement"),
        tensor_spec("spread", [], "float32", "m", "the best plan's predicted spread"),
        tensor_spec("expected_return", [], "float32", "env reward", "the best plan's expected discounted return"),
        tensor_spec("evaluated", [], "int64", "plans", "distinct plans scored in all iterations"),
    ]
    return {"inputs": inputs, "outputs": outputs}


def planner_description(settings: PlannerConfig, action_names: list[str], frames_per_step: int,
                        sim_dt: float, reward: HighwayReward | None = None) -> dict[str, Any]:
    """Contract fields of the planner graph beside its inputs and outputs (ego_reward: the HighwayReward baked into
    the graph, null where it scores the forecaster's learned reward)."""
    return {"settings": asdict(settings), "fallback_reasons": list(FALLBACK_REASONS),
            "ego_reward": None if reward is None else asdict(reward),
            "ego_fields": list(EGO_FIELDS), "frames_per_step": frames_per_step, "sim_dt": sim_dt,
            "slower_action": action_names.index("SLOWER"), "idle_action": action_names.index("IDLE")}


def scene_ego_state(history: np.ndarray, lanes: int, lane_width: float = 4.0) -> EgoState:
    """A plausible EgoState from a recorded scene's ego features (the recording holds no set-points): speed and
    lane geometry from the last history frame, the middle lane, target lane = lane, target speed the nearest of
    DEFAULT_TARGET_SPEEDS. For parity inputs only."""
    f = {name: i for i, name in enumerate(HIST_FEATURES)}
    ego = history[0, -1]
    speed = float(np.hypot(ego[f["vx"]], ego[f["vy"]]))
    lane_dir = float(np.arctan2(ego[f["sin_lane"]], ego[f["cos_lane"]]))
    target = min(DEFAULT_TARGET_SPEEDS, key=lambda v: abs(v - speed))
    return EgoState(speed=speed, heading=-lane_dir, lateral=float(ego[f["lane_offset"]]), lane_heading=lane_dir,
                    lane=lanes // 2, target_lane=lanes // 2, lanes=lanes, lane_width=lane_width,
                    target_speed=target, target_speeds=DEFAULT_TARGET_SPEEDS, length=float(ego[f["length"]]) or 5.0)


def planner_inputs(model: Forecaster, settings: PlannerConfig, history: np.ndarray, mask: np.ndarray,
                   warm_start: np.ndarray, ego: EgoState | None, noise: StepNoise) -> dict[str, torch.Tensor]:
    """The planner graph's inputs by name for one scene."""
    feeds = {"history": torch.as_tensor(history), "agent_mask": torch.as_tensor(mask),
             "warm_start": torch.as_tensor(warm_start, dtype=torch.int64)}
    if settings.ego_model == "kinematic":
        feeds["ego"], feeds["target_speeds"] = ego_vector(ego)
    feeds = {**feeds, "candidates": noise.candidates, "modes": noise.modes, "gauss": noise.gauss}
    return {t["name"]: feeds[t["name"]] for t in planner_contract(model, settings)["inputs"]}


def step_noise(model: Forecaster, settings: PlannerConfig, generator: torch.Generator) -> StepNoise:
    """The noise of one planning step of `model` under `settings`."""
    c = model.config
    iterations, population, _ = search_shape(c.num_actions, c.horizon, settings)
    return draw_noise(generator, iterations, population, c.horizon, c.members, c.agents, settings.samples)


def action_agreement(torch_a: np.ndarray, onnx_a: np.ndarray, torch_b: np.ndarray,
                     onnx_b: np.ndarray) -> dict[str, Any]:
    """Counts of agreeing chosen actions over S scenes, each planned by torch and by onnxruntime under two
    independent noise draws a and b (all four arrays (S,) int action indices):

    same_noise          onnx_a == torch_a (the export's parity: must be every scene)
    same_noise_b        onnx_b == torch_b (the same check on the second draw)
    independent         onnx_b == torch_a (ONNX against torch, independent noise)
    torch_self          torch_b == torch_a (the torch planner against itself, independent noise: the ceiling of
                        `independent`, set by the planner's own randomness)
    export_changed      scenes where `independent` and `torch_self` disagree (onnx_b != torch_b there): the
                        difference between the two rates is at most this over S, as both compare draw b to the same
                        torch_a (a paired comparison)

    Returns the counts, `scenes` = S, and each count's share of S as `<name>_rate`."""
    torch_a, onnx_a, torch_b, onnx_b = (np.asarray(x).reshape(-1) for x in (torch_a, onnx_a, torch_b, onnx_b))
    assert torch_a.shape == onnx_a.shape == torch_b.shape == onnx_b.shape, "one action per scene in each array"
    counts = {"same_noise": onnx_a == torch_a, "same_noise_b": onnx_b == torch_b, "independent": onnx_b == torch_a,
              "torch_self": torch_b == torch_a, "export_changed": (onnx_b == torch_a) != (torch_b == torch_a)}
    S = len(torch_a)
    out: dict[str, Any] = {"scenes": S}
    for name, hits in counts.items():
        out[name] = int(hits.sum())
        out[f"{name}_rate"] = int(hits.sum()) / S if S else float("nan")
    return out


def planner_parity(session: Any, graph: PlannerGraph, contract: dict[str, Any], scenes: Scenes, count: int,
                   lanes: int, seed: int) -> dict[str, Any]:
    """onnxruntime's planner graph against the same graph in torch on up to `count` recorded scenes, each planned
    under two independent noise draws a and b by both (`action_agreement`): with the same noise the chosen action
    and plan must agree on every scene; with independent noise, how often ONNX agrees with torch, beside how often
    torch agrees with itself (the planner's own randomness bounds the former; equal rates: the export adds no
    disagreement). Warm starts are all-IDLE."""
    names = [t["name"] for t in contract["inputs"]]
    gen_same, gen_other = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    pick = np.linspace(0, len(scenes) - 1, min(count, len(scenes))).round().astype(np.int64)
    warm = np.full(graph.model.config.horizon, graph.names.index("IDLE"), np.int64)
    actions = np.zeros((4, len(pick)), np.int64)  # torch_a, onnx_a, torch_b, onnx_b
    same_plan = same_reason = cost_mismatch = 0
    worst_cost = 0.0
    with torch.no_grad():
        for j, i in enumerate(pick):
            ego = scene_ego_state(scenes.history[i], lanes) if graph.kinematic else None
            feeds = planner_inputs(graph.model, graph.settings, scenes.history[i], scenes.agent_mask[i], warm, ego,
                                   step_noise(graph.model, graph.settings, gen_same))
            expected = dict(zip(PLANNER_OUTPUTS, graph(*(feeds[n] for n in names)), strict=True))
            got = dict(zip(PLANNER_OUTPUTS, session.run(None, {n: feeds[n].numpy() for n in names}), strict=True))
            same_plan += bool(np.array_equal(got["plan"], expected["plan"].numpy()))
            same_reason += int(got["reason"]) == int(expected["reason"])
            want, have = float(expected["cost"]), float(got["cost"])
            if np.isfinite(want) and np.isfinite(have):
                worst_cost = max(worst_cost, abs(have - want))
                cost_mismatch += abs(have - want) > COST_TOLERANCE * max(1.0, abs(want))
            else:  # both +inf (no feasible plan) agree; anything else (NaN, one side finite) does not
                cost_mismatch += not (want == have == math.inf)
            other = planner_inputs(graph.model, graph.settings, scenes.history[i], scenes.agent_mask[i], warm, ego,
                                   step_noise(graph.model, graph.settings, gen_other))
            actions[:, j] = (int(expected["action"]), int(got["action"]),
                             int(graph(*(other[n] for n in names))[PLANNER_OUTPUTS.index("action")]),
                             int(session.run(["action"], {n: other[n].numpy() for n in names})[0]))
    agree = action_agreement(*actions)
    n = len(pick)
    return {"scenes": n, "same_action_same_noise": agree["same_noise_rate"], "same_plan_same_noise": same_plan / n,
            "same_action_same_noise_second_draw": agree["same_noise_b_rate"],
            "same_action_independent_noise": agree["independent_rate"],
            "torch_self_agreement_independent_noise": agree["torch_self_rate"],
            "export_changed_agreement": agree["export_changed"],
            "counts": {**{k: agree[k] for k in ("same_noise", "same_noise_b", "independent", "torch_self")},
                       "same_plan": same_plan, "same_reason": same_reason, "cost_mismatch": cost_mismatch},
            "max_abs_cost_error": worst_cost}
