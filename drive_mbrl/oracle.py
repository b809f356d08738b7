"""`agent=oracle`: plans on copies of the true simulator, the peer a learned-model planner is measured against.

At each decision it copies the env and expands the tree of action sequences exhaustively to `planner.oracle_depth`
policy steps (prefixes are shared: num_actions + num_actions^2 + ... simulated steps per decision), scoring each
sequence by its discounted env reward (a crash ends the sequence). This is a perfect model with a budget, the way
rl-agents' tree-search planners use highway-env; it shows what planning can reach and what it costs per decision.
Perfect in dynamics, not clairvoyant: each copy draws its random events (spawns, behaviours) from its own stream.
Its budget is not the MPC planner's: at depth 2, 25 sequences of 2 steps (1.1 s per decision on a 2-core CPU);
the planner's 512 sequences of 5 steps simulated so would take about 100 times that.
Duck-typed on highway-env's env (deep copies of `env.unwrapped`); imports nothing heavy.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from drive_mbrl.agents import meta_actions
from drive_mbrl.mpc import planner_config


def copy_env(env: Any, rng: Any = None) -> Any:
    """A deep copy of the simulator that steps on its own (the episode's track recorder hook is dropped). With
    `rng` (a numpy Generator) the copy draws its random events (vehicles spawned at intersections and ramps, their
    behaviour) from a fresh stream taken from it: a deep copy alone would replay the real episode's future draws,
    a clairvoyance no model has."""
    twin = copy.deepcopy(env.unwrapped)
    twin.road.__dict__.pop("step", None)  # TrackRecorder patches road.step on the instance
    if rng is not None:
        fresh = np.random.default_rng(int(rng.integers(2**63)))
        twin.np_random = fresh
        twin.road.np_random = fresh
    return twin


class OracleAgent:
    drives_itself = False

    def __init__(self, planner: dict[str, Any] | None = None):
        self.settings = planner_config(planner)
        self.last_fallback = ""

    def reset(self, env: Any, seed: int) -> None:
        self._actions = list(range(len(meta_actions(env))))
        self._rng = np.random.default_rng(self.settings.seed * 1_000_003 + seed)  # the copies' random events

    def action_values(self, env: Any, depth: int) -> list[float]:
        """Best discounted return of each first action over `depth` steps from this simulator state."""
        values = []
        for action in self._actions:
            twin = copy_env(env, self._rng)
            _, reward, terminated, truncated, _ = twin.step(action)
            value = float(reward)
            if twin.vehicle.crashed:
                value -= self.settings.collision_cost
            elif depth > 1 and not (terminated or truncated):
                value += self.settings.gamma * max(self.action_values(twin, depth - 1))
            values.append(value)
        return values

    def act(self, obs: Any, env: Any) -> int:
        values = self.action_values(env, self.settings.oracle_depth)
        return self._actions[max(range(len(values)), key=values.__getitem__)]
