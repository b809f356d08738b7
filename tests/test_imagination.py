"""The learned-model env (Dyna): interpolation, start-state parity with recorded observations, autoreset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.features import HIST_FEATURES, PRESENT, SceneSpec, episode_policy_obs, history_stride
from drive_mbrl.imagination import ImaginationConfig, ImaginationEnv, PolicyEnv, hermite, rotate, start_states


def test_hermite_is_exact_for_constant_acceleration():
    p0, v0, a, T = torch.tensor([1.0, -2.0]), torch.tensor([20.0, 1.0]), torch.tensor([-3.0, 0.5]), 1.0
    p1, v1 = p0 + v0 * T + 0.5 * a * T**2, v0 + a * T
    s = torch.tensor([0.2, 0.5, 1.0])
    pos, vel = hermite(p0, v0, p1, v1, s, T)
    t = s[:, None] * T
    torch.testing.assert_close(pos, p0 + v0 * t + 0.5 * a * t**2)
    torch.testing.assert_close(vel, v0 + a * t)


def test_rotate_by_a_quarter_turn():
    torch.testing.assert_close(rotate(torch.tensor([[1.0, 0.0]]), torch.tensor([np.pi / 2])),
                               torch.tensor([[0.0, 1.0]]), atol=1e-7, rtol=0)


@pytest.fixture(scope="module")
def recorded(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint.parent / "data"


def test_imagined_start_observation_equals_the_recorded_one(tiny_checkpoint: Path, recorded: Path):
    """At reset the imagination env's observation (its own frame transforms, headings from velocities) equals
    the observation cut from the recorded episode at the same decision."""
    from drive_mbrl.data import load_dataset

    config = ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4)
    env = ImaginationEnv(config, num_envs=1)
    manifest, episodes = load_dataset(recorded)
    episode = episodes[0]
    spec = SceneSpec(agents=4, history_len=2, history_stride=history_stride(1.0, manifest["dt"]), horizon=1)
    expected = episode_policy_obs(episode, spec, manifest)
    hist, lanes, target = start_states([str(recorded)], env.A, env.W, env.frame_dt)
    for s in (1, 3):  # decisions of the first episode (start states are in episode order)
        env.starts_hist, env.starts_lane = torch.as_tensor(hist[s:s + 1]), torch.as_tensor(lanes[s:s + 1])
        env.starts_target = target[s:s + 1]
        obs, _ = env.reset(seed=0)
        np.testing.assert_allclose(obs[0], expected[s], atol=2e-4)


def test_imagined_start_history_equals_the_recorded_padded_one(tiny_checkpoint: Path, recorded: Path):
    """The forecaster's input at reset equals the scene cut from the recorded episode, absent frames padded
    (`features.pad_history`, the tiny model's setting) the same way: at decision 0 only one frame exists."""
    from drive_mbrl.data import load_dataset
    from drive_mbrl.features import scene_history
    from drive_mbrl.fit import scene_spec

    env = ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4), num_envs=1)
    mc = env.model.config
    assert mc.pad_history
    manifest, episodes = load_dataset(recorded)
    episode = episodes[0]
    spec = scene_spec(mc, history_stride(env.frame_dt, manifest["dt"]), env.frame_dt)
    for s in (0, 1):
        env.starts_hist, env.starts_lane = env.starts_hist[s:s + 1], env.starts_lane[s:s + 1]
        env.starts_target = env.starts_target[s:s + 1]
        env.reset(seed=0)
        got = env._features(list(range(env.W - mc.history_len, env.W)), pad=True)[0].numpy()
        frame = int(episode.decision_frame[s])
        expected = scene_history(episode.state, episode.present, episode.lane_offset, episode.lane_heading, frame,
                                 spec)[0]
        if s == 0:
            assert (expected[0, :-1, -1] == 0).all() and expected[0, :-1, 2].any(), "decision 0 is padded"
        np.testing.assert_allclose(got, expected, atol=2e-4)
        env = ImaginationEnv(env.config, num_envs=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rollouts_end_at_the_horizon_and_restart_on_the_next_step(tiny_checkpoint: Path, recorded: Path,
                                                                  precision: str):
    """Gymnasium's next-step autoreset: an env that ended (crash, horizon, uncertainty) returns a fresh start on
    the following call with reward 0 and no end flag; no rollout outlives the horizon. Also with the forecaster's
    network in bfloat16, whose state and observations stay fp32."""
    config = ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4, horizon=2, uncertainty_level=0.999,
                               precision=precision)
    env = ImaginationEnv(config, num_envs=16)
    assert env.pos.dtype == torch.float32 and env.model.trajectory_head.weight.dtype == {
        "fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    obs, _ = env.reset(seed=1)
    assert obs.shape == (16, env.single_observation_space.shape[0]) and np.isfinite(obs).all()
    ended_before = np.zeros(16, bool)
    restarted = 0
    for _ in range(7):
        obs, reward, term, trunc, _ = env.step(np.full(16, 1))
        assert obs.dtype == np.float32 and np.isfinite(obs).all() and ((reward >= 0) & (reward <= 1)).all()
        assert (reward[ended_before] == 0).all() and not (term | trunc)[ended_before].any()
        assert (env.t[torch.as_tensor(ended_before)] == 0).all()
        assert (env.t <= 2).all()
        restarted += int(ended_before.sum())
        ended_before = term | trunc
    assert restarted >= 16  # every env ended at least once within 7 steps of horizon 2


def test_imagined_observations_show_the_nearest_agents_nearest_first_at_every_step(tiny_checkpoint: Path,
                                                                                    recorded: Path):
    """As on the road (`scene_history`), the policy's slots are the ego, then the present agents by distance at
    the newest frame, then empty slots, however the rollout has moved the start scene's agents around."""
    config = ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=3, horizon=50, seed=0)
    env = ImaginationEnv(config, num_envs=32)
    obs, _ = env.reset(seed=2)
    width = len(HIST_FEATURES) + 2  # a slot's features: the newest frame's, then the velocity change
    reordered = 0
    for _ in range(6):
        obs, *_ = env.step(np.arange(32) % env.single_action_space.n)
        slots = obs[:, : 3 * width].reshape(32, 3, width)
        shown = np.where(slots[:, 1:, PRESENT] > 0.5, np.hypot(slots[:, 1:, 0], slots[:, 1:, 1]), np.inf)
        now = env._features([env.W - 1])[:, 1:, 0].numpy()  # every agent, the forecaster's slot order
        every = np.where(env.present[:, 1:, -1].numpy(), np.hypot(now[..., 0], now[..., 1]), np.inf)
        np.testing.assert_allclose(shown, np.sort(every, axis=1)[:, :2], atol=1e-4)
        reordered += int((np.diff(every, axis=1) < 0).any(1).sum())
    assert reordered > 0  # the start order did drift, so the test did test something


