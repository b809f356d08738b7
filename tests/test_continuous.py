"""Continuous-action driving (`scenarios/highway_continuous.yaml`, highway-env's ContinuousAction): action vectors
against highway-env's own map, what the rule agents record, the braking fallback by hand, and the planner driving
on a forecaster trained on continuous actions (smoke)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.agents import make_agent
from drive_mbrl.config import PlannerConfig
from drive_mbrl.data import RunSpec, collect, load_dataset
from drive_mbrl.errors import ConfigError
from drive_mbrl.mpc import braking_control
from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
from drive_mbrl.scenarios import (
    action_names,
    is_continuous,
    load_scenario,
    make_env,
    reset_env,
    to_continuous_action,
)

SCENARIO = load_scenario("highway_continuous")


@pytest.fixture(scope="module")
def env():
    env = make_env(SCENARIO)
    reset_env(env, 0)
    yield env
    env.close()


def test_action_vectors_round_trip_through_highway_envs_map(env):
    """to_continuous_action inverts ContinuousAction.get_action (acceleration in [-5, 5] m/s^2, steering in
    [-45, 45] degrees, each onto [-1, 1])."""
    assert is_continuous(env) and action_names(env) == ["acceleration", "steering"]
    action_type = env.unwrapped.action_type
    rng = np.random.default_rng(0)
    for a in rng.uniform(-1.0, 1.0, (20, 2)).astype(np.float32):
        np.testing.assert_allclose(to_continuous_action(env, action_type.get_action(a)), a, atol=1e-6)
    assert to_continuous_action(env, {"acceleration": 2.5, "steering": math.pi / 8}).tolist() == [0.5, 0.5]
    assert to_continuous_action(env, {"acceleration": -50.0}).tolist() == [-1.0, 0.0]  # clipped; no steering: 0


def _assert_applied_acceleration_recorded(episodes: list, dt: float) -> None:
    """Each step's recorded acceleration is the one the simulator applied in its last frame, clipped to the action
    range: the ego's speed changes by exactly acceleration x frame time there (highway-env's kinematics)."""
    for episode in episodes:
        assert episode.action.shape == (episode.steps, 2) and episode.action.dtype == np.float32
        speed = np.hypot(episode.state[:, 0, 2], episode.state[:, 0, 3])
        end = episode.decision_frame[1:]  # the last frame of each step but the last
        applied = (speed[end] - speed[end - 1]) / dt
        crashed = episode.crashed[:-1]
        # IDM may brake harder than the action range's 5 m/s^2 (it did here: 6): the recorded vector is clipped.
        np.testing.assert_allclose(5.0 * episode.action[:-1, 0][~crashed], np.clip(applied[~crashed], -5, 5),
                                   atol=1e-3)


def test_idm_records_the_control_it_applied_and_random_spans_the_box(tmp_path: Path):
    """The idm ego's recorded acceleration is the one the simulator applied in the step's last frame (clipped to
    the action range): the ego's speed changes by exactly acceleration x frame time there (highway-env's
    kinematics). Meta-action agents are refused with a message."""
    collect(RunSpec(SCENARIO, "idm", 2, 0, max_steps=8), tmp_path / "idm")
    collect(RunSpec(SCENARIO, "random", 2, 0, max_steps=8), tmp_path / "random")
    manifest, episodes = load_dataset(tmp_path / "idm")
    assert manifest["action_space"] == "continuous" and manifest["action_names"] == ["acceleration", "steering"]
    _assert_applied_acceleration_recorded(episodes, manifest["dt"])
    _, episodes = load_dataset(tmp_path / "random")
    actions = np.concatenate([e.action for e in episodes])
    assert np.abs(actions).max() <= 1.0 and actions.std(0).min() > 0.3
    env = make_env(SCENARIO)
    reset_env(env, 0)
    for name in ("slower", "oracle"):
        with pytest.raises(ConfigError, match="continuous actions"):
            make_agent(name).reset(env, 0)
    env.close()


def test_explore_drives_idm_to_random_target_speeds_in_a_continuous_scenario(tmp_path: Path):
    """`explore` on continuous actions: IDM with random target speeds and lanes, recorded like idm (the applied
    control), and on the same seeds its speed and acceleration vary more than idm's own."""
    spread = {}
    for agent in ("idm", "explore"):
        collect(RunSpec(SCENARIO, agent, 2, 0, max_steps=15), tmp_path / agent)
        manifest, episodes = load_dataset(tmp_path / agent)
        _assert_applied_acceleration_recorded(episodes, manifest["dt"])
        speed = np.concatenate([np.hypot(e.state[:, 0, 2], e.state[:, 0, 3]) for e in episodes])
        spread[agent] = (np.ptp(speed), np.concatenate([e.action[:, 0] for e in episodes]).std())
    assert spread["explore"][0] > 1.5 * spread["idm"][0] and spread["explore"][1] > 1.5 * spread["idm"][1]


