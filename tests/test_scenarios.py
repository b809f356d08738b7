"""Every scenario file through the real highway-env: builds, steps, and records tracks with stable ids."""

import math
from pathlib import Path

import numpy as np
import pytest

from drive_mbrl.errors import ConfigError
from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
from drive_mbrl.scenarios import available_scenarios, env_timing, load_scenario, make_env
from drive_mbrl.tracking import TrackRecorder, vehicle_state
from drive_mbrl.types import STATE_FIELDS

MAX_SPEED = 45.0  # [m/s] above highway-env's Vehicle.MAX_SPEED (40)


def test_the_required_scenarios_are_shipped():
    assert {"highway", "highway_dense", "merge", "roundabout", "intersection"} <= set(available_scenarios())


@pytest.mark.parametrize("name", available_scenarios())
def test_scenario_records_tracks_with_stable_ids(name):
    scenario = load_scenario(name)
    agent = "idm" if scenario.continuous_actions else "slower"  # slower drives meta-actions only
    episode = EpisodeRunner().run(EpisodeJob(scenario, agent, index=0, seed=7, max_steps=4))
    frames, tracks, features = episode.state.shape
    assert features == len(STATE_FIELDS) and tracks >= 2, "the ego and at least one other vehicle are tracked"
    assert episode.present[:, 0].all(), "the ego is present in every frame"
    assert np.isnan(episode.state[~episode.present]).all() and not np.isnan(episode.state[episode.present]).any()
    dt = np.diff(episode.frame_time)
    assert np.allclose(dt, dt[0]) and dt[0] > 0
    # A track id that jumped from one vehicle to another would move further than any vehicle can in one frame,
    # or change its size or class.
    both = episode.present[1:] & episode.present[:-1]
    step = np.linalg.norm(episode.state[1:, :, :2] - episode.state[:-1, :, :2], axis=-1)
    assert (step[both] <= MAX_SPEED * dt[0] + 1e-3).all()
    for m in range(tracks):
        sizes = episode.state[episode.present[:, m], m, 5:7]
        assert (sizes == sizes[0]).all()
    # Reported speeds agree with the displacement of the same track.
    moved = step[both] / dt[0]
    speed = np.hypot(episode.state[1:, :, 2], episode.state[1:, :, 3])[both]
    assert np.median(np.abs(moved - speed)) < 1.0


@pytest.mark.parametrize("name", ["highway", "intersection"])
def test_recorded_frame_equals_the_simulator_under_each_id(name):
    scenario = load_scenario(name)
    env = make_env(scenario)
    sim_hz, policy_hz = env_timing(env)
    recorder = TrackRecorder(scenario.perception_range, stride=1, sim_dt=1 / sim_hz)
    env.reset(seed=3)
    recorder.attach(env)
    ids = {}
    for _ in range(3):
        env.step(1)
        arrays = recorder.arrays()
        ego = env.unwrapped.vehicle
        for vehicle in env.unwrapped.road.vehicles:
            track = recorder.track_of(vehicle)
            if math.dist(vehicle.position, ego.position) > scenario.perception_range:
                continue
            assert ids.setdefault(id(vehicle), track) == track
            np.testing.assert_allclose(arrays["state"][-1, track], vehicle_state(vehicle), rtol=1e-6, atol=1e-4)
    assert recorder.track_of(env.unwrapped.vehicle) == 0
    assert recorder.frames == 1 + 3 * sim_hz // policy_hz
    env.close()


def test_unknown_scenario_key_is_rejected_by_name(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nenv_id: highway-fast-v0\nlanes: 3\n")
    with pytest.raises(ConfigError, match="'lanes'"):
        load_scenario(str(path))


def test_a_boolean_perception_range_is_not_a_distance(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nenv_id: highway-fast-v0\nperception_range: true\n")
    with pytest.raises(ConfigError, match="perception_range=True must be a number"):
        load_scenario(str(path))


def test_unknown_env_config_key_is_rejected_by_name(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nenv_id: highway-fast-v0\nenv_config: {lane_count: 2, vehicle_cont: 5}\n")
    scenario = load_scenario(str(path))
    with pytest.raises(ConfigError, match="'vehicle_cont'"):
        make_env(scenario)


@pytest.mark.parametrize(("space", "typo"), [
    ("action: {type: ContinuousAction, lateal: false}", "lateal"),
    ("observation: {type: Kinematics, vehicles_cont: 3}", "vehicles_cont"),
    ("action: {type: DiscreteAction, actions_per_axs: 3}", "actions_per_axs"),
])
def test_an_unknown_action_or_observation_option_is_rejected_by_name(tmp_path: Path, space: str, typo: str):
    """highway-env passes these mappings on as keyword arguments and drops unknown ones: a typo changed nothing."""
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nenv_id: highway-fast-v0\nenv_config: {{{space}}}\n")
    with pytest.raises(ConfigError, match=f"'{typo}' are not options of"):
        make_env(load_scenario(str(path)))
    path.write_text(f"name: mine\nenv_id: highway-fast-v0\nenv_config: {{{space.replace(typo, 'clip')}}}\n")
    make_env(load_scenario(str(path))).close()  # a real option of the same class is fine


def test_user_scenario_file_configures_the_env(tmp_path: Path):
    path = tmp_path / "two_lanes.yaml"
    path.write_text("name: two_lanes\nenv_id: highway-fast-v0\nenv_config: {lanes_count: 2}\n")
    env = make_env(load_scenario(str(path)))
    env.reset(seed=0)
    assert len(env.unwrapped.road.network.lanes_list()) == 2
    env.close()


def test_unknown_scenario_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="highway_dense"):
        load_scenario("higway")


def test_lane_offset_and_heading_on_a_straight_highway():
    # highway-fast-v0 lanes run along +x, 4 m wide, centred at y = 0, 4, 8: offset = y - 4 * lane_id, heading 0.
    episode = EpisodeRunner().run(EpisodeJob(load_scenario("highway"), "slower", 0, 2, max_steps=3))
    p = episode.present
    np.testing.assert_allclose(episode.lane_offset[p], episode.state[..., 1][p] - 4.0 * episode.lane_id[p],
                               atol=1e-4)
    assert np.abs(episode.lane_heading[p]).max() < 1e-6


def test_an_episode_does_not_depend_on_the_scenarios_run_before_it():
    # intersection-v0 changes IDMVehicle's class constants when it resets; reset_env undoes that for the next one.
    from drive_mbrl.data import episode_digest

    runner, highway = EpisodeRunner(), load_scenario("highway")
    fresh = episode_digest(runner.run(EpisodeJob(highway, "random", 0, 5, max_steps=3)))
    runner.run(EpisodeJob(load_scenario("intersection"), "slower", 0, 1, max_steps=2))
    after = episode_digest(runner.run(EpisodeJob(highway, "random", 0, 5, max_steps=3)))
    assert after == fresh
