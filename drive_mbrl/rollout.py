"""One closed-loop episode: a scenario's env, an agent and a track recorder give an `Episode`.

This is the single episode loop of the package; collection, evaluation and (later) planners' data all come from
here, so recorded data and measured driving figures can never disagree. It knows nothing of files or Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from drive_mbrl.agents import infer_meta_action, make_agent
from drive_mbrl.errors import ConfigError
from drive_mbrl.scenarios import Scenario, continuous_action_of, env_timing, is_continuous, make_env, reset_env
from drive_mbrl.tracking import TrackRecorder
from drive_mbrl.types import Agent, Episode


@dataclass(frozen=True)
class EpisodeJob:
    """Everything a (possibly remote) worker needs to reproduce one episode exactly."""

    scenario: Scenario
    agent: str
    index: int
    seed: int
    record_hz: int = 0
    """Recording rate [Hz]; 0 records every simulation frame. Must divide the simulation rate and be a multiple
    of the policy rate."""
    max_steps: int = 0
    """Stop after this many policy steps (0: the scenario's own end)."""
    agent_options: str = ""
    """JSON of the agent's options (a planner's checkpoint and settings); '' for rule agents."""


def recording_stride(sim_hz: int, policy_hz: int, record_hz: int) -> int:
    """Simulation frames per recorded frame; raises ConfigError if `record_hz` does not fit the env's rates."""
    record_hz = record_hz or sim_hz
    if sim_hz % record_hz or record_hz % policy_hz:
        rates = [r for r in range(policy_hz, sim_hz + 1) if sim_hz % r == 0 and r % policy_hz == 0]
        raise ConfigError(f"record_hz={record_hz} does not fit this scenario (simulation {sim_hz} Hz, policy "
                          f"{policy_hz} Hz): choose one of {rates} or 0 for the simulation rate")
    return sim_hz // record_hz


def stack_step_logs(logs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-step logs (one dict per policy step, `Agent.step_log`) into name -> (S, ...) arrays.

    Every step must log the same names, each with the same shape and dtype (a step with nothing to say fills with
    NaN / -1); names must be identifiers (they become file keys). Raises ValueError naming the step and the name.
    """
    if not logs:
        return {}
    first = {name: np.asarray(value) for name, value in logs[0].items()}
    for name in first:
        if not name.isidentifier():
            raise ValueError(f"step log name {name!r} is not an identifier")
    for step, log in enumerate(logs):
        if set(log) != set(first):
            raise ValueError(f"step {step} logged {sorted(log)}, step 0 logged {sorted(first)}: an agent's step "
                             "log must have the same names at every step")
        for name, value in log.items():
            value = np.asarray(value)
            if value.shape != first[name].shape or value.dtype != first[name].dtype:
                raise ValueError(f"step log {name!r} is {value.dtype}{value.shape} at step {step} but "
                                 f"{first[name].dtype}{first[name].shape} at step 0")
    return {name: np.stack([np.asarray(log[name]) for log in logs]) for name in first}


class EpisodeRunner:
    """Holds one env per (scenario) so a worker can run many episodes without rebuilding it."""

    def __init__(self) -> None:
        self._envs: dict[str, Any] = {}
        self._agents: dict[tuple[str, str], Agent] = {}

    def env(self, scenario: Scenario) -> Any:
        key = repr(scenario.to_dict())
        if key not in self._envs:
            self._envs[key] = make_env(scenario)
        return self._envs[key]

    def agent(self, name: str, options: str) -> Agent:
        """One agent per (name, options) per worker: a planner loads its model once, not once per episode."""
        key = (name, options)
        if key not in self._agents:
            self._agents[key] = make_agent(name, json.loads(options) if options else None)
        return self._agents[key]

    def run(self, job: EpisodeJob, agent: Agent | None = None) -> Episode:
        """Run `job` to its end and return the recorded episode."""
        env = self.env(job.scenario)
        agent = agent or self.agent(job.agent, job.agent_options)
        sim_hz, policy_hz = env_timing(env)
        stride = recording_stride(sim_hz, policy_hz, job.record_hz)
        recorder = TrackRecorder(job.scenario.perception_range, stride, 1.0 / sim_hz)
        frames_per_step = sim_hz // policy_hz // stride

        obs, _ = reset_env(env, job.seed)
        continuous = is_continuous(env)  # after the reset, which (re)builds the action type from the config
        agent.reset(env, job.seed)
        recorder.attach(env)
        if hasattr(agent, "attach_tracks"):  # planners read the scene from the recording of this very episode
            agent.attach_tracks(recorder)
        actions, rewards, components, crashed, terminated, truncated, decision_ms, decision_frame, fallback = \
            [], [], [], [], [], [], [], [], []
        component_names: list[str] | None = None
        logs: list[dict[str, np.ndarray]] = []
        done = False
        while not done:
            ego = env.unwrapped.vehicle
            lane_before = None if continuous else ego.target_lane_index  # for infer_meta_action
            speed_before = float(ego.speed)
            decision_frame.append(recorder.frames - 1)
            start = time.perf_counter()
            action = agent.act(obs, env)
            action = np.asarray(action, np.float32) if continuous else int(action)
            decision_ms.append((time.perf_counter() - start) * 1e3)
            fallback.append(getattr(agent, "last_fallback", ""))
            if hasattr(agent, "step_log"):
                logs.append(agent.step_log())
            obs, reward, term, trunc, info = env.step(action)
            if agent.drives_itself:
                action = continuous_action_of(env) if continuous else infer_meta_action(
                    env, lane_before, ego.target_lane_index, speed_before, float(ego.speed))
            terms = info.get("rewards", {})
            component_names = component_names or sorted(terms)
            actions.append(action)
            rewards.append(float(reward))
            components.append([float(terms.get(name, np.nan)) for name in component_names])
            crashed.append(bool(env.unwrapped.vehicle.crashed))
            terminated.append(bool(term))
            truncated.append(bool(trunc) or (job.max_steps > 0 and len(actions) >= job.max_steps))
            done = terminated[-1] or truncated[-1]
            assert recorder.frames - 1 == decision_frame[-1] + frames_per_step
        tracks = recorder.arrays()
        return Episode(
            index=job.index, seed=job.seed, **tracks,
            decision_frame=np.asarray(decision_frame, dtype=np.int32),
            action=(np.asarray(actions, np.float32).reshape(len(actions), -1) if continuous
                    else np.asarray(actions, dtype=np.int64)),
            reward=np.asarray(rewards, dtype=np.float64),
            reward_components=np.asarray(components, dtype=np.float64).reshape(len(actions), -1),
            reward_component_names=np.asarray(component_names or [], dtype=str),
            crashed=np.asarray(crashed), terminated=np.asarray(terminated), truncated=np.asarray(truncated),
            decision_ms=np.asarray(decision_ms, dtype=np.float64),
            fallback=np.asarray(fallback, dtype=str).reshape(len(actions)),
            step_log=stack_step_logs(logs),
        )

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
