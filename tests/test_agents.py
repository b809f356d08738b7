"""Built-in agents on the real env."""

import pytest

from drive_mbrl.agents import infer_meta_action, make_agent
from drive_mbrl.errors import ConfigError
from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
from drive_mbrl.scenarios import load_scenario, make_env


@pytest.fixture(scope="module")
def env():
    env = make_env(load_scenario("highway"))
    env.reset(seed=0)
    yield env
    env.close()


def test_slower_always_brakes():
    episode = EpisodeRunner().run(EpisodeJob(load_scenario("highway"), "slower", 0, 1, max_steps=5))
    assert (episode.action == 4).all()  # highway's SLOWER


def test_random_agent_is_reproducible_from_its_seed():
    runner, scenario = EpisodeRunner(), load_scenario("highway")
    a = runner.run(EpisodeJob(scenario, "random", 0, 11, max_steps=4)).action
    b = runner.run(EpisodeJob(scenario, "random", 0, 11, max_steps=4)).action
    assert (a == b).all()


def test_idm_agent_replaces_the_ego_controller(env):
    from highway_env.vehicle.behavior import IDMVehicle

    env.reset(seed=5)
    before = env.unwrapped.vehicle
    make_agent("idm").reset(env, 5)
    ego = env.unwrapped.vehicle
    assert isinstance(ego, IDMVehicle) and ego is not before
    assert ego in env.unwrapped.road.vehicles and before not in env.unwrapped.road.vehicles
    assert ego.position.tolist() == before.position.tolist() and ego.speed == before.speed


@pytest.mark.parametrize(("lanes", "speeds", "expected"), [
    ((("0", "1", 1), ("0", "1", 0)), (25.0, 25.0), "LANE_LEFT"),
    ((("0", "1", 1), ("0", "1", 2)), (25.0, 25.0), "LANE_RIGHT"),
    ((("0", "1", 1), ("0", "1", 1)), (25.0, 27.0), "FASTER"),
    ((("0", "1", 1), ("0", "1", 1)), (25.0, 23.0), "SLOWER"),
    ((("0", "1", 1), ("0", "1", 1)), (25.0, 25.5), "IDLE"),
    ((("0", "1", 1), ("1", "2", 0)), (25.0, 25.0), "IDLE"),  # next road edge, not a lane change
])
def test_inferred_meta_action(env, lanes, speeds, expected):
    index = infer_meta_action(env, lanes[0], lanes[1], *speeds)
    assert env.unwrapped.action_type.actions[index] == expected


def test_unknown_agent_lists_the_known_ones():
    with pytest.raises(ConfigError, match="random, slower, idm, explore, mpc, oracle"):
        make_agent("planner")
    with pytest.raises(ConfigError, match="agent=mpc needs checkpoint="):
        make_agent("mpc")


def test_explore_holds_actions_and_only_uses_the_scenarios_actions():
    scenario = load_scenario("intersection")  # SLOWER, IDLE, FASTER only
    episode = EpisodeRunner().run(EpisodeJob(scenario, "explore", 0, 4, max_steps=12))
    assert set(episode.action.tolist()) <= {0, 1, 2} and len(set(episode.action.tolist())) > 1


def test_the_oracles_simulator_copies_do_not_know_the_episodes_future_draws():
    """A deep copy of highway-env replays the real episode's random spawns exactly (intersection, seed 5: 4 vehicles
    become more within 6 steps); the oracle's copies draw their own."""
    import numpy as np

    from drive_mbrl.oracle import copy_env
    from drive_mbrl.scenarios import load_scenario, make_env, reset_env

    env = make_env(load_scenario("intersection"))
    try:
        reset_env(env, 5)
        start = len(env.unwrapped.road.vehicles)
        plain, fresh = copy_env(env), copy_env(env, np.random.default_rng(0))
        for _ in range(6):
            for sim in (env, plain, fresh):
                sim.step(1)

        def positions(sim):
            return sorted(tuple(np.round(v.position, 3)) for v in sim.unwrapped.road.vehicles)

        assert len(env.unwrapped.road.vehicles) > start  # vehicles were spawned
        assert positions(plain) == positions(env) != positions(fresh)
    finally:
        env.close()
