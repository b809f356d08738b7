"""Shape glossary, the recorded `Episode`, and the `Agent` protocol.

Shape letters used in docstrings across the package:

    B batch, T recorded frames, S policy steps, H horizon, N candidate plans, E ensemble members, K modes,
    M tracks in an episode, V vehicles in a scene, F features, C reward components, A action dims.

Units are SI ([m], [m/s], [rad], [s]) and positions are in highway-env's world frame (x along the road network's
reference, y to the driver's right on highway roads, heading in [rad] from +x towards +y) unless a docstring says
otherwise. This module imports only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

STATE_FIELDS: tuple[str, ...] = ("x", "y", "vx", "vy", "heading", "length", "width")
"""Order of the last axis of `Episode.state`."""
STATE_UNITS: tuple[str, ...] = ("m", "m", "m/s", "m/s", "rad", "m", "m")
EGO_TRACK = 0
"""The ego vehicle is always track 0; other vehicles get ids 1, 2, ... in order of first appearance."""


@dataclass
class Episode:
    """One closed-loop episode: tracks of every perceived vehicle plus the ego's per-step decisions.

    Frames are recorded at `record_hz`; frame 0 is the state right after reset. Policy step s was decided at frame
    `decision_frame[s]` and its outcome is the state at `decision_frame[s + 1]` (or the last frame).
    Absent entries of `state` (track not within perception range) are NaN and `present` is False.
    """

    index: int
    """Episode index within its dataset (file name and seed derive from it)."""
    seed: int
    """Seed passed to `env.reset` and to the agent's generator."""
    frame_time: np.ndarray
    """(T,) float64 [s] time since reset of each recorded frame."""
    state: np.ndarray
    """(T, M, F) float32 world-frame state of each track, fields `STATE_FIELDS`; NaN where absent."""
    present: np.ndarray
    """(T, M) bool: track m was within perception range of the ego at frame t (the ego always is)."""
    lane_id: np.ndarray
    """(T, M) int16 lane number within its road edge (highway-env's lane_index[2]); -1 where absent."""
    lane_edge: np.ndarray
    """(T, M) int16 index into `lane_edges` of the road edge the track is on; -1 where absent."""
    lane_offset: np.ndarray
    """(T, M) float32 [m] lateral offset from the centre of the track's lane (highway-env's lane-local coordinate,
    positive to the lane's right); NaN where absent."""
    lane_heading: np.ndarray
    """(T, M) float32 [rad] heading of the lane at the track's position (world frame); NaN where absent."""
    lane_edges: np.ndarray
    """(L,) str road edges as 'from->to' node names of highway-env's road network."""
    vehicle_class: np.ndarray
    """(M,) str highway-env class name of each track's vehicle (the ego's is its controlled class)."""
    decision_frame: np.ndarray
    """(S,) int32 frame index at which each policy step was decided."""
    action: np.ndarray
    """(S,) int64 discrete meta-action executed at each policy step (see the manifest's action names); in a
    continuous-action scenario (S, D) float32, each component in [-1, 1] (the manifest names them)."""
    reward: np.ndarray
    """(S,) float64 env reward of each step."""
    reward_components: np.ndarray
    """(S, C) float64 highway-env's named reward terms, before weighting (`reward_component_names`)."""
    reward_component_names: np.ndarray
    """(C,) str."""
    crashed: np.ndarray
    """(S,) bool ego crashed at the end of the step."""
    terminated: np.ndarray
    """(S,) bool."""
    truncated: np.ndarray
    """(S,) bool."""
    decision_ms: np.ndarray
    """(S,) float64 [ms] wall time of the agent's decision (not deterministic; excluded from data identity)."""
    fallback: np.ndarray | None = None
    """(S,) str why a planning agent handed that step to its fallback ('' = it did not). Optional in files (episodes
    of rule agents written before it existed load with all '')."""
    step_log: dict[str, np.ndarray] | None = None
    """name -> (S, ...) what the agent logged at each policy step (`Agent.step_log`), fixed shape and dtype per name;
    stored in files as `log__<name>`. Empty for agents without a step log and for files written before it existed."""

    def __post_init__(self) -> None:
        if self.fallback is None:
            self.fallback = np.full(self.action.shape[0], "", dtype="<U1")
        if self.step_log is None:
            self.step_log = {}

    @property
    def steps(self) -> int:
        return int(self.action.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """All fields as numpy arrays (scalars as 0-d arrays), ready for `np.savez_compressed`; the step log's
        entries become `log__<name>`."""
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self) if f.name != "step_log"}
        arrays.update({STEP_LOG_PREFIX + name: np.asarray(value) for name, value in (self.step_log or {}).items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> Episode:
        kwargs = {f.name: arrays[f.name] for f in fields(cls) if f.name in arrays or f.name not in OPTIONAL_FIELDS}
        kwargs["index"] = int(kwargs["index"])
        kwargs["seed"] = int(kwargs["seed"])
        kwargs["step_log"] = {key[len(STEP_LOG_PREFIX):]: np.asarray(value) for key, value in arrays.items()
                              if key.startswith(STEP_LOG_PREFIX)}
        return cls(**kwargs)


STEP_LOG_PREFIX = "log__"
"""File key prefix of `Episode.step_log` entries."""
OPTIONAL_FIELDS: frozenset[str] = frozenset({"fallback", "step_log"})
EPISODE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Episode) if f.name not in OPTIONAL_FIELDS)
"""Fields every episode file holds (`OPTIONAL_FIELDS` may be missing)."""
NONDETERMINISTIC_FIELDS: frozenset[str] = frozenset({"decision_ms"})


class Agent(Protocol):
    """A driver of the ego vehicle: called once per policy step with the env's observation and the live env.

    `drives_itself` agents (such as `idm`) replace the ego's controller in `reset`; the action they return is ignored
    by the simulator and the recorded action is inferred from the ego's motion (documented in the manifest).
    Optional: planners define `attach_tracks(recorder)` (the episode loop hands them its track recorder after each
    reset, their perception), `last_fallback: str` (why the last step went to a fallback; stored per step) and
    `step_log() -> dict[str, np.ndarray]`, called after each `act`: what the agent wants kept of that decision,
    the same names with the same shape and dtype at every step of an episode (steps with nothing to log, such as a
    fallback step, fill with NaN / -1), stacked over steps into `Episode.step_log`.
    """

    drives_itself: bool

    def reset(self, env: Any, seed: int) -> None:
        """Prepare for a new episode on a freshly reset env; `seed` seeds any randomness of the agent."""

    def act(self, obs: np.ndarray, env: Any) -> int:
        """Return the discrete meta-action index to execute at this policy step (a (D,) float array in [-1, 1] in a
        continuous-action scenario)."""
