"""The reactive policy: its observation (live == recorded), soft targets, behaviour cloning, DAgger labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.distill import (
    EXPERT_ACTION,
    EXPERT_COSTS,
    EXPERT_COSTS_SINGLE,
    BCSettings,
    DaggerAgent,
    PolicyData,
    mean_relative_costs,
    policy_data,
    relative_costs,
    soft_targets,
    train_policy,
)
from drive_mbrl.errors import DataError
from drive_mbrl.features import HIST_FEATURES, POLICY_FEATURES, policy_observation, route_ahead, route_polyline
from drive_mbrl.policy import PolicyAgent, PolicyConfig, PolicyNet, episode_observations, load_policy, save_policy
from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
from drive_mbrl.scenarios import load_scenario

NAMES = ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"]


@pytest.fixture
def random_policy(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = PolicyNet(PolicyConfig(agents=4, hidden=16))
    save_policy(tmp_path / "policy", net, NAMES, {})
    return tmp_path / "policy"


def test_policy_observation_by_hand():
    F = len(HIST_FEATURES)
    history = np.zeros((2, 2, F), np.float32)  # 2 slots, 2 frames
    history[0, 0, :4], history[0, 1, :4] = [0, 0, 20, 0], [0, 0, 22, 1]
    history[0, :, -1] = 1  # the ego is present in both frames
    history[1, 1, :4], history[1, 1, -1] = [10, 4, 25, 0], 1  # slot 1 appears only in the last frame
    obs = policy_observation(history, ego_lane=2)
    P = len(POLICY_FEATURES)
    assert obs.shape == (2 * P + 1,)
    assert obs[:4].tolist() == [0, 0, 22, 1] and obs[F:F + 2].tolist() == [2, 1]  # dv of the ego
    assert obs[P:P + 4].tolist() == [10, 4, 25, 0] and obs[P + F:P + F + 2].tolist() == [0, 0]  # absent before
    assert obs[-1] == 2
    with_set_point = policy_observation(history, ego_lane=2, target_speed=25.0)
    assert with_set_point.shape == (2 * P + 2,) and with_set_point[-2:].tolist() == [2, 25]
    np.testing.assert_array_equal(with_set_point[:-1], obs)


class RandomSetPointAgent:
    """Random meta-actions, mostly FASTER / SLOWER; records the simulator's target speed before each action."""

    drives_itself = False

    def __init__(self, names: list[str]):
        self.names, self.seen = names, []

    def reset(self, env, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, obs, env) -> int:
        self.seen.append(float(env.unwrapped.vehicle.target_speed))
        speed = [i for i, n in enumerate(self.names) if n in ("FASTER", "SLOWER")]
        return int(self.rng.choice(speed) if self.rng.random() < 0.7 else self.rng.integers(len(self.names)))


@pytest.mark.parametrize("scenario", ["highway", "intersection"])
def test_replayed_target_speed_equals_the_simulators(scenario: str):
    """`episode_target_speeds` replays MDPVehicle's set-point rule from recorded speeds and actions: it must give
    the simulator's own target speed at every decision (highway: 20/25/30 m/s; intersection: 0/4.5/9 m/s and no
    lane changes)."""
    from drive_mbrl.data import build_manifest
    from drive_mbrl.features import episode_target_speeds

    spec = load_scenario(scenario)
    manifest = build_manifest(spec, "random", 3, 0, 12)
    runner = EpisodeRunner()
    try:
        checked = 0
        for seed in (3, 4):
            agent = RandomSetPointAgent(manifest["action_names"])
            episode = runner.run(EpisodeJob(spec, "custom", 0, seed, max_steps=12), agent)
            replayed = episode_target_speeds(episode, manifest)
            np.testing.assert_allclose(replayed, agent.seen, atol=1e-6)
            checked += len(set(agent.seen))
    finally:
        runner.close()
    assert checked >= 4  # the set-point did move


