"""The planner: search functions against known optima, risk measures by hand, the vectorised objective against a
loop reference, plan_scene with a fake model, and fault injection on a real episode."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.config import RISK_MEASURES, UNCERTAINTY_LEVELS, PlannerConfig
from drive_mbrl.planning import (
    agent_hits,
    categorical_cem,
    cem,
    collisions,
    draw_noise,
    enumerate_plans,
    exhaustive_search,
    lookahead,
    mode_collision_prob,
    mppi,
    plan_scene,
    plan_step,
    risk_measure,
    sample_costs,
    score_plans,
    search_shape,
    travel_headings,
    unique_plans,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_risk_measures_by_hand():
    costs = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 7.0, 6.0]])
    assert risk_measure(costs, "mean").item() == pytest.approx(4.5)
    assert risk_measure(costs, "cvar", 1.0).item() == pytest.approx(4.5)  # CVaR_1 is the mean
    assert risk_measure(costs, "cvar", 0.25).item() == pytest.approx(7.5)  # mean of the worst 2 of 8
    assert risk_measure(costs, "cvar", 0.1).item() == pytest.approx(8.0)  # ceil(0.8) = 1 sample: the worst
    assert risk_measure(costs, "worst").item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="choose one of"):
        risk_measure(costs, "var")
    assert set(RISK_MEASURES) == {"mean", "cvar", "worst"}


def test_enumeration_and_unique_plans():
    plans = enumerate_plans(3, 4)
    assert plans.shape == (81, 4) and len(unique_plans(plans, 3)) == 81
    torch.testing.assert_close(unique_plans(torch.cat([plans, plans[:5]]).flip(0), 3), plans)


def _distance_to(target: torch.Tensor):
    return lambda plans: (plans != target).sum(-1).to(torch.float32) + 0.01 * plans.sum(-1)


def test_exhaustive_search_finds_the_optimum():
    target = torch.tensor([4, 0, 2, 2])
    result = exhaustive_search(_distance_to(target), 5, 4)
    assert torch.equal(result.plan, target) and result.evaluated == 625


def test_categorical_cem_finds_the_optimum_of_a_space_beyond_its_budget():
    target = torch.tensor([1, 3, 0, 4, 2, 2, 1])  # 5^7 = 78,125 sequences, 6 x 200 evaluated
    result = categorical_cem(_distance_to(target), 5, 7, population=200, iterations=6, elites=20, generator=gen())
    assert torch.equal(result.plan, target) and result.evaluated <= 1200


def test_categorical_cem_evaluates_included_plans_and_skips_infeasible_ones():
    target = torch.tensor([2, 2, 2])
    seen = []

    def objective(plans):
        seen.append(plans)
        cost = _distance_to(target)(plans)
        return torch.where(plans[:, 0] == 0, torch.full_like(cost, math.inf), cost)

    result = categorical_cem(objective, 3, 3, population=4, iterations=1, elites=2, generator=gen(),
                             include=target[None])
    assert (seen[0] == target).all(-1).any() and torch.equal(result.plan, target)


@pytest.mark.parametrize("method", ["cem", "mppi"])
def test_continuous_search_finds_the_minimum_of_a_quadratic(method: str):
    optimum = torch.tensor([[0.3, -0.5], [0.1, 0.7], [-0.8, 0.2]])
    low, high = torch.full((2,), -1.0), torch.full((2,), 1.0)

    def objective(plans):
        return ((plans - optimum) ** 2).sum((-1, -2))

    if method == "cem":
        result = cem(objective, 3, low, high, population=256, iterations=8, elites=25, generator=gen())
    else:
        result = mppi(objective, 3, low, high, samples=256, iterations=8, temperature=0.02, generator=gen())
    assert torch.allclose(result.plan, optimum, atol=0.05), result.plan


def test_cem_refits_to_feasible_plans_only():
    """Only plans in (0.8, 0.95) are allowed (+inf elsewhere; a few % of the first population), the best is 0.9.
    With fewer feasible plans than `elites`, the refit must follow the feasible ones, not the rejected ones around
    the box centre: most of the last population is feasible."""
    low, high = torch.full((1,), -1.0), torch.full((1,), 1.0)

    def objective(plans):
        x = plans[:, 0, 0]
        return torch.where((x > 0.8) & (x < 0.95), (x - 0.9) ** 2, torch.full_like(x, math.inf))

    result = cem(objective, 1, low, high, population=64, iterations=4, elites=20, generator=gen())
    assert torch.isfinite(result.costs).float().mean() > 0.5
    assert abs(float(result.plan[0, 0]) - 0.9) < 0.02, result.plan


def test_warm_start_at_the_optimum_keeps_it():
    optimum = torch.tensor([[0.5, 0.5]])
    low, high = torch.zeros(2), torch.ones(2)
    result = cem(lambda p: ((p - optimum) ** 2).sum((-1, -2)), 1, low, high, population=8, iterations=1, elites=2,
                 generator=gen(), init_mean=optimum)
    assert result.cost == 0.0 and torch.equal(result.plan, optimum)


def _collisions_reference(positions, start, size, mask, settings):
    """Loop over members, plans, samples, steps, substeps and agents."""
    E, N, A, M, H, _ = positions.shape
    out = torch.zeros(E, N, M, H, dtype=torch.bool)
    for e in range(E):
        for n in range(N):
            for m in range(M):
                crashed = False
                for h in range(H):
                    for k in range(1, settings.substeps + 1):
                        w = k / settings.substeps
                        for a in range(1, A):
                            prev_e = start[0] if h == 0 else positions[e, n, 0, m, h - 1]
                            prev_a = start[a] if h == 0 else positions[e, n, a, m, h - 1]
                            pe = prev_e + w * (positions[e, n, 0, m, h] - prev_e)
                            pa = prev_a + w * (positions[e, n, a, m, h] - prev_a)
                            reach_x = (size[0, 0] + size[a, 0]) / 2 + settings.margin_long
                            reach_y = (size[0, 1] + size[a, 1]) / 2 + settings.margin_lat
                            if mask[a] and abs(pa[0] - pe[0]) < reach_x and abs(pa[1] - pe[1]) < reach_y:
                                crashed = True
                    out[e, n, m, h] = crashed
    return out


def test_vectorised_collisions_match_a_loop_reference():
    torch.manual_seed(0)
    positions = torch.randn(2, 3, 4, 5, 3, 2) * torch.tensor([8.0, 3.0])
    start = torch.randn(4, 2) * torch.tensor([8.0, 3.0])
    size = torch.tensor([[5.0, 2.0], [4.0, 1.8], [6.0, 2.2], [5.0, 2.0]])
    mask = torch.tensor([True, True, False, True])
    settings = PlannerConfig(substeps=3)
    fast = collisions(positions, start, size, mask, settings)
    reference = _collisions_reference(positions, start, size, mask, settings)
    assert fast.any() and not fast.all()
    assert torch.equal(fast, reference)


def test_oriented_boxes_by_hand():
    """The ego (5 x 2 m) stands at the origin facing x; four 5 x 2 m cars end a 1-step plan (one check, no
    margins). One crossing along y at x = 4: ego-frame boxes reach 5 m in x (a hit), turned boxes 2.5 + 1 = 3.5 m
    (clear). One crossing at x = 0 that ends 3 m to the side: 2 m of reach in y (clear) against 1 + 2.5 = 3.5 m (a
    hit). One driving along x to 4 m ahead: parallel, so both agree (a hit). One driving at 45 degrees to (3, 2.6):
    its nearest corner lies at (3 - 1.5 / sqrt 2, 2.6 - 3.5 / sqrt 2) = (1.94, 0.13), inside the ego's box (a hit);
    moved to (3.5, 3.1) the corner is at (2.44, 0.63), still inside; to (4, 3.6), at (2.94, 1.13): clear. Boxes
    aligned with the ego frame reach 2 m in y and miss all three."""
    start = torch.tensor([[0.0, 0.0], [4.0, -9.0], [0.0, -6.0], [-5.0, 0.0], [-4.0, -4.4]])
    heading = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2 ** -0.5, 2 ** -0.5]])
    size = torch.tensor([[5.0, 2.0]] * 5)
    mask = torch.ones(5, dtype=torch.bool)
    expected = {(3.0, 2.6): True, (3.5, 3.1): True, (4.0, 3.6): False}
    for diagonal, hit_turned in expected.items():
        end = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [4.0, 0.0], list(diagonal)])
        positions = end[None, None, :, None, None, :]  # (E, N, A, M, H, 2) = (1, 1, 5, 1, 1, 2)
        hits = {}
        for oriented in (False, True):
            settings = PlannerConfig(margin_long=0.0, margin_lat=0.0, substeps=1, oriented_boxes=oriented)
            turned = travel_headings(positions, start, heading) if oriented else None
            hits[oriented] = agent_hits(positions, start, size, settings, headings=turned)[0, 0, :, 0, 0].tolist()
            assert collisions(positions, start, size, mask, settings, heading)[0, 0, 0, 0].item()  # a hit either way
        assert hits[False] == [True, False, True, False]
        assert hits[True] == [False, True, True, hit_turned]


def test_turned_boxes_match_highway_envs_polygon_test():
    """agent_hits with headings against highway-env's own separating-axis test of vehicle polygons
    (`utils.are_polygons_intersecting`, what the simulator uses for crashes), on random poses near the ego."""
    from highway_env import utils

    def polygon(center, length, width, angle):
        c, s = np.cos(angle), np.sin(angle)
        corners = np.array([[-length / 2, -width / 2], [-length / 2, width / 2], [length / 2, width / 2],
                            [length / 2, -width / 2]]) @ np.array([[c, s], [-s, c]]) + center
        return np.vstack([corners, corners[:1]])

    rng = np.random.default_rng(3)
    A = 400
    center = np.concatenate([rng.normal(0.0, 1.0, (1, 2)), rng.uniform(-7.0, 7.0, (A - 1, 2))])
    angle = rng.uniform(-np.pi, np.pi, A)
    size = np.stack([rng.uniform(3.0, 7.0, A), rng.uniform(1.5, 2.5, A)], -1)
    positions = torch.tensor(center, dtype=torch.float64)[None, None, :, None, None, :]
    headings = tuple(torch.tensor(f(angle))[None, None, :, None, None] for f in (np.cos, np.sin))
    settings = PlannerConfig(margin_long=0.0, margin_lat=0.0, substeps=1)
    hits = agent_hits(positions, positions[0, 0, :, 0, 0], torch.tensor(size), settings,
                      headings=headings)[0, 0, :, 0, 0]
    ego = polygon(center[0], *size[0], angle[0])
    reference = [utils.are_polygons_intersecting(ego, polygon(center[a], *size[a], angle[a]), np.zeros(2),
                                                 np.zeros(2))[0] for a in range(1, A)]
    assert 0.1 < hits.double().mean() < 0.9
    assert hits.tolist() == reference


def test_turned_boxes_along_the_frame_are_the_aligned_test():
    """Headings all along the ego frame's x reduce the separating-axis test to the aligned boxes, margins and the
    spread box of `mode_collision_prob` included."""
    torch.manual_seed(4)
    positions = torch.randn(2, 3, 5, 4, 3, 2) * torch.tensor([8.0, 3.0])
    start = torch.randn(5, 2) * torch.tensor([8.0, 3.0])
    size = torch.tensor([[5.0, 2.0], [4.0, 1.8], [6.0, 2.2], [5.0, 2.0], [12.0, 2.5]])
    extra = (torch.rand(2, 3, 4, 4, 3), torch.rand(2, 3, 4, 4, 3))
    along_x = (torch.ones(2, 3, 5, 4, 3), torch.zeros(2, 3, 5, 4, 3))
    settings = PlannerConfig(substeps=3)
    aligned = agent_hits(positions, start, size, settings, extra)
    assert aligned.any() and not aligned.all()
    assert torch.equal(agent_hits(positions, start, size, settings, extra, along_x), aligned)


@pytest.mark.parametrize("turned", [False, True])
def test_compact_collision_checks_match_the_dense_ones(turned):
    """`agent_hits` on the CPU checks only the pair-steps whose segment can reach the pair (`_near_segments`): it
    must give exactly the dense test's answer, aligned or turned boxes, with a spread box and absent agents, on
    futures where a good share of pair-steps are near (and so go through the compacted path)."""
    torch.manual_seed(5)
    E, N, A, M, H = 2, 6, 6, 4, 5
    positions = torch.randn(E, N, A, M, H, 2) * torch.tensor([12.0, 4.0])
    start = torch.randn(A, 2) * torch.tensor([12.0, 4.0])
    size = torch.tensor([[5.0, 2.0], [4.0, 1.8], [6.0, 2.2], [5.0, 2.0], [12.0, 2.5], [4.5, 1.9]])
    heading = torch.nn.functional.normalize(torch.randn(A, 2), dim=-1)
    extra = (torch.rand(E, N, A - 1, M, H), torch.rand(E, N, A - 1, M, H))
    present = torch.tensor([True, True, False, True, True, True])
    headings = travel_headings(positions, start, heading) if turned else None
    settings = PlannerConfig(substeps=4)
    for args in ((None, None), (extra, present)):
        dense = agent_hits(positions, start, size, settings, args[0], headings, args[1], compact=False)
        fast = agent_hits(positions, start, size, settings, args[0], headings, args[1], compact=True)
        assert 0.02 < dense.double().mean() < 0.5
        assert torch.equal(fast, dense)
        if args[1] is not None:
            assert not dense[:, :, 1].any()  # slot 2, absent, never hits


def test_vectorised_sample_costs_match_a_loop_reference():
    torch.manual_seed(1)
    E, N, A, M, H = 2, 4, 3, 3, 4
    positions = torch.randn(E, N, A, M, H, 2) * torch.tensor([10.0, 3.0])
    positions[:, :, 0, :, :, 0] += torch.arange(1, H + 1) * 5.0  # the ego moves forward
    reward = torch.rand(E, N, H)
    last = torch.zeros(A, 12)
    last[:, :2] = torch.randn(A, 2) * torch.tensor([10.0, 3.0])
    last[:, 6], last[:, 7] = 5.0, 2.0
    mask = torch.ones(A, dtype=torch.bool)
    plans = torch.randint(0, 5, (N, H))
    settings = PlannerConfig(gamma=0.8, collision_cost=3.0, progress_weight=0.2, comfort_weight=0.1)
    costs, crashed, _ = sample_costs(positions, reward, last, mask, settings, plans, policy_dt=1.0)
    reference_hits = _collisions_reference(positions, last[:, :2], last[:, 6:8], mask, settings)
    assert crashed.any() and not crashed.all()
    for e in range(E):
        for n in range(N):
            changes = sum(int(plans[n, h] != plans[n, h - 1]) for h in range(1, H))
            for m in range(M):
                value = 0.0
                for h in range(H):
                    value -= settings.gamma ** h * float(reward[e, n, h])
                    if reference_hits[e, n, m, h]:
                        value += settings.collision_cost * settings.gamma ** h
                        break
                value -= settings.progress_weight * float(positions[e, n, 0, m, H - 1, 0]) / H
                value += settings.comfort_weight * changes
                assert costs[n, e * M + m].item() == pytest.approx(value, abs=1e-5)


def _scene_outputs(ego_speeds: list[float], E: int = 2, K: int = 2, H: int = 3, reward: float = 1.0):
    """Forecaster outputs for N plans: the ego drives at ego_speeds[n] m/s along x; one car sits still 25 m ahead.
    Stds are tiny, so every sample equals the mean."""
    N, A = len(ego_speeds), 2
    mean = torch.zeros(E, N, A, K, H, 2)
    t = torch.arange(1, H + 1, dtype=torch.float32)
    mean[:, :, 0, :, :, 0] = torch.tensor(ego_speeds)[None, :, None, None] * t
    mean[:, :, 1, :, :, 0] = 25.0
    out = {"mean": mean, "log_std": torch.full_like(mean, math.log(1e-4)),
           "logits": torch.full((E, N, A, K), -math.log(K)), "reward": torch.full((E, N, H), reward)}
    history_last = torch.zeros(A, 12)
    history_last[1, 0] = 25.0
    history_last[:, 6], history_last[:, 7] = 5.0, 2.0
    return out, history_last, torch.ones(A, dtype=torch.bool)


def test_lookahead_charges_a_collision_beyond_the_horizon_by_hand():
    """H = 2: the ego drives 20 m per step, a car 15 m ahead of it at the horizon's end 15 m per step, same lane.
    The gap closes 5 m per step, below the reach 5 + 1 = 6 m two steps beyond the horizon (step index 3): a
    lookahead of 1 sees nothing, a lookahead of 2 charges collision_cost * gamma^3 and keeps every reward."""
    positions = torch.zeros(1, 1, 2, 1, 2, 2)
    positions[0, 0, 0, 0, :, 0] = torch.tensor([20.0, 40.0])
    positions[0, 0, 1, 0, :, 0] = torch.tensor([40.0, 55.0])
    positions[0, 0, 1, 0, :, 1] = 0.5  # lateral offset within the lane: held
    last = torch.zeros(2, 12)
    last[1, 0], last[1, 1] = 25.0, 0.5
    last[:, 6], last[:, 7] = 5.0, 2.0
    reward, mask = torch.ones(1, 1, 2), torch.ones(2, dtype=torch.bool)
    extended = lookahead(positions, 2)
    assert extended[0, 0, :, 0, 2:, 0].tolist() == [[60.0, 80.0], [70.0, 85.0]]
    assert extended[0, 0, 1, 0, 2:, 1].tolist() == [0.5, 0.5]
    for steps, penalty in ((0, 0.0), (1, 0.0), (2, 3.0 * 0.8 ** 3)):
        settings = PlannerConfig(gamma=0.8, collision_cost=3.0, progress_weight=0.0, lookahead=steps)
        costs, crashed, _ = sample_costs(positions, reward, last, mask, settings)
        assert crashed.shape == (1, 1, 1, 2) and not crashed.any()  # within the horizon nobody collides
        assert costs.item() == pytest.approx(penalty - (1 + 0.8))


def test_plan_costs_by_hand():
    # Plan 0 stands still (no collision): cost = -(1 + 0.9 + 0.81). Plan 1 drives at 10 m/s: the gap 25 m closes
    # below reach 5 + 1 = 6 m during the second step (at 20 m the gap is 5 m): collision in step index 1. Like the
    # env, which pays the crash step's reward and then ends, it keeps the rewards of steps 0 and 1 and pays
    # collision_cost * gamma^1.
    out, last, mask = _scene_outputs([0.0, 10.0])
    settings = PlannerConfig(gamma=0.9, collision_cost=5.0, risk="mean", chance_epsilon=1.0, samples=3,
                             progress_weight=0.0)
    scores = score_plans(out, last, mask, settings, gen())
    assert scores["cost"][0].item() == pytest.approx(-(1 + 0.9 + 0.81))
    assert scores["cost"][1].item() == pytest.approx(-(1 + 0.9) + 5.0 * 0.9)
    assert scores["collision_prob"].tolist() == [0.0, 1.0]
    # Driving terms: plan 1's ego averages 30 m / 3 s = 10 m/s; it changes action twice.
    shaped = replace(settings, progress_weight=0.5, comfort_weight=0.25)
    terms = score_plans(out, last, mask, shaped, gen(), plans=torch.tensor([[0, 0, 0], [0, 1, 0]]))
    assert terms["cost"][0].item() == pytest.approx(scores["cost"][0].item(), abs=1e-3)  # draws of std 1e-4
    assert terms["cost"][1].item() == pytest.approx(scores["cost"][1].item() - 0.5 * 10.0 + 0.25 * 2, abs=1e-3)
    # The chance constraint rejects plan 1; a NaN output makes a plan infeasible and is flagged.
    constrained = score_plans(out, last, mask, replace(settings, chance_epsilon=0.5), gen())
    assert math.isinf(constrained["cost"][1].item()) and math.isfinite(constrained["cost"][0].item())
    out["mean"][0, 0, 1, 0, 2, 0] = float("nan")
    broken = score_plans(out, last, mask, settings, gen())
    assert broken["finite"].tolist() == [False, True] and math.isinf(broken["cost"][0].item())


def test_risk_averse_plans_avoid_a_rare_collision():
    # Two equally likely modes for the car ahead: it stays 25 m ahead or it cuts in at 8 m. Plan 1 (10 m/s) earns
    # more reward but collides in the cut-in mode; risk-neutral planning takes it, CVaR_0.5 does not.
    out, last, mask = _scene_outputs([0.0, 10.0], K=2)
    out["mean"][:, :, 1, 1, :, 0] = 8.0  # mode 1: the other car sits at 8 m
    out["reward"] = torch.tensor([0.2, 1.0])[None, :, None].expand(2, 2, 3).clone()
    out["mean"][:, :, 1, 0, :, 0] = 60.0
    base = PlannerConfig(gamma=0.9, collision_cost=1.0, chance_epsilon=1.0, samples=64, progress_weight=0.0)
    neutral = score_plans(out, last, mask, replace(base, risk="mean"), gen())
    averse = score_plans(out, last, mask, replace(base, risk="cvar", alpha=0.5), gen())
    assert 0.3 < neutral["collision_prob"][1].item() < 0.7
    assert int(neutral["cost"].argmin()) == 1 and int(averse["cost"].argmin()) == 0


def test_mode_collision_probability_by_hand():
    # Three cars: A (modes 0.95 far / 0.05 cutting in to 4 m), B (0.5 / 0.5) and an absent slot that would hit.
    mean = torch.zeros(1, 1, 4, 2, 2, 2)  # (E, N, A, K, H, 2); the ego stands still at the origin
    out = {"mean": mean, "log_std": torch.full_like(mean, math.log(1e-4))}
    out["mean"][0, 0, 1, 0, :, 0], out["mean"][0, 0, 1, 1, :, 0] = 60.0, 4.0
    out["mean"][0, 0, 2, 0, :, 0], out["mean"][0, 0, 2, 1, :, 0] = -60.0, -3.0
    out["mean"][0, 0, 3, :, :, 0] = 2.0
    out["logits"] = torch.log(torch.tensor([[[[0.5, 0.5], [0.95, 0.05], [0.5, 0.5], [0.5, 0.5]]]]))
    last = torch.zeros(4, 12)
    last[1, 0], last[2, 0], last[3, 0] = 60.0, -60.0, 2.0
    last[:, 6], last[:, 7] = 5.0, 2.0
    mask = torch.tensor([True, True, True, False])
    prob = mode_collision_prob(out, last[:, :2], last[:, 6:8], mask, PlannerConfig(mode_sigma=0.0))
    # A hits in its 5 % mode, B in its 50 % mode (3 m behind), the absent slot not at all: 1 - 0.95 * 0.5.
    assert prob[0, 0].tolist() == pytest.approx([1 - 0.95 * 0.5, 1 - 0.95 * 0.5])


def test_an_absent_slots_nan_mode_weights_do_not_reach_the_collision_probability():
    """What an absent slot holds is never used: NaN logits there (a model's output for an empty slot) leave the
    probability as it is with finite ones, instead of NaN x (no hit) = NaN."""
    mean = torch.zeros(1, 1, 3, 2, 2, 2)
    mean[0, 0, 1, 0, :, 0], mean[0, 0, 1, 1, :, 0] = 60.0, 3.0  # a present car: 30 % cut-in mode
    out = {"mean": mean, "log_std": torch.full_like(mean, math.log(1e-4)),
           "logits": torch.log(torch.tensor([0.5, 0.5, 0.7, 0.3, 0.5, 0.5])).reshape(1, 1, 3, 2)}
    last = torch.zeros(3, 12)
    last[1, 0], last[:, 6], last[:, 7] = 60.0, 5.0, 2.0
    mask = torch.tensor([True, True, False])
    settings = PlannerConfig(mode_sigma=0.0)
    finite = mode_collision_prob(out, last[:, :2], last[:, 6:8], mask, settings)
    out["logits"][0, 0, 2] = float("nan")
    assert torch.equal(mode_collision_prob(out, last[:, :2], last[:, 6:8], mask, settings), finite)
    assert finite[0, 0].tolist() == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("oriented", [False, True])
def test_mode_collision_probability_of_a_prefix_is_the_full_ones_first_steps(oriented):
    """`score_plans` computes the chance constraint's probability on the first `chance_steps` steps only: a step's
    hits depend on that step and the one before, so this must equal the whole horizon's first steps exactly."""
    torch.manual_seed(6)
    E, N, A, K, H = 2, 5, 5, 3, 6
    out = {"mean": torch.randn(E, N, A, K, H, 2) * torch.tensor([30.0, 8.0]),
           "log_std": torch.randn(E, N, A, K, H, 2) * 0.3 - 1.0, "logits": torch.randn(E, N, A, K).log_softmax(-1)}
    last = torch.zeros(A, 12)
    last[:, :2] = torch.randn(A, 2) * torch.tensor([30.0, 8.0])
    last[:, 4:6] = torch.nn.functional.normalize(torch.randn(A, 2), dim=-1)
    last[:, 6], last[:, 7] = 5.0, 2.0
    mask = torch.tensor([True, True, True, False, True])
    settings = PlannerConfig(oriented_boxes=oriented)
    full = mode_collision_prob(out, last[:, :2], last[:, 6:8], mask, settings, last[:, 4:6])
    assert 0.05 < full[..., 2].mean() < 0.95
    for steps in (1, 3):
        prefix = {k: v[..., :steps, :] if k != "logits" else v for k, v in out.items()}
        assert torch.equal(mode_collision_prob(prefix, last[:, :2], last[:, 6:8], mask, settings, last[:, 4:6]),
                           full[..., :steps])


class FakeModel:
    """A forecaster stand-in with a known best plan: reward 1 per step for action `best`, 0 otherwise; the ego
    and one far-away car never meet."""

    def __init__(self, best: list[int], num_actions: int = 5):
        self.config = type("C", (), {"num_actions": num_actions, "horizon": len(best), "members": 2, "modes": 1,
                                     "policy_dt": 1.0})
        self.best = torch.tensor(best)
        self.uncertainty_quantiles = torch.full((2, len(UNCERTAINTY_LEVELS)), math.inf)

    def encode(self, history, mask):
        return torch.zeros(2, 1, 2, 4)

    def decode(self, tokens, history, mask, plans, positions_only=False):
        B, N, H = plans.shape
        mean = torch.zeros(2, B, N, 2, 1, H, 2)
        mean[..., 1, :, :, 0] = 500.0
        reward = (plans == self.best).float()[None].expand(2, B, N, H)
        return {"mean": mean, "log_std": torch.full_like(mean, -5.0), "logits": torch.zeros(2, B, N, 2, 1),
                "reward": reward}


@pytest.mark.parametrize("budget", [3125, 300])
def test_plan_scene_finds_the_known_best_plan(budget: int):
    model = FakeModel([3, 1, 4, 1, 0])
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    decision = plan_scene(model, history, mask, PlannerConfig(budget=budget, iterations=4), gen())
    assert decision.plan.tolist() == [3, 1, 4, 1, 0] and decision.fallback == ""
    assert decision.evaluated == (3125 if budget == 3125 else decision.evaluated) and decision.evaluated <= max(
        budget, 3125)
    assert decision.collision_prob == 0.0


@pytest.mark.parametrize(("budget", "iterations"), [(10, 2), (64, 16)])
def test_a_population_smaller_than_the_forced_candidates_still_plans(budget: int, iterations: int):
    """The first CEM population always holds the warm start, the 5 constant plans and a policy's greedy plan (7
    rows): a budget split into fewer rows per iteration gets 7 rows each instead of failing."""
    model = FakeModel([2, 2, 2, 2, 2])
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    proposal = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    decision = plan_scene(model, history, mask, PlannerConfig(budget=budget, iterations=iterations), gen(),
                          proposal=proposal)
    assert decision.plan.tolist() == [2, 2, 2, 2, 2] and decision.fallback == ""  # a constant plan, always tried
    assert 7 <= decision.evaluated <= 7 * iterations


def test_ego_reward_replaces_the_learned_reward():
    """With `ego_reward` the planner scores the ego's own reward (here 1 per step for the plan [0, 0, 2, 2, 2],
    read from the path's last channel) instead of the forecaster's (1 per step for [3, 1, 4, 1, 0])."""
    model = FakeModel([3, 1, 4, 1, 0])
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    own = torch.tensor([0, 0, 2, 2, 2])

    def ego_path(plans: torch.Tensor) -> torch.Tensor:  # the ego stays at the origin; channel 2 marks `own`
        return torch.stack([torch.zeros_like(plans), torch.zeros_like(plans), (plans == own)], -1).float()

    settings = PlannerConfig(budget=5 ** 5, progress_weight=0.0)  # every plan
    decision = plan_scene(model, history, mask, settings, gen(), ego_path=ego_path,
                          ego_reward=lambda path: path[..., 2])
    assert decision.plan.tolist() == own.tolist()
    assert decision.expected_return == pytest.approx(sum(0.9 ** h for h in range(5)), rel=1e-6)
    assert plan_scene(model, history, mask, settings, gen(), ego_path=ego_path).plan.tolist() == [3, 1, 4, 1, 0]


def test_policy_proposals_find_the_plan_the_policy_knows_on_a_tiny_budget():
    """The best plan repeats action 2 except its last step (return 4.10 against 3.44 for holding 2). With 64
    candidates in one CEM iteration uniform sampling draws it with probability 64 / 5**5 = 2 %; a policy that puts
    95 % on action 2 proposes it with about 0.95**4 * 0.0125 = 1 % per draw, so about half of the searches find it."""
    model = FakeModel([2, 2, 2, 2, 0])
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    proposal = torch.tensor([0.0125, 0.0125, 0.95, 0.0125, 0.0125])
    settings = PlannerConfig(budget=64, iterations=1, policy_share=1.0, chance_epsilon=1.0)
    best = [2, 2, 2, 2, 0]
    plain = sum(plan_scene(model, history, mask, settings, gen(s)).plan.tolist() == best for s in range(20))
    guided = sum(plan_scene(model, history, mask, settings, gen(s), proposal=proposal).plan.tolist() == best
                 for s in range(20))
    assert plain <= 2 and guided >= 6, (plain, guided)


def test_plan_scene_falls_back_on_nan_and_on_exploding_uncertainty():
    model = FakeModel([2, 2, 2])
    model.uncertainty_quantiles = torch.full((2, len(UNCERTAINTY_LEVELS)), 1.0)
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    settings = PlannerConfig(budget=125)

    def nan(out):
        return {**out, "mean": out["mean"] * float("nan")}

    def wide(out):
        return {**out, "log_std": out["log_std"] + 10.0}

    assert plan_scene(model, history, mask, settings, gen(), fault=nan).fallback == "model_output_not_finite"
    assert plan_scene(model, history, mask, settings, gen(), fault=wide).fallback == "spread_too_wide"
    assert plan_scene(model, history, mask, settings, gen()).fallback == ""


def test_plan_scene_returns_the_chosen_plans_futures_and_every_candidate():
    model = FakeModel([3, 1, 4, 1, 0])
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    decision = plan_scene(model, history, mask, PlannerConfig(budget=300, iterations=3), gen())
    assert decision.candidates.shape == (decision.evaluated, 5)
    assert decision.scores["cost"].shape == (decision.evaluated,)
    assert float(decision.scores["cost"].min()) == decision.cost
    assert decision.futures["mean"].shape == (2, 2, 1, 5, 2) and decision.futures["logits"].shape == (2, 2, 1)
    assert torch.all(decision.futures["mean"][:, 1, ..., 0] == 500.0)  # FakeModel's agent 1 sits at x = 500 m
    assert torch.equal(decision.scores["risk"], decision.scores["risk"].nan_to_num())  # finite, unlike cost


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_planning_only_the_present_agents_is_exact(tiny_checkpoint: Path, fusion: str):
    """plan_scene sends only the present agents through the forecaster: same plan, costs and futures as the whole
    scene through `plan_step` with the same draws, whatever sits in the absent slots, and NaN futures there."""
    from drive_mbrl.fit import load_forecaster, load_scenes
    from drive_mbrl.forecaster import Forecaster

    trained, meta = load_forecaster(str(tiny_checkpoint), torch.device("cpu"))
    torch.manual_seed(0)  # the other fusion with random weights
    model = trained if trained.config.plan_fusion == fusion else Forecaster(
        replace(trained.config, plan_fusion=fusion)).eval()
    scenes, _ = load_scenes([str(tiny_checkpoint.parent / "data")], model.config, meta["history_dt"])
    settings = PlannerConfig(budget=64, dead_end_speed=20.0)  # categorical CEM: 2 iterations of 32
    i = int(np.flatnonzero(scenes.agent_mask[:, 1:].sum(1) >= 2)[0])
    history, recorded = torch.as_tensor(scenes.history[i]), torch.as_tensor(scenes.agent_mask[i])
    A = recorded.shape[0]
    one_more = recorded.clone()
    one_more[2] = False  # one more slot empty, in the middle
    ego_only = torch.arange(A) == 0  # an empty road: nobody to collide with
    c = model.config
    iterations, population, _ = search_shape(c.num_actions, c.horizon, settings)
    noise = draw_noise(gen(3), iterations, population, c.horizon, c.members, A, settings.samples)
    warm = torch.zeros(c.horizon, dtype=torch.int64)
    with torch.inference_mode():
        for mask in (one_more, ego_only):
            whole = plan_step(model, history, mask, settings, noise, warm)
            junk = history.clone()
            junk[~mask] = torch.randn(int((~mask).sum()), *history.shape[1:]) * 50.0  # absent slots' contents: moot
            for scene in (history, junk):
                decision = plan_scene(model, scene, mask, settings, gen(3))
                assert decision.plan.tolist() == whole["plan"].tolist()
                assert decision.cost == pytest.approx(float(whole["cost"]), rel=1e-5, abs=1e-5)
                assert decision.collision_prob == pytest.approx(float(whole["collision_prob"]), abs=1e-6)
                torch.testing.assert_close(decision.scores["cost"], whole["scores"]["cost"], rtol=1e-5, atol=1e-5)
                for k in ("mean", "log_std", "logits"):
                    torch.testing.assert_close(decision.futures[k][:, mask], whole["future_" + k][:, mask],
                                               rtol=1e-5, atol=1e-4)
                    assert decision.futures[k][:, ~mask].isnan().all()
        assert float(whole["collision_prob"]) == 0.0  # the empty road's


def test_representative_futures_take_the_member_nearest_the_consensus():
    from drive_mbrl.mpc import representative_futures

    # 3 members, 2 slots (slot 1 empty), 2 modes, H=1. Members 0 and 2 expect x = 10, member 1 expects x = 40:
    # the consensus is x = 20, so member 0 (first of the nearest) is kept. Member 0's modes: x 0 and 20, p 1/2 each.
    mean = torch.zeros(3, 2, 2, 1, 2)
    mean[0, :, 1, :, 0], mean[1, :, :, :, 0], mean[2, :, :, :, 0] = 20.0, 40.0, 10.0
    logits = torch.log(torch.full((3, 2, 2), 0.5))
    out = representative_futures({"mean": mean, "log_std": torch.zeros_like(mean), "logits": logits},
                                 np.array([True, False]))
    assert out["future_mean"][0, :, 0, 0].tolist() == [0.0, 20.0]
    assert out["future_prob"][0].tolist() == [0.5, 0.5] and out["future_std"][0, 0, 0, 0] == 1.0
    expected_x = np.array([10.0, 40.0, 10.0])
    assert out["future_disagreement"][0, 0] == pytest.approx(expected_x.std(), rel=1e-3)
    assert np.isnan(out["future_mean"][1]).all() and np.isnan(out["future_prob"][1]).all()


def test_a_retrained_forecaster_in_the_same_folder_is_another_dataset_identity(tiny_checkpoint: Path,
                                                                               tmp_path: Path):
    """agent=mpc's options carry the weights' digest: episodes of the old weights are never resumed or reused
    for the new ones, and an agent built from stale options refuses to plan."""
    import json
    import shutil

    from drive_mbrl.cli import mpc_options
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.errors import ConfigError, DataError
    from drive_mbrl.mpc import MPCAgent
    from drive_mbrl.scenarios import load_scenario

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    settings = PlannerConfig(budget=32, threads=1)
    old = mpc_options(ck, settings)
    collect(RunSpec(load_scenario("highway"), "mpc", 1, 0, max_steps=2, agent_options=old), tmp_path / "d")
    state = torch.load(ck / "best.pt", weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first] = state["model"][first] + 1e-3  # "retrained"
    torch.save(state, ck / "best.pt")
    new = mpc_options(ck, settings)
    assert json.loads(new)["weights"] != json.loads(old)["weights"]
    with pytest.raises(DataError, match="different agent_options"):
        collect(RunSpec(load_scenario("highway"), "mpc", 2, 0, max_steps=2, agent_options=new), tmp_path / "d")
    with pytest.raises(ConfigError, match="changed since this run's options were made"):
        MPCAgent(**json.loads(old))


def test_fault_injection_mid_episode_falls_back_and_the_episode_goes_on(tiny_checkpoint: Path):
    from drive_mbrl.mpc import MPCAgent
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
    from drive_mbrl.scenarios import load_scenario

    calls = {"n": 0}

    def fault(out):  # NaN from the 3rd decision's first batch on, exploding spread from the 5th on
        calls["n"] += 1
        step = agent_steps()
        if step >= 4:
            return {**out, "log_std": out["log_std"] + 20.0}
        if step >= 2:
            return {**out, "mean": out["mean"] * float("nan")}
        return out

    agent = MPCAgent(str(tiny_checkpoint), {"budget": 64, "threads": 1, "chance_epsilon": 1.0}, fault=fault)
    decisions: list[int] = []
    original_act = agent.act

    def agent_steps() -> int:
        return len(decisions)

    def act(obs, env):
        action = original_act(obs, env)
        decisions.append(action)
        return action

    agent.act = act
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "mpc", 0, 5, max_steps=6), agent)
    finally:
        runner.close()
    assert episode.steps == 6 or episode.crashed[-1]
    reasons = list(episode.fallback)
    assert reasons[2:4] == ["model_output_not_finite"] * 2
    assert all(r == "spread_too_wide" for r in reasons[4:])
    slower = 4  # highway-env's DiscreteMetaAction: SLOWER
    assert all(a == slower for a, r in zip(episode.action, reasons, strict=True) if r)


