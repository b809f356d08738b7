"""Safety metrics on hand-checkable synthetic episodes."""

import numpy as np
import pytest

from drive_mbrl.evaluate import episode_metrics, summarise, time_to_collision
from tests.conftest import make_episode, straight_state


def test_ttc_of_a_car_following_pair_matches_gap_over_closing_speed():
    # Ego at 0 m doing 30 m/s, leader at 25 m doing 20 m/s: gap 25 - 5 = 20 m, closing 10 m/s -> 2 s.
    state = straight_state([[0.0, 25.0]], speeds=[30.0, 20.0])
    ttc = time_to_collision(state, np.ones((1, 2), bool))
    assert ttc[0] == pytest.approx(2.0)


def test_ttc_ignores_opening_gaps_other_lanes_and_absent_vehicles():
    # Leader faster (opening), a slow car in the next lane (4 m lateral > 2 m overlap), an absent slow car.
    state = straight_state([[0.0, 20.0, 20.0, 10.0]], speeds=[20.0, 25.0, 5.0, 0.0], ys=[0.0, 0.0, 4.0, 0.0])
    present = np.array([[True, True, True, False]])
    assert np.isinf(time_to_collision(state, present)[0])


def test_ttc_counts_a_faster_vehicle_closing_from_behind():
    # Follower 15 m behind (gap 10 m) closing at 5 m/s -> 2 s.
    state = straight_state([[0.0, -15.0]], speeds=[20.0, 25.0])
    assert time_to_collision(state, np.ones((1, 2), bool))[0] == pytest.approx(2.0)


def test_ttc_is_rotation_invariant():
    state = straight_state([[0.0, 25.0]], speeds=[30.0, 20.0])
    angle = 0.7
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    turned = state.copy()
    turned[..., 0:2] = state[..., 0:2] @ rot.T
    turned[..., 2:4] = state[..., 2:4] @ rot.T
    turned[..., 4] = angle
    assert time_to_collision(turned, np.ones((1, 2), bool))[0] == pytest.approx(2.0, rel=1e-5)


def test_episode_and_summary_figures_by_hand():
    # Two episodes: 3 steps of reward 1 at 30 m/s without a leader; 2 steps with a crash.
    safe = make_episode(straight_state([[0.0]] * 4, speeds=[30.0]))
    crash = make_episode(straight_state([[0.0, 25.0]] * 3, speeds=[20.0, 10.0]), reward=np.array([0.5, 0.0]),
                         crashed=True, index=1)
    assert episode_metrics(safe) == {"return": 3.0, "crashed": 0.0, "speed_mean": 30.0, "ttc_min": np.inf,
                                     "steps": 3.0}
    assert episode_metrics(crash)["ttc_min"] == 0.0
    summary = summarise([safe, crash])
    assert summary["episodes"] == 2
    assert summary["return_mean"] == pytest.approx(1.75)
    assert summary["return_std"] == pytest.approx(1.25)
    assert summary["crash_rate"] == 0.5
    assert summary["speed_mean"] == pytest.approx(25.0)
    assert summary["ttc_min_p5"] == 0.0
    assert summary["decision_ms_p50"] == 1.0
