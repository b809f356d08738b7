"""Shared fixtures: fixed seeds, the CLI as a subprocess, synthetic episodes for pure-function tests, a tiny trained
forecaster checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.types import STATE_FIELDS, Episode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    np.random.seed(0)


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `drive-mbrl ARGS` in a fresh interpreter (the installed console script's entry point)."""
    return subprocess.run([*cli_command(), *args], cwd=cwd, env=cli_env(), timeout=timeout,
                          capture_output=True, text=True)


def cli_command() -> list[str]:
    """The installed console script beside this interpreter (what the README runs), else the module."""
    script = Path(sys.executable).parent / "drive-mbrl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "drive_mbrl.cli"]


def cli_env() -> dict[str, str]:
    return {**os.environ, "HYDRA_FULL_ERROR": "0", "TQDM_DISABLE": "1"}


def make_episode(state: np.ndarray, present: np.ndarray | None = None, reward: np.ndarray | None = None,
                 crashed: bool = False, index: int = 0) -> Episode:
    """A synthetic episode with one policy step per recorded frame (except the last)."""
    frames, tracks, _ = state.shape
    steps = frames - 1
    present = np.ones((frames, tracks), bool) if present is None else present
    reward = np.ones(steps) if reward is None else reward
    crash = np.zeros(steps, bool)
    crash[-1] = crashed
    return Episode(
        index=index, seed=index, frame_time=np.arange(frames, dtype=float), state=state.astype(np.float32),
        present=present, lane_id=np.zeros((frames, tracks), np.int16), lane_edge=np.zeros((frames, tracks), np.int16),
        lane_offset=np.zeros((frames, tracks), np.float32), lane_heading=np.zeros((frames, tracks), np.float32),
        lane_edges=np.asarray(["0->1"]), vehicle_class=np.asarray(["V"] * tracks),
        decision_frame=np.arange(steps, dtype=np.int32), action=np.zeros(steps, np.int64), reward=reward,
        reward_components=np.zeros((steps, 1)), reward_component_names=np.asarray(["r"]),
        crashed=crash, terminated=crash.copy(), truncated=np.zeros(steps, bool),
        decision_ms=np.full(steps, 1.0),
    )


def straight_state(xs: list[list[float]], speeds: list[float], ys: list[float] | None = None) -> np.ndarray:
    """(T, M, F) states of vehicles driving along +x: xs[t][m] positions [m], constant speeds [m/s], lanes ys."""
    frames, tracks = len(xs), len(xs[0])
    ys = ys or [0.0] * tracks
    state = np.zeros((frames, tracks, len(STATE_FIELDS)), np.float32)
    for t in range(frames):
        for m in range(tracks):
            state[t, m] = (xs[t][m], ys[m], speeds[m], 0.0, 0.0, 5.0, 2.0)
    return state


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small forecaster trained for a few epochs on 3 short real highway episodes (calibrated, so it has
    uncertainty limits)."""
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.fit import TrainSettings, fit, load_scenes, split_by_episode
    from drive_mbrl.forecaster import ForecasterConfig
    from drive_mbrl.scenarios import load_scenario

    root = tmp_path_factory.mktemp("tiny")
    collect(RunSpec(load_scenario("highway"), "explore", 4, 0, max_steps=12), root / "data")
    config = ForecasterConfig(agents=4, history_len=3, horizon=3, members=2, modes=2, width=16, heads=2, blocks=1,
                              decoder_width=16, neighbours=True, pad_history=True, residual="lane",
                              mask_absent=True)
    scenes, sources = load_scenes([str(root / "data")], config, history_dt=0.2)
    train, val = split_by_episode(scenes.episode, 0.25, 0)
    torch.manual_seed(0)
    fit(scenes.subset(train), scenes.subset(val), config, TrainSettings(epochs=3, batch_size=16, seed=0),
        root / "ck", {"data": sources, "history_dt": 0.2}, torch.device("cpu"))
    return root / "ck"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tiny_policy: Path, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (parity on 40 random and up to 40 recorded scenes), with a planner graph that
    runs categorical CEM (budget 64 of 5^3 = 125 plans: 2 iterations of 32) with `highway`'s dead-end charge,
    checked on 8 recorded scenes, and the tiny policy."""
    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_checkpoint, out, samples=40, seed=0, planner=PlannerConfig(budget=64, dead_end_speed=20.0),
                  planner_scenes=8, policy=tiny_policy)
    return out


@pytest.fixture(scope="session")
def tiny_policy(tiny_checkpoint: Path) -> Path:
    """A small reactive policy (4 slots, 2 x 16 units, random weights with a sharp head, normalised on the tiny
    dataset)."""
    from drive_mbrl.data import read_manifest
    from drive_mbrl.policy import PolicyConfig, PolicyNet, dataset_observations, save_policy

    manifest = read_manifest(tiny_checkpoint.parent / "data")
    torch.manual_seed(0)
    net = PolicyNet(PolicyConfig(agents=4, hidden=16, layers=2, history_dt=1.0))
    net.set_normalisation(dataset_observations(net.config, [str(tiny_checkpoint.parent / "data")]))
    with torch.no_grad():
        net.head.weight.mul_(30.0)  # sharp logits: the greedy action changes from scene to scene
    save_policy(tiny_checkpoint.parent / "policy", net, manifest["action_names"], {})
    return tiny_checkpoint.parent / "policy"
