"""Scenario files and environments: load and validate scenarios/NAME.yaml, build the highway-env env it pins.

A scenario pins one highway-env id and its env config, so results stay comparable across runs; its fields are not
overridden per run. It may also recommend planner settings for its road (`planner:`), which are only defaults. This
is the only module that imports highway_env (lazily, inside `make_env`), so the rest of the package can be read and
tested without it. It knows nothing of agents, tracks or files of episodes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drive_mbrl.errors import ConfigError
from drive_mbrl.resources import data_dir

SCENARIO_SCHEMA_VERSION = 1
_KEYS = {
    "schema_version": "scenario file format version (1)",
    "name": "short name, the file's stem",
    "description": "one line for humans",
    "env_id": "highway-env gymnasium id, pinned (e.g. highway-fast-v0)",
    "env_config": "mapping passed to the env's configure(); keys must exist in the env's default_config()",
    "perception_range": "[m] radius around the ego within which other vehicles are tracked",
    "planner": "mapping of the MPC planner's settings that suit this road (planner.KEY defaults for agent=mpc; a "
               "command-line planner.KEY=VALUE still wins)",
}
_REQUIRED = ("name", "env_id")


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file."""

    name: str
    env_id: str
    env_config: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    perception_range: float = 150.0
    """[m] other vehicles farther than this from the ego are not recorded."""
    source: str = ""
    """Path of the YAML file it came from."""
    planner: dict[str, Any] = field(default_factory=dict)
    """Planner settings recommended for this road (`PlannerConfig` field -> value), e.g. no straight-lane
    lookahead on a roundabout; checked against PlannerConfig and applied by `config.with_scenario_planner`. Not
    part of the env, so not in `to_dict` (manifests)."""

    def to_dict(self) -> dict[str, Any]:
        """The scenario as stored in manifests (JSON-compatible)."""
        return {
            "schema_version": SCENARIO_SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "env_id": self.env_id,
            "env_config": self.env_config,
            "perception_range": self.perception_range,
        }

    @property
    def continuous_actions(self) -> bool:
        """Whether the scenario's env takes continuous actions (its env_config sets highway-env's ContinuousAction)."""
        return (self.env_config.get("action") or {}).get("type") == "ContinuousAction"


def available_scenarios() -> list[str]:
    """Names of the scenarios shipped in scenarios/."""
    return sorted(p.stem for p in data_dir("scenarios").glob("*.yaml"))