def test_live_observation_equals_the_one_recomputed_from_the_recorded_episode(random_policy: Path):
    agent = PolicyAgent(str(random_policy))
    seen: list[np.ndarray] = []
    observe = agent.observation
    agent.observation = lambda: seen.append(observe()) or seen[-1]  # type: ignore[method-assign]
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "policy", 0, 7, max_steps=6), agent)
    finally:
        runner.close()
    from drive_mbrl.data import build_manifest

    recorded = episode_observations(agent.net.config, episode, build_manifest(load_scenario("highway"), "policy", 7,
                                                                              0, 6))
    assert recorded.shape == (episode.steps, agent.net.config.obs_dim)
    np.testing.assert_allclose(np.stack(seen), recorded, atol=1e-5)
    assert set(recorded[:, -1]) <= {20.0, 25.0, 30.0}  # the target speed, last
    assert set(recorded[:, -2]) <= {0, 1, 2}  # lane number before it
    assert (recorded[1:, 2] > 10).all()  # the ego's own speed [m/s] at slot 0


def test_route_ahead_by_hand():
    line = np.array([[0.0, 0.0], [10.0, 0.0]])
    # the ego 1 m left of the line (y < 0 is left in the ego frame, x forward), heading along it
    got = route_ahead(line, np.array([2.0, -1.0, 0.0]), (3.0, 20.0))
    np.testing.assert_allclose(got, [3.0, 1.0, 20.0, 1.0], atol=1e-6)  # 20 m: past the end, the line continues
    # an L: 10 m along x, then 10 m along y; the ego at (6, 0) facing +y (heading pi/2)
    ell = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])
    got = route_ahead(ell, np.array([6.0, 0.0, np.pi / 2]), (0.0, 4.0, 7.0))
    # world points (6, 0), (10, 0), (10, 3); highway-env's y points right of +x, so facing +y world +x is left
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, -4.0, 3.0, -4.0], atol=1e-6)


def test_route_polyline_runs_from_the_egos_lane_to_the_end_of_its_route():
    from drive_mbrl.scenarios import make_env, reset_env

    env = make_env(load_scenario("intersection"))
    try:
        reset_env(env, 3)
        ego, network = env.unwrapped.vehicle, env.unwrapped.road.network
        line = route_polyline(env)
        last = network.get_lane(ego.route[-1][:2] + (0,))
        np.testing.assert_allclose(line[0], network.get_lane(ego.lane_index).position(0, 0))
        np.testing.assert_allclose(line[-1], last.position(last.length, 0))
        step = np.hypot(*np.diff(line, axis=0).T)
        assert step.max() <= 1.0 + 1e-6 and step.min() > 0
        lengths = sum(network.get_lane(i[:2] + (0,)).length for i in ego.route)
        assert abs(step.sum() - lengths) < 0.05  # 1 m chords of the turn's arc
    finally:
        env.close()


def test_route_policy_live_observation_equals_the_recorded_one(tmp_path: Path):
    from drive_mbrl.data import build_manifest

    torch.manual_seed(0)
    config = PolicyConfig(agents=4, num_actions=3, hidden=16, route_ahead=(5.0, 20.0))
    save_policy(tmp_path / "policy", PolicyNet(config), ["SLOWER", "IDLE", "FASTER"], {})
    agent = PolicyAgent(str(tmp_path / "policy"))
    assert agent.net.config.route_ahead == (5.0, 20.0)  # a tuple again after the JSON round trip
    seen: list[np.ndarray] = []
    observe = agent.observation
    agent.observation = lambda: seen.append(observe()) or seen[-1]  # type: ignore[method-assign]
    runner = EpisodeRunner()
    scenario = load_scenario("intersection")
    try:
        episode = runner.run(EpisodeJob(scenario, "policy", 0, 11, max_steps=6), agent)
    finally:
        runner.close()
    recorded = episode_observations(config, episode, build_manifest(scenario, "policy", 11, 0, 6))
    assert recorded.shape == (episode.steps, config.obs_dim) == (episode.steps, 4 * len(POLICY_FEATURES) + 2 + 4)
    np.testing.assert_allclose(np.stack(seen), recorded, atol=1e-5)
    np.testing.assert_allclose(recorded[0, -4:-2], [5.0, 0.0], atol=0.3)  # on the straight approach: dead ahead


