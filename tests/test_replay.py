"""Replay: boxes drawn where the simulator had the vehicles (through matplotlib's own transform), predictions
taken back to the world frame, an episode without a planning log, missing runs and episodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drive_mbrl.data import save_episode
from drive_mbrl.errors import DataError
from drive_mbrl.features import to_ego_frame
from drive_mbrl.replay import Replay, SceneView, box_corners, ego_to_world, load_replay
from drive_mbrl.scenarios import LaneGeometry
from tests.conftest import make_episode, run_cli, straight_state

MANIFEST = {"dt": 1.0, "policy_dt": 1.0, "agent": "mpc", "scenario": {"name": "synthetic"},
            "action_names": ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"]}


def synthetic_replay(planned: bool) -> Replay:
    """Ego at y = 4 doing 20 m/s, track 1 ahead in the lane at y = 0 (to the ego's left), track 2 behind at y = 8;
    with a step log predicting track 1 straight ahead at 10 m/s (2 modes) from an ego pose turned by 0.1 rad."""
    xs = [[0.0 + 20 * t, 15.0 + 10 * t, -12.0 + 22 * t] for t in range(4)]
    episode = make_episode(straight_state(xs, speeds=[20.0, 10.0, 22.0], ys=[4.0, 0.0, 8.0]))
    episode.state[:, 1, 4] = 0.3  # track 1 turned, so its box is not axis-aligned
    if planned:
        S, A, K, H = episode.steps, 3, 2, 2
        mean = np.zeros((S, A, K, H, 2), np.float32)
        mean[:, :, :, :, 0] = [10.0, 20.0]
        mean[:, 1, 1, :, 1] = -1.0  # second mode of slot 1 drifts 1 m to the ego's left
        episode.step_log = {
            "future_mean": mean, "future_std": np.full((S, A, K, H, 2), 0.5, np.float16),
            "future_prob": np.tile(np.array([0.7, 0.3], np.float16), (S, A, 1)),
            "future_disagreement": np.zeros((S, A, H), np.float16),
            "track": np.tile(np.array([0, 1, -1], np.int32), (S, 1)),
            "ego_pose": np.stack([episode.state[episode.decision_frame, 0, 0], episode.state[episode.decision_frame,
                                  0, 1], np.full(S, 0.1)], -1),
            "collision_prob": np.zeros(S, np.float32), "cost": np.zeros(S, np.float32),
            "cand_plan": np.ones((S, 5, H), np.int8), "cand_cost": np.zeros((S, 5), np.float32),
            "cand_collision_prob": np.zeros((S, 5), np.float32)}
    lane = LaneGeometry("0->1", 0, np.array([[-100.0, 2.0], [300.0, 2.0]]), np.array([[-100.0, 0.0], [300.0, 0.0]]),
                        np.array([[-100.0, 4.0], [300.0, 4.0]]), 3, 1)
    return Replay(MANIFEST, episode, [lane], Path("."))


def box_centres_in_data_coordinates(view: SceneView, track: int) -> np.ndarray:
    """The drawn box's corners as the renderer placed them (display pixels), mapped back through the axes' data
    transform: (4, 2) [m]."""
    pixels = view.boxes[track].get_verts()[:4]
    return view.ax.transData.inverted().transform(pixels)


@pytest.mark.parametrize("planned", [False, True])
def test_drawn_boxes_are_where_the_episode_recorded_the_vehicles(planned: bool):
    replay = synthetic_replay(planned)
    view = SceneView(replay, view=100.0)
    try:
        for frame in range(replay.episode.state.shape[0]):
            view.render(frame)
            state = replay.episode.state[frame]
            for track in range(3):
                corners = box_centres_in_data_coordinates(view, track)
                np.testing.assert_allclose(corners.mean(0), state[track, :2], atol=1e-6)
                np.testing.assert_allclose(corners, box_corners(state[track]), atol=1e-6)
            ego_px, left_px = view.ax.transData.transform(state[[0, 1], :2])
            assert left_px[1] > ego_px[1], "y grows downwards on screen, as highway-env draws it"
    finally:
        view.close()


def test_predicted_futures_are_drawn_in_the_world_frame_from_the_logged_pose():
    replay = synthetic_replay(planned=True)
    view = SceneView(replay, view=100.0)
    try:
        view.render(1)
        log = replay.episode.step_log
        pose = log["ego_pose"][1]
        line = view.futures[1][1]  # slot 1, mode 1
        xy = np.column_stack(line.get_data())
        np.testing.assert_allclose(xy[0], replay.episode.state[1, 1, :2], atol=1e-6)  # starts at the vehicle
        np.testing.assert_allclose(xy[1:], ego_to_world(log["future_mean"][1, 1, 1].astype(float), pose),
                                   atol=1e-5)
        assert line.get_alpha() == pytest.approx(0.15 + 0.85 * 0.3, abs=1e-3)  # opacity by mode probability
        assert view.futures[2][0].get_visible() is False  # empty slot
        plan = np.column_stack(view.plan.get_data())
        np.testing.assert_allclose(plan[0], pose[:2])
        assert "no planning log" not in view.fig._suptitle.get_text()
    finally:
        view.close()


def test_title_says_when_there_is_no_planning_log():
    view = SceneView(synthetic_replay(planned=False))
    try:
        assert view.fig._suptitle.get_text().endswith("no planning log: vehicles only")
        assert view.futures == [] and not synthetic_replay(planned=False).planned
    finally:
        view.close()


def test_ego_to_world_inverts_to_ego_frame():
    rng = np.random.default_rng(0)
    pose = np.array([12.0, -3.0, 0.0, 0.0, 0.7, 5.0, 2.0])
    world = rng.normal(size=(6, 7)) * 20
    local = to_ego_frame(world, pose)
    np.testing.assert_allclose(ego_to_world(local[:, :2], pose[[0, 1, 4]]), world[:, :2], atol=1e-9)


def test_box_corners_by_hand():
    # A 4 m x 2 m car at (10, 5) heading along +y (down on screen): front at y = 7, its left side at x = 11.
    corners = box_corners(np.array([10.0, 5.0, 0.0, 0.0, np.pi / 2, 4.0, 2.0]))
    np.testing.assert_allclose(corners, [[11, 7], [9, 7], [9, 3], [11, 3]], atol=1e-12)


def test_missing_run_and_missing_episode_are_clear_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_replay(tmp_path / "nowhere", 0)
    with pytest.raises(DataError, match="holds no dataset"):
        load_replay(tmp_path, 0)
    (tmp_path / "episodes").mkdir()
    (tmp_path / "episodes" / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    save_episode(tmp_path / "episodes", make_episode(straight_state([[0.0]] * 2, speeds=[1.0]), index=3))
    with pytest.raises(DataError, match=r"episode 7 is not in .*episodes there: 3..3 \(1 files\)"):
        load_replay(tmp_path, 7)


def test_replay_cli_without_planning_log_and_with_a_missing_run(tmp_path: Path):
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.scenarios import load_scenario

    collect(RunSpec(load_scenario("highway"), "slower", 1, 0, max_steps=3), tmp_path / "run" / "episodes")
    result = run_cli("replay", "run=run", "episode=0", "hz=1", "key_frames=2", "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no planning log" in result.stdout and "vehicles only" in result.stdout
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert files == ["ep_000000.gif", "ep_000000_step000.png", "ep_000000_step002.png", "metrics.json", "replay.log"]
    from PIL import Image

    with Image.open(tmp_path / "out" / "ep_000000.gif") as gif:
        assert gif.n_frames == 4  # frames 0..3 at 1 Hz of a 3-step episode
    missing = run_cli("replay", "run=nowhere", "hydra.run.dir=bad", cwd=tmp_path)
    assert missing.returncode == 2 and "run folder nowhere does not exist" in missing.stderr
    assert not (tmp_path / "bad").exists()
