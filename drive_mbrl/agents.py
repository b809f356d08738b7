"""Built-in rule agents and the one place where agent names are turned into agents.

- `random`: uniform random meta-actions from a seeded generator.
- `slower`: always SLOWER (a safe, slow floor).
- `explore`: random meta-actions weighted towards keeping speed and lane (`EXPLORE_WEIGHTS`), each held for 1-3
  steps, so episodes last and the data holds varied, sustained ego actions for the forecaster to learn from. In a
  continuous-action scenario (where uniform random control leaves the road within seconds) the ego is highway-env's
  IDM instead, with a random target speed and random lane changes (`ContinuousExplore`), recorded like `idm`.
- `idm`: the ego is driven by highway-env's own IDM (longitudinal) and MOBIL (lane change) behaviour model: on
  reset the ego's controller is replaced by an `IDMVehicle` at the same state, route and target speed. The recorded
  action is the meta-action inferred from the ego's motion (`infer_meta_action`), or in a continuous-action
  scenario its applied acceleration and steering (`scenarios.continuous_action_of`).

Later agents (planner, learned policy, exploration) plug in through `make_agent`: anything with `drives_itself`,
`reset(env, seed)` and `act(obs, env) -> int` (a (D,) float array in a continuous-action scenario; the `Agent`
protocol in types.py) works. Agents get the live env; only `idm` and continuous `explore` (`_install_idm`) touch
highway-env classes, lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from drive_mbrl.errors import ConfigError
from drive_mbrl.scenarios import is_continuous
from drive_mbrl.types import Agent

BUILTIN_AGENTS = ("random", "slower", "idm", "explore")
"""Rule agents that need no options."""
AGENTS = (*BUILTIN_AGENTS, "mpc", "oracle", "policy", "dagger", "onnx")
"""Every agent name: `mpc` plans on a learned forecaster (mpc.py, option `checkpoint`), `oracle` plans on copies of
the true simulator (oracle.py), `policy` is the reactive policy network (policy.py, option `checkpoint`), `dagger`
lets a policy drive while the planner labels every step (distill.py; without a policy the planner drives and
logs its per-action costs), `onnx` drives from an exported bundle with onnxruntime alone (onboard.py, option
`bundle`)."""
EXPLORE_WEIGHTS = {"LANE_LEFT": 0.15, "IDLE": 0.3, "LANE_RIGHT": 0.15, "FASTER": 0.15, "SLOWER": 0.25}
"""Relative probabilities of the `explore` agent's actions (renormalised over the actions a scenario has)."""
SPEED_CHANGE_THRESHOLD = 1.0
"""[m/s] change of the ego's speed over one policy step above which an inferred action is FASTER / SLOWER."""


def meta_actions(env: Any) -> dict[str, int]:
    """The scenario's meta-action indexes by name, for agents that drive meta-actions; a clear error in a
    continuous-action scenario."""
    if is_continuous(env):
        raise ConfigError("this scenario takes continuous actions and this agent drives meta-actions: use "
                          "agent=idm, random or mpc there")
    return env.unwrapped.action_type.actions_indexes


def _action_index(env: Any, name: str) -> int:
    actions = meta_actions(env)
    if name not in actions:
        raise ConfigError(f"this scenario's action space has no {name} action (it has {', '.join(actions)})")
    return int(actions[name])


class RandomAgent:
    """Uniform random actions: discrete meta-actions, or uniform over a continuous action box."""

    drives_itself = False

    def reset(self, env: Any, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray, env: Any) -> int | np.ndarray:
        space = env.action_space
        if is_continuous(env):  # uniform over the box
            return self._rng.uniform(space.low, space.high).astype(np.float32)
        return int(self._rng.integers(space.n))


@dataclass(frozen=True)
class ContinuousExplore:
    """How `explore` drives in a continuous-action scenario: highway-env's IDM follows a random target speed and
    random target lanes (MOBIL off), so the recorded acceleration and steering vary far more than under `idm`
    while the ego stays on the road."""

    speed_range: tuple[float, float] = (15.0, 35.0)
    """[m/s] target speeds, drawn uniformly."""
    hold_steps: tuple[int, int] = (2, 6)
    """Policy steps each target speed is held for (drawn uniformly, both ends included)."""
    lane_change_p: float = 0.2
    """Per policy step: probability of a change of target lane to a random neighbouring lane."""


CONTINUOUS_EXPLORE = ContinuousExplore()


def _install_idm(env: Any) -> Any:
    """Replace the ego's controller by highway-env's `IDMVehicle` at the same state; returns it."""
    from highway_env.vehicle.behavior import IDMVehicle

    base = env.unwrapped
    ego = base.vehicle
    if hasattr(ego, "target_lane_index"):
        idm = IDMVehicle.create_from(ego)
    else:  # a continuous-action ego is a plain kinematic Vehicle: keep its lane and its speed at the start
        idm = IDMVehicle(base.road, ego.position, ego.heading, ego.speed, target_lane_index=ego.lane_index,
                         target_speed=ego.speed)
    base.road.vehicles[base.road.vehicles.index(ego)] = idm
    base.controlled_vehicles[base.controlled_vehicles.index(ego)] = idm
    return idm