def test_soft_targets_by_hand():
    costs = np.array([[1.0, 2.0, np.inf], [np.inf, np.inf, np.inf]])
    label = np.array([0, 2])
    out = soft_targets(costs, label, temperature=1.0)
    e = np.exp(-1.0)
    np.testing.assert_allclose(out[0], [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-6)
    assert out[1].tolist() == [0, 0, 1]  # nothing feasible: one-hot of the executed label
    assert soft_targets(costs, label, 0.0)[0].tolist() == [1, 0, 0]


def test_mean_relative_costs_by_hand():
    """Each call's costs are made relative to its best (inf -> COST_CAP = 10) before the mean; a call with no
    finite cost does not count; with none at all the label stays 'no costs'."""
    calls = np.array([[1.0, 3.0, np.inf], [5.0, 4.0, 6.0], [np.inf, np.inf, np.inf]])
    np.testing.assert_allclose(mean_relative_costs(calls), [(0 + 1) / 2, (2 + 0) / 2, (10 + 2) / 2])
    assert np.isinf(mean_relative_costs(calls[2:])).all()


def test_merged_parts_keep_their_episodes_apart():
    """`policy_data` numbers each call's episodes from 0, so the base labels and a DAgger round both have an
    episode 0: merged, they stay two episodes (the validation split is by episode)."""
    from drive_mbrl.distill import merge_data

    def part(n: int) -> PolicyData:
        return PolicyData(np.zeros((n, 3), np.float32), np.zeros(n, np.int64), np.zeros((n, 2), np.float32),
                          np.arange(n, dtype=np.int64) // 2, np.zeros((n, 2), np.float32), n)

    merged = merge_data([part(4), part(6)])
    assert len(np.unique(merged.episode)) == 2 + 3 and len(merged) == 10 and merged.steps == 10


def test_bc_loss_and_greedy_regret_by_hand():
    """Two actions, uniform logits, target one-hot on action 0, action 1 costs 10: CE = log 2 and E_pi[c] = 5;
    a row without logged costs adds cross-entropy only, and nothing to the expected cost (averaged over all rows)."""
    from drive_mbrl.distill import bc_loss, greedy_regret

    logits = torch.zeros(2, 2)
    label = torch.tensor([0, 0])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    cost = torch.tensor([[0.0, 10.0], [float("nan"), float("nan")]])
    assert float(bc_loss(logits, label, target, cost)) == pytest.approx(np.log(2))
    assert float(bc_loss(logits, label, target, cost, cost_weight=0.5)) == pytest.approx(np.log(2) + 0.5 * 5 / 2)
    # Greedy = action 1 in the first row (cost 10, unsafe), action 0 in a second logged row (cost 0).
    regret, unsafe = greedy_regret(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 10.0], [0.0, 4.0]]))
    assert (regret, unsafe) == (5.0, 0.5)
    assert np.isnan(greedy_regret(logits, cost[1:])[0])


