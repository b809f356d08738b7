"""Tracks with stable ids from highway-env's simulator state.

highway-env's Kinematics observation reorders vehicles at every step and carries no ids (HighwayEnv #211, #212),
so tracks are read from `env.unwrapped.road.vehicles` instead. The recorder hooks the road's `step` on the env's
instance, so it sees every simulation frame (not only policy steps) and records every `stride`-th one. Track ids
are assigned by object identity: the ego is 0, others 1, 2, ... in order of first appearance within perception
range; a vehicle that leaves and re-enters the range keeps its id.

This module reads simulator objects only through duck-typed attributes (position, heading, speed, lane_index,
LENGTH, WIDTH); it does not import highway_env and knows nothing of agents or files.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from drive_mbrl.types import STATE_FIELDS


def vehicle_state(vehicle: Any) -> tuple[float, ...]:
    """World-frame state of one simulated vehicle in `STATE_FIELDS` order (SI units)."""
    x, y = float(vehicle.position[0]), float(vehicle.position[1])
    heading, speed = float(vehicle.heading), float(vehicle.speed)
    return (x, y, speed * math.cos(heading), speed * math.sin(heading), heading,
            float(vehicle.LENGTH), float(vehicle.WIDTH))


class TrackRecorder:
    """Records the ego and every vehicle within `perception_range` [m] at every `stride`-th simulation frame.

    Call `attach(env)` after each `env.reset`; frames are then recorded as the env steps. `frames` counts the
    recorded frames so far (frame 0 is the state at attach time).
    """

    def __init__(self, perception_range: float, stride: int, sim_dt: float):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.perception_range = perception_range
        self.stride = stride
        self.sim_dt = sim_dt
        self._clear()

    def _clear(self) -> None:
        self._ids: dict[int, int] = {}
        self._keep_alive: list[Any] = []  # holds tracked vehicles so their id() is never reused
        self._classes: list[str] = []
        self._edges: dict[str, int] = {}
        self._rows: list[dict[int, tuple[tuple[float, ...], int, int, float, float]]] = []
        self._times: list[float] = []
        self._sim_frames = 0
        self._env: Any = None

    @property
    def frames(self) -> int:
        return len(self._rows)

    def attach(self, env: Any) -> None:
        """Start recording a freshly reset env (records frame 0 now)."""
        self._clear()
        self._env = env.unwrapped
        self._track_id(self._env.vehicle)  # the ego is track 0
        road = self._env.road
        original_step = road.step

        def step_and_record(dt: float) -> None:
            original_step(dt)
            self._sim_frames += 1
            if self._sim_frames % self.stride == 0:
                self._record()

        road.step = step_and_record
        self._record()

    def track_of(self, vehicle: Any) -> int | None:
        """Track id of a simulated vehicle, or None if it was never within perception range."""
        return self._ids.get(id(vehicle))

    def _track_id(self, vehicle: Any) -> int:
        key = id(vehicle)
        if key not in self._ids:
            self._ids[key] = len(self._ids)
            self._keep_alive.append(vehicle)
            self._classes.append(type(vehicle).__name__)
        return self._ids[key]

    def _edge(self, lane_index: Any) -> int:
        name = f"{lane_index[0]}->{lane_index[1]}"
        return self._edges.setdefault(name, len(self._edges))

    def _record(self) -> None:
        env = self._env
        ego = env.vehicle
        ex, ey = float(ego.position[0]), float(ego.position[1])
        row = {}
        for vehicle in env.road.vehicles:
            if vehicle is not ego and math.hypot(vehicle.position[0] - ex, vehicle.position[1] - ey) \
                    > self.perception_range:
                continue
            row[self._track_id(vehicle)] = self._lane_row(vehicle)
        if 0 not in row:  # the ego can leave road.vehicles in some envs (e.g. on arrival)
            row[0] = self._lane_row(ego)
        self._rows.append(row)
        self._times.append(self._sim_frames * self.sim_dt)

    def _lane_row(self, vehicle: Any) -> tuple[tuple[float, ...], int, int, float, float]:
        """State, lane id, edge index, lateral offset from the lane centre [m] and the lane's heading [rad]."""
        index, lane = vehicle.lane_index, vehicle.lane
        longitudinal, lateral = lane.local_coordinates(vehicle.position)
        return (vehicle_state(vehicle), int(index[2]), self._edge(index), float(lateral),
                float(lane.heading_at(longitudinal)))

    @property
    def frame_dt(self) -> float:
        """[s] between recorded frames."""
        return self.stride * self.sim_dt

    def arrays(self, frames: list[int] | None = None) -> dict[str, np.ndarray]:
        """The recording so far as arrays: frame_time (T,), state (T, M, F), present (T, M), lane_id, lane_edge,
        lane_offset, lane_heading (T, M), lane_edges (L,), vehicle_class (M,). `frames` picks recorded frames
        (T = len(frames); a planner needs only its history window), default all."""
        rows = self._rows if frames is None else [self._rows[f] for f in frames]
        times = self._times if frames is None else [self._times[f] for f in frames]
        frames, tracks = len(rows), len(self._ids)
        state = np.full((frames, tracks, len(STATE_FIELDS)), np.nan, dtype=np.float32)
        present = np.zeros((frames, tracks), dtype=bool)
        lane_id = np.full((frames, tracks), -1, dtype=np.int16)
        lane_edge = np.full((frames, tracks), -1, dtype=np.int16)
        lane_offset = np.full((frames, tracks), np.nan, dtype=np.float32)
        lane_heading = np.full((frames, tracks), np.nan, dtype=np.float32)
        for t, row in enumerate(rows):
            for track, (values, lane, edge, offset, heading) in row.items():
                state[t, track] = values
                present[t, track] = True
                lane_id[t, track] = lane
                lane_edge[t, track] = edge
                lane_offset[t, track] = offset
                lane_heading[t, track] = heading
        return {
            "frame_time": np.asarray(times, dtype=np.float64),
            "state": state,
            "present": present,
            "lane_id": lane_id,
            "lane_edge": lane_edge,
            "lane_offset": lane_offset,
            "lane_heading": lane_heading,
            "lane_edges": np.asarray(list(self._edges), dtype=str),
            "vehicle_class": np.asarray(self._classes, dtype=str),
        }
