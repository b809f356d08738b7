"""The episode loop: agents' per-step logs stacked into `Episode.step_log`."""

import numpy as np
import pytest

from drive_mbrl.rollout import EpisodeJob, EpisodeRunner, stack_step_logs
from drive_mbrl.scenarios import load_scenario


class LoggingAgent:
    """Always SLOWER (4); logs its step number, a (2, 3) array that is NaN on odd steps (a "fallback") and a flag."""

    drives_itself = False

    def reset(self, env, seed: int) -> None:
        self.step = -1

    def act(self, obs, env) -> int:
        self.step += 1
        return 4

    def step_log(self) -> dict[str, np.ndarray]:
        grid = np.full((2, 3), np.nan, np.float32) if self.step % 2 else np.full((2, 3), self.step, np.float32)
        return {"step": np.int32(self.step), "grid": grid, "odd": np.asarray(self.step % 2 == 1)}


def test_a_fake_agents_step_log_is_stacked_over_steps():
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "fake", 0, 3, max_steps=3), LoggingAgent())
    finally:
        runner.close()
    log = episode.step_log
    assert set(log) == {"step", "grid", "odd"}
    assert log["step"].dtype == np.int32 and log["step"].tolist() == [0, 1, 2]
    assert log["grid"].shape == (3, 2, 3) and log["grid"].dtype == np.float32
    assert np.all(log["grid"][0] == 0) and np.all(np.isnan(log["grid"][1])) and np.all(log["grid"][2] == 2)
    assert log["odd"].tolist() == [False, True, False]


def test_rule_agents_have_an_empty_step_log():
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "slower", 0, 3, max_steps=2))
    finally:
        runner.close()
    assert episode.step_log == {}


def test_step_logs_that_change_shape_or_names_are_refused():
    with pytest.raises(ValueError, match="'grid' is float32\\(3,\\) at step 1"):
        stack_step_logs([{"grid": np.zeros(2, np.float32)}, {"grid": np.zeros(3, np.float32)}])
    with pytest.raises(ValueError, match="same names"):
        stack_step_logs([{"a": np.zeros(2)}, {"b": np.zeros(2)}])
    with pytest.raises(ValueError, match="dtype|float64"):
        stack_step_logs([{"a": np.zeros(2)}, {"a": np.zeros(2, np.float32)}])