def test_kinematic_ego_path_matches_the_simulator():
    """rollout_ego_continuous against highway-env itself: the ego's positions and velocities at the end of each
    step of a held-action plan, in the decision's ego frame, equal the simulated ones (an ego alone on the road, so
    nothing hits it)."""
    from drive_mbrl.egomotion import rollout_ego_continuous
    from drive_mbrl.features import to_ego_frame
    from drive_mbrl.mpc import continuous_ego_path

    alone = load_scenario("highway_continuous")
    alone = type(alone)(**{**alone.__dict__, "env_config": {**alone.env_config, "vehicles_count": 0}})
    env = make_env(alone)
    reset_env(env, 3)
    ego = env.unwrapped.vehicle
    plan = torch.tensor([[0.8, 0.05], [-0.6, -0.1], [0.3, 0.08], [-1.0, 0.0]])
    origin = np.array([ego.position[0], ego.position[1], 0, 0, ego.heading, 0, 0])
    predicted = continuous_ego_path(env, 5, 0.2, "cpu")(plan[None])[0]
    simulated = []
    for action in plan.numpy():
        env.step(action)
        world = np.array([*ego.position, *ego.velocity, ego.heading, 0, 0])
        simulated.append(to_ego_frame(world, origin)[:4])
    np.testing.assert_allclose(predicted.numpy(), np.array(simulated), atol=1e-3)
    assert np.abs(np.array(simulated)[:, 1]).max() > 1.0  # the plan turned the ego noticeably
    # Without a steering column the ego drives straight along x.
    straight = rollout_ego_continuous(25.0, 5.0, torch.zeros(1, 3, 1), ((-5.0, 5.0), None), 5, 0.2)
    np.testing.assert_allclose(straight[0, :, :2].numpy(), [[25.0, 0.0], [50.0, 0.0], [75.0, 0.0]], atol=1e-4)
    env.close()


def test_offroad_costs_by_hand(env):
    """Lane 1 of 3 lanes of 4 m, the ego 0.5 m right of its lane centre: the road spans -6 .. +6 m of the lane
    centre. A path drifting right to 5.4 m stays on it; one reaching 5.6 m (6.1 m across) leaves it at step 2:
    10 x 0.9^2 = 8.1. Turned 0.1 rad to the right, 55 m ahead is 0.5 + 55 sin 0.1 = 5.99 m across (on), 56 m
    is 6.09 m (off, at the first step: 10). The road frame of a real ego: its lane's edges, its heading."""
    from drive_mbrl.mpc import road_frame
    from drive_mbrl.planning import offroad_costs

    settings = PlannerConfig(collision_cost=10.0, gamma=0.9)
    path = torch.tensor([[[10.0, 0.0], [20.0, 3.0], [30.0, 5.4]], [[10.0, 0.0], [20.0, 3.0], [30.0, 5.6]]])
    road = (0.5, 0.0, -6.0, 6.0)
    np.testing.assert_allclose(offroad_costs(path, road, settings).numpy(), [0.0, 8.1], rtol=1e-6)
    turned = torch.tensor([[[55.0, 0.0]], [[56.0, 0.0]]])
    np.testing.assert_allclose(offroad_costs(turned, (0.5, 0.1, -6.0, 6.0), settings).numpy(), [0.0, 10.0])
    lateral, heading, left, right = road_frame(env)
    lanes = len(env.unwrapped.road.network.all_side_lanes(env.unwrapped.vehicle.lane_index))
    index = env.unwrapped.vehicle.lane_index[2]
    assert (left, right) == (-(index + 0.5) * 4.0, (lanes - index - 0.5) * 4.0) and abs(lateral) < 2.0


