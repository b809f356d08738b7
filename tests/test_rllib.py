"""RLlib around the project's policy network: the RLModule is the same network, the mixed env, the rl command."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from conftest import run_cli

from drive_mbrl.policy import PolicyConfig, PolicyNet, load_policy, save_policy

NAMES = ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"]


def test_the_rl_module_computes_the_distilled_networks_logits(tmp_path: Path):
    from dataclasses import asdict

    from ray.rllib.core.columns import Columns

    from drive_mbrl.imagination import observation_space
    from drive_mbrl.rllib import PolicyRLModule

    torch.manual_seed(0)
    config = PolicyConfig(agents=4, hidden=32)
    net = PolicyNet(config)
    net.set_normalisation(np.random.default_rng(0).normal(3.0, 2.0, (100, config.obs_dim)).astype(np.float32))
    save_policy(tmp_path / "p", net, NAMES, {})
    module = PolicyRLModule(observation_space=observation_space(4), action_space=gym.spaces.Discrete(5),
                            model_config={"policy": asdict(config), "init": str(tmp_path / "p")})
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(7, config.obs_dim)).astype(np.float32))
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: obs})
        torch.testing.assert_close(out[Columns.ACTION_DIST_INPUTS], net(obs), rtol=0, atol=0)
        assert module.compute_values({Columns.OBS: obs}).shape == (7,)
    # ... and back: the RLModule's network saved as a policy folder gives the same logits again.
    with torch.no_grad():
        for p in module.policy.head.parameters():
            p.add_(0.5)  # as if RL had changed it
        save_policy(tmp_path / "back", module.policy, NAMES, {})
        back, _ = load_policy(tmp_path / "back")
        torch.testing.assert_close(back(obs), module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS],
                                   rtol=0, atol=0)


def test_mixed_env_steps_real_and_imagined_envs_together(tiny_checkpoint: Path):
    from drive_mbrl.rllib import make_mixed_env

    env = make_mixed_env({"num_envs": 3, "real": 1, "imagined": 2, "scenario": "highway", "agents": 4,
                          "history_dt": 1.0, "imagination": {"checkpoint": str(tiny_checkpoint),
                                                             "datasets": [str(tiny_checkpoint.parent / "data")],
                                                             "agents": 4, "horizon": 3}})
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (3, 4 * 14 + 2)
        for _ in range(4):
            obs, reward, term, trunc, _ = env.step(np.array([1, 1, 1]))
            assert obs.shape == (3, 58) and reward.shape == term.shape == trunc.shape == (3,)
            assert np.isfinite(obs).all()
            assert set(obs[:, -1].tolist()) <= {20.0, 25.0, 30.0}  # every env's observation ends in a set-point
    finally:
        env.close()


def test_rl_dyna_trains_resumes_and_writes_a_policy_smoke(tmp_path: Path, tiny_checkpoint: Path):
    """Smoke test of the whole command on a tiny budget (real RLlib PPO, real env, real forecaster), plus resume:
    a rerun with more iterations continues from the saved state instead of starting over."""
    args = ["rl", "mode=dyna", f"checkpoint={tiny_checkpoint}", f"dataset=[{tiny_checkpoint.parent / 'data'}]",
            "imagined=31", "real=1", "batch_size=64", "minibatch_size=32", "epochs=1", "eval_episodes=1",
            "hidden=16", "agents=4", f"out={tmp_path / 'rl'}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli(*args, "iterations=1", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((tmp_path / "rl" / "history.json").read_text())
    assert len(history) == 1 and history[0]["real_steps"] >= 1
    assert history[0]["imagined_steps"] >= 31 * history[0]["real_steps"] - 31
    net, meta = load_policy(tmp_path / "rl" / "policy")
    assert meta["iteration"] == 0 and net.config.hidden == 16
    again = run_cli(*args, "iterations=2", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    history = json.loads((tmp_path / "rl" / "history.json").read_text())
    assert [row["iteration"] for row in history] == [0, 1]
    assert history[1]["env_steps"] > history[0]["env_steps"]  # continued, not restarted


def test_rl_stops_before_an_iteration_would_pass_the_real_step_budget(tmp_path: Path):
    """About 64 real steps per iteration: with a budget of 150 (2 of them for input statistics) the third iteration
    would pass it, so training stops after two."""
    args = ["rl", "mode=model_free", "real=2", "batch_size=64", "minibatch_size=32", "epochs=1", "iterations=10",
            "max_real_steps=150", "norm_steps=2", "eval_episodes=0", "hidden=16", "agents=4",
            f"out={tmp_path / 'rl'}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    history = json.loads((tmp_path / "rl" / "history.json").read_text())
    assert len(history) == 2 and history[-1]["real_steps"] <= 150
    assert history[-1]["real_steps"] + (history[-1]["real_steps"] - history[0]["real_steps"]) > 150


def test_rl_refuses_dyna_without_a_model(tmp_path: Path):
    done = run_cli("rl", "mode=dyna", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2 and "mode=dyna needs checkpoint" in done.stderr
    assert not (tmp_path / "run").exists()