class ExploreAgent:
    """Weighted random meta-actions (`EXPLORE_WEIGHTS`), each held for 1 to 3 policy steps; in a continuous-action
    scenario IDM with random target speeds and lanes (`ContinuousExplore`; the agent then drives itself)."""

    drives_itself = False

    def __init__(self, continuous: ContinuousExplore = CONTINUOUS_EXPLORE):
        self.continuous = continuous

    def reset(self, env: Any, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.drives_itself = is_continuous(env)
        if self.drives_itself:
            self._idm = _install_idm(env)
            self._idm.enable_lane_change = False
            self._idle = np.zeros(env.action_space.shape, np.float32)
            self._left = 0
            return
        names = meta_actions(env)
        self._actions = np.array([names[n] for n in EXPLORE_WEIGHTS if n in names])
        weights = np.array([w for n, w in EXPLORE_WEIGHTS.items() if n in names])
        self._p = weights / weights.sum()
        self._held, self._left = 0, 0

    def act(self, obs: np.ndarray, env: Any) -> int | np.ndarray:
        if self.drives_itself:
            return self._steer_idm(env)
        if self._left == 0:
            self._held = int(self._rng.choice(self._actions, p=self._p))
            self._left = int(self._rng.integers(1, 4))
        self._left -= 1
        return self._held

    def _steer_idm(self, env: Any) -> np.ndarray:
        """Draw the IDM ego's next target speed and lane; the returned action is ignored by the simulator."""
        c, idm = self.continuous, self._idm
        if self._left == 0:
            idm.target_speed = float(self._rng.uniform(*c.speed_range))
            self._left = int(self._rng.integers(c.hold_steps[0], c.hold_steps[1] + 1))
        self._left -= 1
        if self._rng.random() < c.lane_change_p:
            lanes = env.unwrapped.road.network.side_lanes(idm.lane_index)
            if lanes:
                idm.target_lane_index = lanes[int(self._rng.integers(len(lanes)))]
        return self._idle


class ConstantAgent:
    """Always the same meta-action, by name (e.g. SLOWER)."""

    drives_itself = False

    def __init__(self, action_name: str):
        self.action_name = action_name

    def reset(self, env: Any, seed: int) -> None:
        self._action = _action_index(env, self.action_name)

    def act(self, obs: np.ndarray, env: Any) -> int:
        return self._action


class IDMAgent:
    """The ego driven by highway-env's IDM/MOBIL model (its own decisions at every simulation frame)."""

    drives_itself = True

    def reset(self, env: Any, seed: int) -> None:
        _install_idm(env)
        # Ignored by the simulator either way: the IDM vehicle decides for itself.
        self._idle = np.zeros(env.action_space.shape, np.float32) if is_continuous(env) else _action_index(env, "IDLE")

    def act(self, obs: np.ndarray, env: Any) -> int | np.ndarray:
        return self._idle


def infer_meta_action(env: Any, lane_before: tuple, lane_after: tuple, speed_before: float,
                      speed_after: float) -> int:
    """Meta-action that best describes one policy step of a self-driving ego.

    A change of target lane within the same road edge is LANE_LEFT (lower lane id) or LANE_RIGHT; otherwise a speed
    change beyond `SPEED_CHANGE_THRESHOLD` [m/s] is FASTER / SLOWER; otherwise IDLE. Actions the scenario lacks
    (intersection has no lane changes) fall back to the speed rule.
    """
    actions = env.unwrapped.action_type.actions_indexes
    if lane_before[:2] == lane_after[:2] and lane_before[2] != lane_after[2]:
        name = "LANE_LEFT" if lane_after[2] < lane_before[2] else "LANE_RIGHT"
        if name in actions:
            return int(actions[name])
    if speed_after - speed_before > SPEED_CHANGE_THRESHOLD:
        return int(actions["FASTER"])
    if speed_before - speed_after > SPEED_CHANGE_THRESHOLD:
        return int(actions["SLOWER"])
    return int(actions["IDLE"])


def make_agent(name: str, options: dict[str, Any] | None = None) -> Agent:
    """Build an agent by name with its options (planner settings, checkpoint); raises ConfigError listing the
    known names. The planning agents are imported here, lazily, so rule agents never pull in torch."""
    options = options or {}
    if name == "mpc":
        from drive_mbrl.mpc import MPCAgent

        return MPCAgent(**options)
    if name == "onnx":
        from drive_mbrl.onboard import OnnxAgent

        return OnnxAgent(**options)
    if name == "oracle":
        from drive_mbrl.oracle import OracleAgent

        return OracleAgent(**options)
    if name == "dagger":
        from drive_mbrl.distill import DaggerAgent

        return DaggerAgent(**options)
    if name == "policy":
        from drive_mbrl.policy import PolicyAgent

        return PolicyAgent(**options)
    if name == "random":
        return RandomAgent()
    if name == "slower":
        return ConstantAgent("SLOWER")
    if name == "idm":
        return IDMAgent()
    if name == "explore":
        return ExploreAgent()
    raise ConfigError(f"agent={name!r} is not known: choose one of {', '.join(AGENTS)}")