def test_kinematic_ego_matches_highway_env_exactly():
    """egomotion.rollout_ego against the simulator itself: the ego alone on the road follows random plans, and
    egomotion.highway_reward on its path is the reward the env pays at each step."""
    import copy

    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.egomotion import highway_reward, rollout_ego
    from drive_mbrl.mpc import ego_reward_spec, ego_state
    from drive_mbrl.scenarios import action_names, env_timing, load_scenario, make_env, reset_env

    env = make_env(load_scenario("highway"))
    try:
        reset_env(env, 3)
        names, (sim_hz, policy_hz) = action_names(env), env_timing(env)
        rng = np.random.default_rng(0)
        plans = torch.as_tensor(rng.integers(0, len(names), (6, 5)))
        state = ego_state(env)
        predicted = rollout_ego(state, plans, names, sim_hz // policy_hz, 1 / sim_hz)
        spec = ego_reward_spec(env.unwrapped.spec.id, env.unwrapped.config, PlannerConfig(reward="kinematic"),
                               continuous=False)
        rewards = highway_reward(predicted[..., 4], predicted[..., 5], spec, state.lanes)
        paid = np.zeros(rewards.shape)
        for n, plan in enumerate(plans.tolist()):
            twin = copy.deepcopy(env.unwrapped)
            ego = twin.vehicle
            twin.road.vehicles = [ego]
            origin, c, s = ego.position.copy(), math.cos(ego.heading), math.sin(ego.heading)
            for h, action in enumerate(plan):
                paid[n, h] = twin.step(action)[1]
                dx, dy = ego.position - origin
                np.testing.assert_allclose(predicted[n, h, :2].numpy(), [c * dx + s * dy, -s * dx + c * dy],
                                           atol=1e-4)
        np.testing.assert_allclose(rewards.numpy(), paid, atol=1e-5)
        assert paid.std() > 0.02  # the plans differ in speed and lane, so the rewards do
    finally:
        env.close()


def test_kinematic_ego_knows_that_merge_ramp_is_no_lane_to_change_to():
    """On merge-v0's merge segment the on-ramp is a third, forbidden lane beside the two main lanes: LANE_RIGHT from
    the right main lane is a no-op in highway-env, and the planner's ego model must predict exactly that."""
    import copy

    from drive_mbrl.egomotion import rollout_ego
    from drive_mbrl.mpc import ego_state, ego_values
    from drive_mbrl.scenarios import action_names, env_timing, load_scenario, make_env, reset_env

    env = make_env(load_scenario("merge"))
    try:
        reset_env(env, 0)
        base = env.unwrapped
        ego, index = base.vehicle, ("b", "c", 1)
        assert len(base.road.network.all_side_lanes(index)) == 3  # the ramp counts as a side lane of the segment
        lane = base.road.network.get_lane(index)
        ego.position, ego.heading = lane.position(10.0, 0.0), lane.heading_at(10.0)
        ego.lane_index = ego.target_lane_index = index
        ego.lane = lane
        base.road.vehicles = [ego]
        assert ego_values(env)["lanes"] == 2
        names, (sim_hz, policy_hz) = action_names(env), env_timing(env)
        right, idle = names.index("LANE_RIGHT"), names.index("IDLE")
        plans = torch.tensor([[right] * 3, [idle] * 3])
        predicted = rollout_ego(ego_state(env), plans, names, sim_hz // policy_hz, 1 / sim_hz)
        twin = copy.deepcopy(base)
        origin = twin.vehicle.position.copy()
        for action in plans[0].tolist():
            twin.step(action)
        assert twin.vehicle.lane_index[2] == 1  # highway-env kept the ego in its lane
        np.testing.assert_allclose(predicted[0, -1, 1].item(), twin.vehicle.position[1] - origin[1], atol=1e-4)
        np.testing.assert_allclose(predicted[0].numpy(), predicted[1].numpy(), atol=1e-6)
    finally:
        env.close()


def test_route_ego_follows_the_intersection_turn_that_straight_lanes_miss():
    """intersection-v0's ego turns left across the junction. Driven along its route's centre line at the speed
    controller's speeds (`planner.ego_model=route`), the predicted ego stays within a metre of where the simulator
    puts it over 8 s of a left turn, for plans that brake, hold and accelerate; the straight-lane model is more than
    10 m off by then."""
    import copy

    from drive_mbrl.egomotion import rollout_ego, rollout_ego_on_path
    from drive_mbrl.mpc import ROUTE_STEP, ego_state, route_path
    from drive_mbrl.scenarios import action_names, env_timing, load_scenario, make_env, reset_env

    env = make_env(load_scenario("intersection"))
    try:
        names, (sim_hz, policy_hz) = action_names(env), env_timing(env)
        plans = torch.tensor([[names.index("FASTER")] * 8, [names.index("IDLE")] * 8,
                              [names.index("SLOWER")] * 2 + [names.index("FASTER")] * 6])
        for seed in (0, 1):
            reset_env(env, seed)
            base = env.unwrapped
            base.road.vehicles = [base.vehicle]  # alone: nothing to yield to or crash into
            ego = base.vehicle
            pose = np.array([*ego.position, ego.heading])
            path = torch.as_tensor(route_path(env, 120.0, ROUTE_STEP, pose))
            predicted = rollout_ego_on_path(ego_state(env), path, ROUTE_STEP, plans, names, sim_hz // policy_hz,
                                            1 / sim_hz)
            straight = rollout_ego(ego_state(env), plans, names, sim_hz // policy_hz, 1 / sim_hz)
            misses = []
            for n, plan in enumerate(plans.tolist()):
                twin, true = copy.deepcopy(base), []
                for action in plan:
                    twin.step(action)
                    dx, dy = twin.vehicle.position - pose[:2]
                    true.append([np.cos(pose[2]) * dx + np.sin(pose[2]) * dy,
                                 -np.sin(pose[2]) * dx + np.cos(pose[2]) * dy])
                assert abs(np.degrees(twin.vehicle.heading - pose[2])) > 30  # it is turning
                error = np.linalg.norm(predicted[n, :, :2].numpy() - np.array(true), axis=-1)
                assert error.max() < 1.0, (seed, plan, error)
                speed = np.linalg.norm(predicted[n, -1, 2:].numpy())
                assert abs(speed - twin.vehicle.speed) < 0.05
                misses.append(np.linalg.norm(straight[n, -1, :2].numpy() - true[-1]))
            assert max(misses) > 10.0  # the straight-lane ego is far off once the turn is under way
    finally:
        env.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mpc_step_log_matches_the_recorded_episode(tiny_checkpoint: Path, precision: str):
    """The logged plan is the executed action, the ego pose and slot 0 are the recorded ego, candidates are sorted,
    and the kinematic ego prediction, taken back to the world frame with the logged pose, lands where the
    simulator put the ego one step later (exact on a straight highway). Also with the network in bfloat16."""
    from drive_mbrl.mpc import LOG_CANDIDATES, MPCAgent
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
    from drive_mbrl.scenarios import load_scenario

    agent = MPCAgent(str(tiny_checkpoint), {"budget": 64, "threads": 1, "chance_epsilon": 1.0,
                                            "precision": precision})
    assert agent.model.trajectory_head.weight.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "mpc", 0, 7, max_steps=5), agent)
    finally:
        runner.close()
    log, S = episode.step_log, episode.steps
    A, K, H = 4, 2, 3  # the tiny checkpoint's agents, modes, horizon
    assert log["plan"].shape == (S, H) and log["cand_plan"].shape == (S, LOG_CANDIDATES, H)
    assert log["future_mean"].shape == (S, A, K, H, 2) and log["future_prob"].shape == (S, A, K)
    planned = np.flatnonzero(episode.fallback == "")
    assert len(planned[planned < S - 1]) >= 2, f"too few planned steps to check: {list(episode.fallback)}"
    assert log["plan"][planned, 0].tolist() == episode.action[planned].tolist()
    assert np.all(log["track"][:, 0] == 0)
    np.testing.assert_allclose(log["ego_pose"], episode.state[episode.decision_frame][:, 0][:, [0, 1, 4]], atol=1e-4)
    assert np.all(np.diff(log["cand_cost"], axis=1) >= 0) and np.allclose(log["cand_cost"][:, 0], log["cost"])
    assert np.all(log["cand_plan"][:, 0] == log["plan"])
    present = log["track"] >= 0
    np.testing.assert_allclose(log["future_prob"][present].astype(float).sum(-1), 1.0, atol=1e-2)
    for s in planned[planned < S - 1]:
        x, y, heading = log["ego_pose"][s]
        local = log["future_mean"][s, 0, 0, 0]  # the ego's position one step ahead, ego frame
        world = [x + np.cos(heading) * local[0] - np.sin(heading) * local[1],
                 y + np.sin(heading) * local[0] + np.cos(heading) * local[1]]
        np.testing.assert_allclose(world, episode.state[episode.decision_frame[s + 1], 0, :2], atol=1e-2)


def test_lookahead_followers_drive_no_faster_than_the_ego_by_hand():
    """The ego drives 10 m per step; a car 8 m behind it drives 15 m per step (it would run into the ego), a car
    behind at 5 m per step keeps its speed, and a car ahead at 15 m per step keeps its speed."""
    positions = torch.zeros(1, 1, 4, 1, 2, 2)
    positions[0, 0, :, 0, :, 0] = torch.tensor([[10.0, 20.0], [-3.0, 12.0], [-5.0, 0.0], [30.0, 45.0]])
    extended = lookahead(positions, 2)[0, 0, :, 0, 2:, 0]
    assert extended.tolist() == [[30.0, 40.0], [22.0, 32.0], [5.0, 10.0], [60.0, 75.0]]


def test_dead_end_cost_by_hand():
    """Ego at 20 m/s ends 34 m (bumper to bumper) behind a 19 m/s car in its lane: at the lowest holdable speed,
    20 m/s, it hits it t_c = 34 / (20 - 19) = 34 s later, charged 10 x 0.9^(1 + 34). A 21 m/s leader, a slow car
    one lane over, a slow car behind, a masked slow car, or the switch at 0 charge nothing; of two slow leaders
    the nearer counts; a sampled future that already collides keeps only its collision charge."""
    from drive_mbrl.planning import dead_end_costs, sample_costs

    settings = replace(PlannerConfig(), dead_end_speed=20.0, collision_cost=10.0, gamma=0.9, lookahead=0,
                       progress_weight=0.0)
    size = torch.tensor([[5.0, 2.0]] * 3)
    mask = torch.tensor([True, True, True])

    def scene(*others):  # each other agent: (x at the two steps, y)
        positions = torch.zeros(1, 1, 1 + len(others), 1, 2, 2)
        positions[0, 0, 0, 0, :, 0] = torch.tensor([0.0, 20.0])
        for i, (xs, y) in enumerate(others, start=1):
            positions[0, 0, i, 0, :, 0] = torch.tensor(xs)
            positions[0, 0, i, 0, :, 1] = y
        return positions

    slow = ([40.0, 59.0], 0.0)
    cost = dead_end_costs(scene(slow), size[:2], mask[:2], settings)
    assert cost.shape == (1, 1, 1)
    assert float(cost) == pytest.approx(10.0 * 0.9 ** 35)
    nearer = ([30.0, 49.5], 0.0)  # 24 m gap, closing at 0.5 m/s: 48 s
    farther_but_slower = ([60.0, 70.0], 0.0)  # 45 m gap, closing at 10 m/s: 4.5 s -> this one counts
    assert float(dead_end_costs(scene(nearer, farther_but_slower), size, mask, settings)) == pytest.approx(
        10.0 * 0.9 ** 5.5)
    for other in (([40.0, 61.0], 0.0), ([40.0, 59.0], 4.0), ([-40.0, -21.0], 0.0)):
        assert float(dead_end_costs(scene(other), size[:2], mask[:2], settings)) == 0.0
    assert float(dead_end_costs(scene(slow), size[:2], torch.tensor([True, False]), settings)) == 0.0
    off = replace(settings, dead_end_speed=0.0)
    assert float(dead_end_costs(scene(slow), size[:2], mask[:2], off)) == 0.0
    # In sample_costs: added to a future that does not collide, replaced by the collision charge in one that does.
    history_last = torch.zeros(2, 8)
    history_last[:, 6:8] = size[:2]
    history_last[1, 0] = 40.0
    reward = torch.zeros(1, 1, 2)
    costs, crashed, _ = sample_costs(scene(slow), reward, history_last, mask[:2], settings)
    assert not crashed.any() and float(costs) == pytest.approx(10.0 * 0.9 ** 35)
    history_last[1, 0] = 10.0
    crash = scene(([10.0, 21.0], 0.0))  # 1 m ahead at the end: overlapping boxes
    costs, crashed, _ = sample_costs(crash, reward, history_last, mask[:2], settings)
    assert crashed[..., -1].all() and float(costs) == pytest.approx(10.0 * 0.9 ** int(crashed[0, 0, 0].int().argmax()))


class FakeContinuousModel:
    """A continuous-action forecaster stand-in (`action_dim` 2) with a known best plan: reward 1 - 4 |a_h - target|^2
    per step. The other car stays 500 m ahead, unless `cut_in` is set: then every plan whose first acceleration
    exceeds `cut_in` puts it onto the ego (a collision in every member)."""

    def __init__(self, target: list[float], horizon: int = 4, cut_in: float | None = None,
                 always_collide: bool = False):
        self.config = type("C", (), {"num_actions": 5, "action_dim": 2, "horizon": horizon, "members": 2,
                                     "modes": 1, "policy_dt": 1.0})
        self.target = torch.tensor(target)
        self.cut_in, self.always_collide = cut_in, always_collide
        self.uncertainty_quantiles = torch.full((2, len(UNCERTAINTY_LEVELS)), math.inf)

    def encode(self, history, mask):
        return torch.zeros(2, 1, 2, 4)

    def decode(self, tokens, history, mask, plans, positions_only=False):
        B, N, H, D = plans.shape
        mean = torch.zeros(2, B, N, 2, 1, H, 2)
        far = torch.ones(B, N, dtype=torch.bool)
        if self.cut_in is not None:
            far = plans[:, :, 0, 0] <= self.cut_in
        if self.always_collide:
            far = torch.zeros(B, N, dtype=torch.bool)
        mean[:, :, :, 1, :, :, 0] = torch.where(far, 500.0, 0.0)[None, :, :, None, None]
        reward = (1 - 4 * (plans - self.target).square().sum(-1))[None].expand(2, B, N, H)
        return {"mean": mean, "log_std": torch.full_like(mean, -5.0), "logits": torch.zeros(2, B, N, 2, 1),
                "reward": reward}


def _still_scene() -> tuple[torch.Tensor, torch.Tensor]:
    history, mask = torch.zeros(2, 1, 12), torch.ones(2, dtype=torch.bool)
    history[:, :, 6:8] = torch.tensor([5.0, 2.0])
    history[1, :, 0] = 500.0
    return history, mask


@pytest.mark.parametrize("search", ["mppi", "cem"])
def test_continuous_planner_finds_the_known_best_plan(search: str):
    model = FakeContinuousModel([0.6, -0.3])
    settings = PlannerConfig(budget=1024, iterations=8, continuous_search=search, progress_weight=0.0,
                             mppi_temperature=0.05)
    decision = plan_scene(model, *_still_scene(), settings, gen())
    assert decision.plan.shape == (4, 2) and decision.plan.dtype == torch.float32
    assert (decision.plan - torch.tensor([0.6, -0.3])).abs().max() < 0.1
    assert decision.fallback == "" and decision.collision_prob == 0.0
    assert decision.evaluated >= 1024 and decision.candidates.shape == (len(decision.scores["cost"]), 4, 2)


def test_continuous_planner_keeps_a_good_warm_start():
    """One MPPI iteration of 8 samples cannot find the optimum from scratch, but its first sample is the warm
    start (the previous plan shifted), so a warm start at the optimum is kept or improved on."""
    model = FakeContinuousModel([0.6, -0.3])
    settings = PlannerConfig(budget=8, iterations=1, progress_weight=0.0)
    target = torch.tensor([0.6, -0.3]).expand(4, 2)
    cold = plan_scene(model, *_still_scene(), settings, gen())
    warm = plan_scene(model, *_still_scene(), settings, gen(), warm_start=target.clone())
    assert (warm.plan - target).abs().max() < 0.05 < (cold.plan - target).abs().max()


def test_continuous_planner_respects_the_chance_constraint_and_falls_back():
    """Reward pulls the first acceleration to 0.8, but above 0.5 the other car cuts in: the chance constraint
    keeps the chosen plan at or below 0.5. When every plan collides, the planner falls back and names the least
    risky plan."""
    settings = PlannerConfig(budget=1024, iterations=8, progress_weight=0.0, chance_epsilon=0.05,
                             mppi_temperature=0.05)
    decision = plan_scene(FakeContinuousModel([0.8, 0.0], cut_in=0.5), *_still_scene(), settings, gen())
    assert decision.fallback == "" and decision.plan[0, 0] <= 0.5 and decision.plan[0, 0] > 0.3
    unconstrained = plan_scene(FakeContinuousModel([0.8, 0.0], cut_in=0.5), *_still_scene(),
                               replace(settings, chance_epsilon=1.0, collision_cost=0.0), gen())
    assert unconstrained.plan[0, 0] > 0.6
    trapped = plan_scene(FakeContinuousModel([0.8, 0.0], always_collide=True), *_still_scene(), settings, gen())
    assert trapped.fallback == "no_plan_within_collision_limit" and trapped.least_risk.shape == (4, 2)