def scenario_path(name_or_path: str) -> Path:
    """Resolve `name_or_path`: a shipped scenario name, or a path to a user's YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"scenario file '{name_or_path}' does not exist: pass a shipped name "
                              f"({', '.join(available_scenarios())}) or the path of a YAML file")
        return path
    path = data_dir("scenarios") / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario '{name_or_path}': choose one of {', '.join(available_scenarios())} "
                          "or pass the path of your own scenario YAML")
    return path


def load_scenario(name_or_path: str) -> Scenario:
    """Load and validate a scenario; raises ConfigError naming the file and the offending key."""
    path = scenario_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"scenario file {path} must hold a mapping with keys {', '.join(_KEYS)}")
    return scenario_from_dict(raw, source=str(path))


def scenario_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a scenario mapping (as read from YAML or from a manifest)."""
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        allowed = "; ".join(f"{k}: {v}" for k, v in _KEYS.items())
        raise ConfigError(f"scenario {source}: unknown key(s) {', '.join(map(repr, unknown))}. "
                          f"Allowed keys — {allowed}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"scenario {source}: missing required key(s) {', '.join(missing)}")
    version = raw.get("schema_version", SCENARIO_SCHEMA_VERSION)
    if version != SCENARIO_SCHEMA_VERSION:
        raise ConfigError(f"scenario {source}: schema_version {version} is not supported "
                          f"(this drive_mbrl reads version {SCENARIO_SCHEMA_VERSION})")
    env_config = raw.get("env_config") or {}
    if not isinstance(env_config, dict):
        raise ConfigError(f"scenario {source}: env_config must be a mapping, got {type(env_config).__name__}")
    perception_range = raw.get("perception_range", 150.0)
    if isinstance(perception_range, bool) or not isinstance(perception_range, (int, float)) \
            or not 0 < perception_range <= 1000:
        raise ConfigError(f"scenario {source}: perception_range={perception_range!r} must be a number "
                          "in (0, 1000] metres")
    planner = raw.get("planner") or {}
    if not isinstance(planner, dict) or not all(isinstance(k, str) for k in planner):
        raise ConfigError(f"scenario {source}: planner must be a mapping of planner setting -> value "
                          f"(e.g. `planner: {{lookahead: 0}}`), got {planner!r}")
    return Scenario(name=str(raw["name"]), env_id=str(raw["env_id"]), env_config=dict(env_config),
                    description=str(raw.get("description", "")), perception_range=float(perception_range),
                    source=source, planner=dict(planner))


def make_env(scenario: Scenario) -> Any:
    """Build the gymnasium env of `scenario` (highway-env imported here, lazily).

    Raises ConfigError if the id is not a highway-env id or an env_config key is unknown to that env.
    """
    import gymnasium as gym
    import highway_env  # noqa: F401  (registers the ids)

    try:
        spec = gym.spec(scenario.env_id)
    except gym.error.Error as exc:
        raise ConfigError(f"scenario {scenario.name}: env_id '{scenario.env_id}' is not a registered "
                          f"highway-env id ({exc})") from exc
    _snapshot_vehicle_classes()  # before any env of this process has reset, which gym.make does (see reset_env)
    with warnings.catch_warnings():
        # The *-v0 ids are pinned on purpose (see ANCHORS.md); silence gymnasium's "out of date" notice.
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(spec.id)
    defaults = env.unwrapped.default_config()
    unknown = sorted(set(scenario.env_config) - set(defaults))
    if unknown:
        env.close()
        raise ConfigError(f"scenario {scenario.name}: env_config key(s) {', '.join(map(repr, unknown))} are not "
                          f"options of {scenario.env_id}; known keys: {', '.join(sorted(defaults))}")
    env.unwrapped.configure(scenario.env_config)
    _check_space_options(env, scenario)
    return env


def _init_options(cls: type) -> set[str]:
    """Keyword options a highway-env action or observation class takes: the named parameters of its `__init__`
    and of its parents' as far as `**kwargs` is passed on (self and env excluded)."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in ("self", "env")}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _check_space_options(env: Any, scenario: Scenario) -> None:
    """A scenario's `action` / `observation` mappings name options of the classes they configure: highway-env passes
    them on as keyword arguments and drops unknown ones silently (a typo such as `lateal: false` changed nothing)."""
    given = {k: v for k, v in scenario.env_config.items() if k in ("action", "observation") and isinstance(v, dict)}
    if not given:  # nothing to check: no extra work on every env made
        return
    unwrapped = env.unwrapped
    unwrapped.define_spaces()  # builds the configured action and observation types (reset builds them again)
    for key, options in given.items():
        built = unwrapped.action_type if key == "action" else unwrapped.observation_type
        known = _init_options(type(built)) | {"type"}
        unknown = sorted(set(options) - known)
        if unknown:
            env.close()
            raise ConfigError(f"scenario {scenario.name}: env_config.{key} option(s) {', '.join(map(repr, unknown))} "
                              f"are not options of {type(built).__name__}; known: {', '.join(sorted(known))}")


_PRISTINE: dict[type, dict[str, Any]] = {}
"""Class-level constants of highway-env's vehicle classes as imported, keyed by class."""


def _vehicle_classes() -> list[type]:
    from highway_env.vehicle import behavior, controller, kinematics

    return [kinematics.Vehicle, controller.ControlledVehicle, controller.MDPVehicle, behavior.IDMVehicle,
            behavior.LinearVehicle, behavior.AggressiveVehicle, behavior.DefensiveVehicle]


def _snapshot_vehicle_classes() -> None:
    if not _PRISTINE:
        _PRISTINE.update({cls: {k: v for k, v in vars(cls).items() if k.isupper()} for cls in _vehicle_classes()})


def reset_env(env: Any, seed: int) -> tuple[Any, dict]:
    """`env.reset(seed=seed)` after restoring highway-env's vehicle classes to their imported constants.

    Some envs change class attributes for the whole process when they reset (intersection-v0 sets IDMVehicle's
    DISTANCE_WANTED, COMFORT_ACC_MAX and COMFORT_ACC_MIN), which would make an episode depend on the scenarios run
    before it in the same process — and data depend on how episodes were spread over workers. Restoring them before
    every reset makes each episode a function of its scenario and seed alone.
    """
    _snapshot_vehicle_classes()
    for cls in _PRISTINE:
        for name in [k for k in vars(cls) if k.isupper() and k not in _PRISTINE[cls]]:
            delattr(cls, name)
        for name, value in _PRISTINE[cls].items():
            setattr(cls, name, value)
    return env.reset(seed=seed)


def env_timing(env: Any) -> tuple[int, int]:
    """(simulation_frequency, policy_frequency) [Hz] of a built env."""
    config = env.unwrapped.config
    return int(config["simulation_frequency"]), int(config["policy_frequency"])


def is_continuous(env: Any) -> bool:
    """Whether the env takes continuous actions (highway-env's ContinuousAction) rather than meta-actions."""
    return not hasattr(env.unwrapped.action_type, "actions")


def action_names(env: Any) -> list[str]:
    """Meta-action names indexed by the discrete action the env accepts; for continuous actions, the names of the
    action vector's components (`acceleration`, `steering`, each scaled to [-1, 1] over its range)."""
    action_type = env.unwrapped.action_type
    if is_continuous(env):
        return [name for name, on in (("acceleration", action_type.longitudinal), ("steering", action_type.lateral))
                if on]
    actions = action_type.actions
    return [actions[i] for i in range(len(actions))]


def to_continuous_action(env: Any, control: dict[str, float]) -> Any:
    """A control {acceleration [m/s^2], steering [rad]} as the ContinuousAction vector (D,) float32 in [-1, 1]
    that makes the env apply it: the inverse of ContinuousAction.get_action's linear map of [-1, 1] onto each
    range, clipped (a missing entry counts as 0)."""
    import numpy as np

    action_type = env.unwrapped.action_type
    values = [2.0 * (float(control.get(name, 0.0)) - lo) / (hi - lo) - 1.0
              for name, on, (lo, hi) in (("acceleration", action_type.longitudinal, action_type.acceleration_range),
                                         ("steering", action_type.lateral, action_type.steering_range)) if on]
    return np.clip(np.asarray(values, np.float32), -1.0, 1.0)


def continuous_action_of(env: Any) -> Any:
    """The ego's last applied control (`Vehicle.action`, set by whatever drives it, such as highway-env's IDM) as a
    ContinuousAction vector (`to_continuous_action`): how a self-driving ego's actions are recorded in a
    continuous scenario. Controls beyond the action's ranges are clipped (highway-env's IDM brakes at up to 6
    m/s^2, the action range ends at 5), and the control of a policy step's last frame stands for the step."""
    return to_continuous_action(env, getattr(env.unwrapped.vehicle, "action", None) or {})


@dataclass(frozen=True)
class LaneGeometry:
    """One lane of the road network sampled as polylines in the world frame ([m])."""

    edge: str
    """Road edge 'from->to' (as in `Episode.lane_edges`)."""
    index: int
    """Lane number within its edge."""
    centre: Any
    """(P, 2) float64 points along the lane centre."""
    left: Any
    """(P, 2) the lane's left border (lateral -width/2; the driver's left on highway roads)."""
    right: Any
    """(P, 2) the lane's right border (lateral +width/2)."""
    left_line: int
    """highway-env's LineType of the left border: 0 none, 1 striped, 2 continuous, 3 continuous line."""
    right_line: int


def road_geometry(scenario: Scenario, seed: int, spacing: float = 2.0, max_points: int = 400) -> list[LaneGeometry]:
    """Every lane of the scenario's road network after a reset with `seed`, sampled every `spacing` [m] (at most
    `max_points` per lane: highway's 10 km straight lanes) through the lane's own `position(s, lateral)` (straight,
    sine and circular lanes alike), with collinear points dropped so a straight lane keeps only its ends."""
    import numpy as np

    env = make_env(scenario)
    try:
        reset_env(env, seed)
        lanes = []
        for start, ends in env.unwrapped.road.network.graph.items():
            for end, edge_lanes in ends.items():
                for index, lane in enumerate(edge_lanes):
                    points = int(np.clip(np.ceil(lane.length / spacing) + 1, 2, max_points))
                    s = np.linspace(0.0, float(lane.length), points)
                    half = np.array([lane.width_at(si) / 2 for si in s])
                    centre, left, right = (np.array([lane.position(si, k * w) for si, w in zip(s, half, strict=True)])
                                           for k in (0.0, -1.0, 1.0))
                    keep = _turning_points(centre)
                    lines = [int(t) for t in lane.line_types]
                    lanes.append(LaneGeometry(f"{start}->{end}", index, centre[keep], left[keep], right[keep],
                                              lines[0], lines[1]))
        return lanes
    finally:
        env.close()


def _turning_points(points: Any, tolerance: float = 1e-4) -> Any:
    """Indices of a polyline's (P, 2) ends and of the points where its direction changes by > `tolerance` [rad]."""
    import numpy as np

    step = np.diff(points, axis=0)
    angle = np.arctan2(step[:, 1], step[:, 0])
    turn = np.abs(np.angle(np.exp(1j * np.diff(angle)))) > tolerance
    return np.concatenate([[0], np.flatnonzero(turn) + 1, [len(points) - 1]])