def test_one_imagined_env_passes_gymnasiums_env_checker(tiny_checkpoint: Path, recorded: Path):
    from gymnasium.utils.env_checker import check_env

    from drive_mbrl.imagination import SingleImaginationEnv

    env = SingleImaginationEnv(ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4))
    check_env(env, skip_render_check=True)


def test_crash_is_a_box_overlap_with_the_ego(tiny_checkpoint: Path, recorded: Path):
    env = ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4), num_envs=2)
    env.reset(seed=0)
    env.size[:] = torch.tensor([5.0, 2.0])
    pos = torch.zeros(2, env.A, 1, 2)
    pos[:, 1:, 0, 0] = 100.0  # everyone far ahead ...
    pos[0, 1, 0] = torch.tensor([4.9, 1.9])  # ... but in env 0 one car overlaps the ego (reach 5 x 2 m)
    pos[1, 1, 0] = torch.tensor([5.1, 0.0])  # and in env 1 one is just clear of it
    vel = torch.zeros(2, env.A, 1, 2)
    vel[..., 0] = 20.0
    present = torch.ones(2, env.A, 1, dtype=torch.bool)
    assert env._overlap(pos, vel, present).tolist() == [True, False]
    present[0, 1] = False  # absent agents never collide
    assert env._overlap(pos, vel, present).tolist() == [False, False]