def test_braking_control_by_hand(env):
    """Shed 5 m/s over the 1-s step but not below 20 m/s, and turn the wheel against the heading error: at 28 m/s
    aligned with the lane, full braking (-5 m/s^2 = -1); at 22 m/s, -2 m/s^2 (-0.4); at 20 m/s, none; 0.1 rad off
    the lane, -0.1 rad of steering (-0.1 / (pi / 4))."""
    ego = env.unwrapped.vehicle
    lane = env.unwrapped.road.network.get_lane(ego.lane_index)
    ego.heading = lane.heading_at(lane.local_coordinates(ego.position)[0])
    for speed, acceleration in ((28.0, -1.0), (22.0, -0.4), (20.0, 0.0), (15.0, 0.0)):
        ego.speed = speed
        np.testing.assert_allclose(braking_control(env), [acceleration, 0.0], atol=1e-5)
    ego.heading += 0.1
    np.testing.assert_allclose(braking_control(env)[1], -0.1 / (math.pi / 4), atol=1e-5)


def test_smoke_mpc_plans_continuous_actions_on_a_forecaster_trained_on_them(tmp_path: Path):
    """collect (idm, random) -> a forecaster whose action_dim comes from the datasets -> agent=mpc drives: the
    actions are (S, 2) vectors in [-1, 1] and the step log holds continuous plans. A smoke test: nothing about how
    well it drives."""
    from drive_mbrl.fit import TrainSettings, dataset_rates, fit, load_scenes, split_by_episode
    from drive_mbrl.forecaster import ForecasterConfig

    for agent in ("idm", "random"):
        collect(RunSpec(SCENARIO, agent, 2, 0, max_steps=10), tmp_path / agent)
    policy_dt, num_actions, action_dim = dataset_rates(str(tmp_path / "idm"))
    assert (num_actions, action_dim) == (0, 2)
    config = ForecasterConfig(agents=4, history_len=3, horizon=3, num_actions=num_actions, action_dim=action_dim,
                              members=2, modes=2, width=16, heads=2, blocks=1, decoder_width=16,
                              plan_fusion="late", policy_dt=policy_dt)
    scenes, sources = load_scenes([str(tmp_path / "idm"), str(tmp_path / "random")], config, history_dt=0.2)
    assert scenes.actions.shape[1:] == (3, 2) and scenes.actions.dtype == np.float32
    train, val = split_by_episode(scenes.episode, 0.25, 0)
    torch.manual_seed(0)
    fit(scenes.subset(train), scenes.subset(val), config, TrainSettings(epochs=1, batch_size=16, seed=0),
        tmp_path / "ck", {"data": sources, "history_dt": 0.2}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="ego_model=kinematic or learned"):
        make_agent("mpc", {"checkpoint": str(tmp_path / "ck"), "planner": {"ego_model": "route"}})
    agent = make_agent("mpc", {"checkpoint": str(tmp_path / "ck"),
                               "planner": {**SCENARIO.planner, "budget": 32, "threads": 1}})
    episode = EpisodeRunner().run(EpisodeJob(SCENARIO, "mpc", 0, 5, max_steps=3), agent)
    assert episode.action.shape == (episode.steps, 2) and np.abs(episode.action).max() <= 1.0
    assert episode.step_log["plan"].shape == (episode.steps, 3, 2) and episode.step_log["plan"].dtype == np.float32