def test_cost_weight_moves_probability_off_a_rare_dangerous_action():
    """Half the states: the planner is indifferent between IDLE and LANE_LEFT (soft targets 50/50) except that in a
    rare feature region LANE_LEFT costs 10. Cross-entropy alone leaves much mass on LANE_LEFT there; the expected-
    cost term takes it off (same seed, same data)."""
    rng = np.random.default_rng(2)
    config = PolicyConfig(agents=2, hidden=32)
    n = 2000
    obs = rng.normal(size=(n, config.obs_dim)).astype(np.float32)
    danger = obs[:, 0] > 1.8  # ~4 % of states
    costs = np.zeros((n, 5), np.float32)
    costs[:, 2:] = 10.0
    costs[danger, 0] = 10.0
    target = np.zeros((n, 5), np.float32)
    target[:, :2] = 0.5  # the planner's soft targets say "either", even where LANE_LEFT is dangerous
    label = np.ones(n, np.int64)
    data = PolicyData(obs, label, target, np.arange(n) // 10, costs, steps=n)
    mass = {}
    for w in (0.0, 3.0):
        net, _ = train_policy(data, config, BCSettings(epochs=40, seed=0, cost_weight=w))
        with torch.no_grad():
            mass[w] = float(net(torch.as_tensor(obs[danger])).softmax(-1)[:, 0].mean())
    assert mass[0.0] > 0.4  # ~ the targets' 0.5 (measured 0.50)
    assert mass[3.0] < 0.5 * mass[0.0]  # (measured 0.15)


def test_behaviour_cloning_learns_a_known_rule():
    """Label = SLOWER when the slot-1 vehicle is within 15 m ahead, else FASTER: learnable from the features."""
    rng = np.random.default_rng(0)
    config = PolicyConfig(agents=2, hidden=32)
    n = 1200
    obs = rng.normal(size=(n, config.obs_dim)).astype(np.float32)
    gap = rng.uniform(0, 40, n).astype(np.float32)
    obs[:, len(POLICY_FEATURES)] = gap  # slot 1's x
    label = np.where(gap < 15, 4, 3).astype(np.int64)
    costs = np.full((n, 5), np.nan, np.float32)
    data = PolicyData(obs, label, np.eye(5, dtype=np.float32)[label], np.arange(n) // 10, costs, steps=n)
    net, summary = train_policy(data, config, BCSettings(epochs=60, seed=0))
    assert summary["val_accuracy"] >= 0.95
    assert summary["val_unsafe_rate"] is None  # no planner costs logged: nothing to judge the actions by
    with torch.no_grad():
        test = np.zeros((2, config.obs_dim), np.float32)
        test[:, len(POLICY_FEATURES)] = [5.0, 35.0]
        assert net(torch.as_tensor(test)).argmax(-1).tolist() == [4, 3]


def test_cost_regression_learns_the_cheapest_action():
    """loss=cost: the logits learn the negated relative costs; the greedy action is the cheapest one. Costs: SLOWER
    is free and FASTER costs 10 (rejected) when the car ahead is within 15 m, the other way round beyond."""
    from drive_mbrl.distill import relative_costs

    rng = np.random.default_rng(1)
    config = PolicyConfig(agents=2, hidden=32)
    n = 1200
    obs = rng.normal(size=(n, config.obs_dim)).astype(np.float32)
    gap = rng.uniform(0, 40, n).astype(np.float32)
    obs[:, len(POLICY_FEATURES)] = gap
    raw = np.full((n, 5), 1.0)
    raw[:, 4] = np.where(gap < 15, -2.0, 0.5)
    raw[:, 3] = np.where(gap < 15, np.inf, -2.0)
    rel = relative_costs(raw)
    assert rel[0].min() == 0 and rel.max() == 10.0  # inf -> the cap
    label = rel.argmin(1)
    data = PolicyData(obs, label, np.eye(5, dtype=np.float32)[label], np.arange(n) // 10, rel, steps=n)
    net, summary = train_policy(data, config, BCSettings(epochs=150, seed=0, loss="cost", lr=3e-3))
    assert summary["val_accuracy"] >= 0.95
    assert summary["val_unsafe_rate"] <= 0.05  # FASTER next to a car (cost 10) is rarely the greedy action
    test = np.zeros((2, config.obs_dim), np.float32)
    test[:, len(POLICY_FEATURES)] = [5.0, 35.0]
    with torch.no_grad():
        logits = net(torch.as_tensor(test))
    assert logits.argmax(-1).tolist() == [4, 3]
    assert float(-logits[0, 3] + logits[0, 4]) > 5.0  # FASTER near a car is learned as far costlier


def test_load_policy_refuses_bad_folders(tmp_path: Path, tiny_checkpoint: Path):
    with pytest.raises(DataError, match="not a policy checkpoint"):
        load_policy(tmp_path / "missing")
    (tmp_path / "fake").mkdir()
    for name in ("meta.json", "best.pt"):
        (tmp_path / "fake" / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(DataError, match="not a policy"):
        load_policy(tmp_path / "fake")


def test_dagger_agent_logs_the_planners_labels_and_the_policy_drives(random_policy: Path, tiny_checkpoint: Path,
                                                                     tmp_path: Path):
    from drive_mbrl.data import RunSpec, collect

    # The tiny forecaster sees 4 agents, 3 frames; the policy 4 agents, 2 frames: both run from one recording.
    options = {"policy": str(random_policy), "checkpoint": str(tiny_checkpoint), "beta": 0.0,
               "planner": {"budget": 64, "threads": 1}}
    import json

    collect(RunSpec(load_scenario("highway"), "dagger", 1, 5, max_steps=4, agent_options=json.dumps(options)),
            tmp_path / "d")
    data, names = policy_data([str(tmp_path / "d")], load_policy(random_policy)[0].config, temperature=0.5)
    assert names == NAMES and len(data) == 4
    from drive_mbrl.data import load_dataset

    manifest, (episode,) = load_dataset(tmp_path / "d")
    log = episode.step_log
    assert log[EXPERT_ACTION].shape == (4,) and log[EXPERT_COSTS].shape == (4, 5)
    assert (data.label == log[EXPERT_ACTION]).all()
    assert np.allclose(data.target.sum(1), 1.0)
    # beta=0: every executed action is the policy's own greedy choice on the recorded observation.
    net, _ = load_policy(random_policy)
    obs = episode_observations(net.config, episode, manifest)
    with torch.no_grad():
        assert net(torch.as_tensor(obs)).argmax(-1).tolist() == episode.action.tolist()
    # Where the planner's costs are finite, the soft target ranks actions as the costs do.
    finite = np.isfinite(log[EXPERT_COSTS]).any(1) & (episode.fallback == "")
    for costs, target in zip(log[EXPERT_COSTS][finite], data.target[finite], strict=True):
        assert np.argmax(target) == np.argmin(costs)
    # A NaN cost (inf means "rejected"; NaN, that something went wrong) is an error that names the step.
    from dataclasses import replace

    from drive_mbrl.data import save_episode

    log[EXPERT_COSTS][2, 1] = np.nan
    save_episode(tmp_path / "d", replace(episode, step_log=log))
    with pytest.raises(DataError, match="episode 0, step 2: the planner's action costs hold NaN"):
        policy_data([str(tmp_path / "d")], net.config)


def test_dagger_beta_must_be_a_share(random_policy: Path, tiny_checkpoint: Path):
    from drive_mbrl.errors import ConfigError

    with pytest.raises(ConfigError, match="beta"):
        DaggerAgent(str(random_policy), str(tiny_checkpoint), beta=1.5)


def test_dagger_noise_executes_random_actions_and_keeps_the_planners_labels(tiny_checkpoint: Path):
    """noise=0: the planner's action is executed at every step; noise=1: a uniformly random one is, while the
    logged label stays the planner's."""
    from drive_mbrl.errors import ConfigError

    with pytest.raises(ConfigError, match="noise"):
        DaggerAgent("", str(tiny_checkpoint), noise=-0.1)
    runner = EpisodeRunner()
    try:
        executed = {}
        for noise in (0.0, 1.0):
            agent = DaggerAgent("", str(tiny_checkpoint), planner={"budget": 16, "threads": 1}, noise=noise, seed=1)
            episode = runner.run(EpisodeJob(load_scenario("highway"), "dagger", 0, 5, max_steps=8), agent)
            executed[noise] = episode.action == episode.step_log[EXPERT_ACTION]
    finally:
        runner.close()
    assert executed[0.0].all() and not executed[1.0].all()


def test_dagger_replans_average_the_labels_and_leave_the_driving_alone(tiny_checkpoint: Path):
    """replans=3 re-plans each state twice more on a stream of its own: the executed and the expert's actions are
    those of replans=1 step for step, the costs are relative (best 0, within [0, COST_CAP]) and differ from the
    single call's somewhere."""
    from drive_mbrl.distill import COST_CAP
    from drive_mbrl.errors import ConfigError

    with pytest.raises(ConfigError, match="replans"):
        DaggerAgent("", str(tiny_checkpoint), replans=0)
    runner = EpisodeRunner()
    try:
        episodes = {}
        for replans in (1, 3):
            agent = DaggerAgent("", str(tiny_checkpoint), planner={"budget": 16, "threads": 1}, noise=0.3, seed=1,
                                replans=replans)
            episodes[replans] = runner.run(EpisodeJob(load_scenario("highway"), "dagger", 0, 5, max_steps=8), agent)
    finally:
        runner.close()
    one, three = episodes[1], episodes[3]
    assert one.action.tolist() == three.action.tolist()
    assert one.step_log[EXPERT_ACTION].tolist() == three.step_log[EXPERT_ACTION].tolist()
    averaged = three.step_log[EXPERT_COSTS][three.fallback == ""]
    assert len(averaged) and (averaged.min(1) >= 0).all() and (averaged <= COST_CAP).all()
    single = one.step_log[EXPERT_COSTS][three.fallback == ""]
    assert not np.allclose(averaged, relative_costs(single))
    np.testing.assert_array_equal(three.step_log[EXPERT_COSTS_SINGLE][three.fallback == ""], single)


def test_distill_command_runs_bc_then_dagger_and_resumes_smoke(tiny_checkpoint: Path, tmp_path: Path):
    """Smoke test of `drive-mbrl distill` on a tiny budget (real planner, real env), then resume: the rerun
    reuses every round (same policies, same figures)."""
    import json

    from conftest import run_cli

    from drive_mbrl.data import RunSpec, collect

    options = json.dumps({"checkpoint": str(tiny_checkpoint), "planner": {"budget": 32, "threads": 1}})
    collect(RunSpec(load_scenario("highway"), "dagger", 2, 0, max_steps=6, agent_options=options), tmp_path / "x")
    args = ["distill", f"dataset=[{tmp_path / 'x'}]", f"checkpoint={tiny_checkpoint}", "rounds=1",
            "episodes_per_round=1", "eval_episodes=1", "eval_seed=2000000", "epochs=3", "hidden=16",
            "planner.budget=32", "planner.threads=1", "hydra.run.dir=run"]
    first = run_cli(*args, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["real_steps"] > rounds[0]["real_steps"] == 12  # DAgger added the policy's own episode
    assert rounds[1]["decisions"] > rounds[0]["decisions"]
    assert [r["evaluate"]["seed"] for r in rounds] == [2_000_000, 2_000_000]  # tuning seeds, not the held-out ones
    net, meta = load_policy(tmp_path / "run" / "policy")
    assert net.config.hidden == 16 and meta["summary"]["decisions"] == rounds[1]["decisions"]
    again = run_cli(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"] == rounds


def test_planner_with_policy_proposals_feeds_the_policy_the_live_set_point(tiny_checkpoint: Path, tiny_policy: Path):
    """planner.policy: the planner's policy is reset with the env, so its observation ends in the ego's live
    target speed at every decision (a real episode with proposals and the policy fallback)."""
    from drive_mbrl.mpc import MPCAgent

    agent = MPCAgent(str(tiny_checkpoint), {"budget": 16, "threads": 1, "policy": str(tiny_policy),
                                            "fallback": "policy"})
    seen: list[tuple[float, float]] = []
    observe, act = agent.policy.observation, agent.act

    def watched_act(obs, env):
        seen.append((float(observe()[-1]), float(env.unwrapped.vehicle.target_speed)))
        return act(obs, env)

    agent.act = watched_act  # type: ignore[method-assign]
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "mpc", 0, 3, max_steps=4), agent)
    finally:
        runner.close()
    assert episode.steps == len(seen) == 4
    assert all(got == want for got, want in seen)


def test_a_policy_saved_before_set_points_still_loads_and_drives(tmp_path: Path):
    """meta.json without `set_points` (policies saved before the target speed joined the observation): the
    network is built without it and the agent feeds it the older, shorter observation."""
    import json

    net = PolicyNet(PolicyConfig(agents=4, hidden=16, set_points=False))
    save_policy(tmp_path / "old", net, NAMES, {})
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    del meta["policy"]["set_points"]
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    agent = PolicyAgent(str(tmp_path / "old"))
    assert not agent.net.config.set_points and agent.net.config.obs_dim == 4 * len(POLICY_FEATURES) + 1
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "policy", 0, 2, max_steps=2), agent)
    finally:
        runner.close()
    assert episode.steps == 2 and agent.observation().shape == (4 * len(POLICY_FEATURES) + 1,)