def test_kinematic_ego_follows_the_recorded_ego_under_its_recorded_actions(tiny_checkpoint: Path, recorded: Path):
    """`ego_model=kinematic`: started at an episode's first decision and stepped with the episode's own
    meta-actions (the `explore` agent's lane changes and speed changes), the imagined ego is where highway-env put
    the real one at every step, in the start decision's ego frame: whatever the forecaster predicts for it; and
    the imagined reward (`reward=kinematic`: highway-env's formula on the kinematic ego) is the one the env paid."""
    from drive_mbrl.data import load_dataset
    from drive_mbrl.features import EGO_TRACK

    config = ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4, horizon=50, crash_head=False,
                               ego_model="kinematic", reward="kinematic")  # also auto's ego on highway
    _, episodes = load_dataset(recorded)
    env = ImaginationEnv(config, num_envs=1)
    hist, lanes, target = start_states([str(recorded)], env.A, env.W, env.frame_dt, pad=True)
    hist[:, 1:, :, -1] = 0.0  # the others absent: the tiny model's guesses about them never end a rollout here
    first = checked = 0
    for episode in episodes:
        env = ImaginationEnv(config, num_envs=1)
        one = slice(first, first + 1)
        env.starts_hist, env.starts_lane, env.starts_target = torch.as_tensor(hist[one]), torch.as_tensor(lanes[one]), \
            target[one]
        env.dis_limit = float("inf")  # the tiny model's members may disagree: no truncation here
        first += episode.steps
        env.reset(seed=0)
        state = episode.state[:, EGO_TRACK]  # (frames, fields) world frame: x, y, vx, vy, heading, ...
        f0 = episode.decision_frame[0]
        c, s = np.cos(-state[f0, 4]), np.sin(-state[f0, 4])
        ends = [int(f) for f in episode.decision_frame[1:]] + [len(state) - 1]
        for step, end in enumerate(ends[:6]):
            if episode.crashed[step]:
                break
            _, reward, term, trunc, _ = env.step(np.array([episode.action[step]]))
            assert not (term[0] or trunc[0])
            assert reward[0] == pytest.approx(episode.reward[step], abs=1e-3)
            d = state[end, :2] - state[f0, :2]
            expected = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
            np.testing.assert_allclose(env.pos[0, 0, -1].numpy(), expected, atol=2e-3)
            checked += 1
    assert checked >= 10 and len({int(a) for e in episodes for a in e.action}) >= 3


def test_auto_ego_model_is_kinematic_only_on_roads_with_lanes(tiny_checkpoint: Path, recorded: Path, tmp_path: Path):
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.scenarios import load_scenario

    highway = ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4), 1)
    assert highway.ego_model == "kinematic" and highway.reward_spec is None  # the learned reward by default
    assert ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), (str(recorded),), agents=4, reward="kinematic"),
                          1).reward_spec is not None
    collect(RunSpec(load_scenario("merge"), "idm", 1, 0, max_steps=3), tmp_path / "merge")
    merge = (str(tmp_path / "merge"),)
    on_merge = ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), merge, agents=4), 1)
    assert on_merge.ego_model == "learned" and on_merge.reward_spec is None
    with pytest.raises(ValueError, match="reward=kinematic"):
        ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), merge, agents=4, reward="kinematic"), 1)
    with pytest.raises(ValueError, match="lanes_count"):
        ImaginationEnv(ImaginationConfig(str(tiny_checkpoint), merge, agents=4, ego_model="kinematic"), 1)


def test_the_real_policy_env_passes_gymnasiums_env_checker():
    from gymnasium.utils.env_checker import check_env

    env = PolicyEnv({"scenario": "highway", "agents": 4, "history_dt": 1.0})
    try:
        check_env(env, skip_render_check=True)
    finally:
        env.close()


def test_policy_env_observation_matches_the_episode_loop():
    """PolicyEnv (what RLlib trains on) and agent=policy (what evaluation runs) see the same observation."""
    env = PolicyEnv({"scenario": "highway", "agents": 4, "history_dt": 1.0})
    try:
        obs, info = env.reset(seed=11)
        seen, targets = [obs], [env.env.unwrapped.vehicle.target_speed]
        for action in (1, 3, 1):
            obs, *_ = env.step(action)
            seen.append(obs)
            targets.append(env.env.unwrapped.vehicle.target_speed)
        arrays = env.recorder.arrays()
    finally:
        env.close()
    from drive_mbrl.features import policy_observation, scene_history

    frames = [i * 5 for i in range(4)]  # highway: 5 recorded frames per policy step
    for obs, frame, target in zip(seen, frames, targets, strict=True):
        hist, _, _ = scene_history(arrays["state"], arrays["present"], arrays["lane_offset"],
                                   arrays["lane_heading"], frame, env.scene_spec)
        expected = policy_observation(hist, int(arrays["lane_id"][frame, 0]), target)
        np.testing.assert_allclose(obs, expected, atol=1e-6)
    assert targets[2] == 30.0  # FASTER at 25 m/s
