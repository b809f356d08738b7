"""Forecaster: batched ensemble vs per-member reference, losses and scores on hand-checkable cases, a
constant-velocity world, save/load, resume and the NaN guard."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from drive_mbrl.errors import DataError
from drive_mbrl.features import (
    HIST_FEATURES,
    PRESENT,
    Scenes,
    SceneSpec,
    episode_scenes,
    pad_history,
    physics_baselines,
    to_ego_frame,
)
from drive_mbrl.fit import BEST, LAST, NonFiniteLoss, TrainSettings, fit, load_forecaster
from drive_mbrl.forecaster import (
    NO_GAP,
    EnsembleLinear,
    Forecaster,
    ForecasterConfig,
    lane_neighbours,
    plan_uncertainty,
    rollout,
)
from drive_mbrl.losses import mixture_log_prob
from drive_mbrl.validation import (
    auroc,
    by_decision,
    fit_spread_shape,
    fit_std_scale,
    hdr_levels,
    temper,
    validate,
)
from tests.conftest import make_episode, straight_state

TINY = ForecasterConfig(agents=3, history_len=2, horizon=3, num_actions=5, members=3, modes=2, width=32, heads=2,
                        blocks=1, policy_dt=1.0, neighbours=True)
CPU = torch.device("cpu")


def cv_scenes(n: int, config: ForecasterConfig = TINY, seed: int = 0) -> Scenes:
    """Scenes of a constant-velocity world: every agent keeps its velocity exactly (ego frame, dt 1 s)."""
    rng = np.random.default_rng(seed)
    A, L, H = config.agents, config.history_len, config.horizon
    pos = rng.uniform(-30, 30, (n, A, 2))
    pos[:, 0] = 0.0
    vel = np.stack([rng.uniform(15, 30, (n, A)), rng.uniform(-0.5, 0.5, (n, A))], -1)
    vel[:, 0, 1] = 0.0
    hist = np.zeros((n, A, L, len(HIST_FEATURES)), np.float32)
    for j in range(L):
        t = (j - (L - 1)) * 0.2
        hist[:, :, j, 0:2] = pos + vel * t
        hist[:, :, j, 2:4] = vel
    hist[..., 4], hist[..., 6], hist[..., 7], hist[..., 9], hist[..., -1] = 1.0, 5.0, 2.0, 1.0, 1.0
    t = np.arange(1, H + 1)[:, None]
    future = np.concatenate([pos[:, :, None] + vel[:, :, None] * t, np.repeat(vel[:, :, None], H, 2)], -1)
    return Scenes(history=hist, agent_mask=np.ones((n, A), bool), actions=rng.integers(0, 5, (n, H)),
                  future=future.astype(np.float32), future_mask=np.ones((n, A, H), bool),
                  reward=np.full((n, H), 0.8, np.float32), crash=np.zeros((n, H), bool),
                  step_valid=np.ones((n, H), bool), lane=np.zeros((n, A, 2), np.float32),
                  episode=np.arange(n) // 10, step=np.arange(n) % 10,
                  track=np.tile(np.arange(A), (n, 1)))


def test_ensemble_linear_is_a_loop_of_linears():
    torch.manual_seed(0)
    layer = EnsembleLinear(4, 6, 3)
    x = torch.randn(4, 5, 7, 6)
    reference = torch.stack([x[e] @ layer.weight[e] + layer.bias[e, 0] for e in range(4)])
    torch.testing.assert_close(layer(x), reference)


def test_batched_ensemble_matches_each_member_run_alone():
    torch.manual_seed(0)
    model = Forecaster(TINY).eval()
    scenes = cv_scenes(4)
    batch = {k: torch.as_tensor(v) for k, v in scenes.__dict__.items()}
    batch["agent_mask"][1, 2] = False
    out = model(batch["history"], batch["agent_mask"], batch["actions"])
    for e in range(TINY.members):
        single = Forecaster(ForecasterConfig(**{**TINY.to_dict(), "members": 1})).eval()
        params = dict(model.named_parameters())
        assert all(p.shape[0] == TINY.members for p in params.values()), "every parameter belongs to one member"
        state = {k: v[e : e + 1] if k in params else v for k, v in model.state_dict().items()}
        single.load_state_dict(state)
        alone = single(batch["history"], batch["agent_mask"], batch["actions"])
        for key in out:
            torch.testing.assert_close(alone[key][0], out[key][e], rtol=1e-5, atol=1e-5)


def test_single_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 4)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[0, 1, 2:] = False
    mean, log_std = torch.randn(2, 3, 1, 4, 4), 0.3 * torch.randn(2, 3, 1, 4, 4)
    got = mixture_log_prob(target, mask, mean, log_std, torch.zeros(2, 3, 1))
    dist = torch.distributions.Normal(mean[:, :, 0], log_std[:, :, 0].exp())
    want = (dist.log_prob(target).sum(-1) * mask).sum(-1)
    torch.testing.assert_close(got, want)


def test_mode_classification_term_by_hand():
    """Two modes 0 m and 4 m ahead of the truth's start; the truth ends 3.5 m ahead: mode 1 wins and the term is
    -log p_1, averaged over the agents that have a future (the second agent has none)."""
    from drive_mbrl.losses import forecaster_loss

    E, B, A, K, H = 1, 1, 2, 2, 1
    mean = torch.zeros(E, B, A, K, H, 4)
    mean[..., 1, :, 0] = 4.0
    future = torch.full((B, A, H, 4), float("nan"))
    future[0, 0] = torch.tensor([3.5, 0.0, 0.0, 0.0])
    mask = ~future[..., 0].isnan()
    p = torch.tensor([0.8, 0.2])
    out = {"mean": mean, "log_std": torch.zeros_like(mean), "logits": p.log().expand(E, B, A, K),
           "reward": torch.zeros(E, B, H), "crash_logit": torch.zeros(E, B, H)}
    step = torch.ones(B, H, dtype=torch.bool)
    terms = forecaster_loss(out, future, mask, torch.zeros(B, H), torch.zeros(B, H, dtype=torch.bool), step)
    with_term = forecaster_loss(out, future, mask, torch.zeros(B, H), torch.zeros(B, H, dtype=torch.bool), step,
                                mode_weight=2.0)
    assert float(terms["mode_ce"]) == pytest.approx(-math.log(0.2))
    assert float(with_term["total"] - terms["total"]) == pytest.approx(2.0 * -math.log(0.2))
    assert float(terms["wta_l2"]) == pytest.approx(0.5 * 0.5**2)  # Huber of the winner's 0.5 m


def test_hdr_coverage_of_a_known_gaussian_is_nominal():
    rng = np.random.default_rng(0)
    n = 4000
    mean, std = np.zeros((n, 1, 2)), np.ones((n, 1, 2))
    truth = rng.standard_normal((n, 2))
    levels = hdr_levels(truth, mean, std, np.zeros((n, 1)), samples=512, rng=rng)
    # For a standard 2-D Gaussian the a-mass HDR is the disc of radius sqrt(-2 ln(1 - a)).
    for a in (0.5, 0.9):
        assert abs((levels < a).mean() - a) < 0.03
    exact = 1 - np.exp(-0.5 * (truth**2).sum(-1))
    assert np.abs(levels - exact).mean() < 0.03


def test_std_scale_undoes_a_twice_too_wide_prediction():
    rng = np.random.default_rng(1)
    n = 3000
    truth = rng.standard_normal((n, 2))
    factor = fit_std_scale(truth, np.zeros((n, 1, 2)), np.full((n, 1, 2), 2.0), np.zeros((n, 1)), samples=256)
    assert factor == pytest.approx(0.5, rel=0.1)


def test_std_power_recovers_a_spread_that_grows_faster_than_predicted():
    """The truth's std is 0.7 x s ** 1.5 where the model said s: the likelihood fit finds the power 1.5, and the
    factor fitted for coverage on s ** 1.5 then finds 0.7."""
    rng = np.random.default_rng(2)
    n = 4000
    s = np.exp(rng.uniform(-1.0, 1.5, n))
    truth = rng.standard_normal((n, 2)) * (0.7 * s**1.5)[:, None]
    std = np.repeat(s[:, None, None], 2, axis=-1)  # (N, 1, 2)
    temperature, (power,) = fit_spread_shape([(truth, np.zeros((n, 1, 2)), std, np.zeros((n, 1)))], members=1)
    assert power == pytest.approx(1.5, abs=0.05)
    assert temperature == 1.0  # one component: its weight is 1 at any temperature (no gradient)
    assert fit_std_scale(truth, np.zeros((n, 1, 2)), std**power, np.zeros((n, 1)), samples=256) == pytest.approx(
        0.7, rel=0.1)


def test_temper_sharpens_each_members_modes_and_keeps_the_members_equal():
    # Two members of two modes: (0.8, 0.2) and (0.5, 0.5), pooled with weight 1/2 each. Squaring (t = 2) gives
    # (0.64, 0.04) / 0.68 and (0.25, 0.25) / 0.5.
    pooled = np.log(np.array([[0.8, 0.2, 0.5, 0.5]]) / 2)
    np.testing.assert_allclose(np.exp(temper(pooled, 2.0, members=2)), [[0.64 / 0.68 / 2, 0.04 / 0.68 / 2, 0.25, 0.25]])
    np.testing.assert_allclose(temper(pooled, 1.0, members=2), pooled)


def test_the_mode_temperature_is_recovered_from_too_flat_mode_probabilities():
    """The truth is drawn from two well-separated modes with probabilities p, 1 - p (p varies per point); the model
    says softmax(log p / 2.5), too flat. The likelihood fit finds the temperature 2.5 and leaves the spread alone."""
    rng = np.random.default_rng(3)
    n = 4000
    p = rng.uniform(0.55, 0.97, n)
    first = rng.random(n) < p
    mean = np.zeros((n, 2, 2))
    mean[:, 1, 0] = 8.0
    truth = np.where(first[:, None], mean[:, 0], mean[:, 1]) + rng.standard_normal((n, 2))
    flat = np.stack([np.log(p), np.log1p(-p)], axis=-1) / 2.5
    log_weight = flat - np.logaddexp.reduce(flat, axis=-1, keepdims=True)
    temperature, (power,) = fit_spread_shape([(truth, mean, np.ones((n, 2, 2)), log_weight)], members=1)
    assert temperature == pytest.approx(2.5, rel=0.1)
    assert power == pytest.approx(1.0, abs=0.05)


def test_the_mode_temperature_is_applied_to_each_members_logits():
    torch.manual_seed(0)
    model = Forecaster(TINY).eval()
    batch = {k: torch.as_tensor(v[:4]) for k, v in cv_scenes(4).__dict__.items()}
    with torch.no_grad():
        raw = model(batch["history"], batch["agent_mask"], batch["actions"])["logits"]  # (E, B, A, K)
        model.mode_temperature.fill_(3.0)
        tempered = model(batch["history"], batch["agent_mask"], batch["actions"])["logits"]
    torch.testing.assert_close(tempered, torch.log_softmax(3.0 * raw, dim=-1))


def test_the_spread_map_is_applied_as_scale_times_std_to_the_power():
    torch.manual_seed(0)
    model = Forecaster(TINY).eval()
    batch = {k: torch.as_tensor(v[:4]) for k, v in cv_scenes(4).__dict__.items()}
    with torch.no_grad():
        raw = model(batch["history"], batch["agent_mask"], batch["actions"])["log_std"]  # (E, B, A, K, H, 4)
        model.std_scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
        model.std_power.copy_(torch.tensor([1.0, 1.2, 0.8]))
        mapped = model(batch["history"], batch["agent_mask"], batch["actions"])["log_std"]
    expected = torch.tensor([0.5, 1.0, 2.0]).log()[:, None] + torch.tensor([1.0, 1.2, 0.8])[:, None] * raw
    torch.testing.assert_close(mapped, expected)


def test_a_checkpoint_from_before_the_power_map_and_mode_temperature_loads_with_both_one():
    torch.manual_seed(0)
    state = Forecaster(TINY).state_dict()
    del state["std_power"], state["mode_temperature"]
    model = Forecaster(TINY)
    model.std_power.fill_(3.0)
    model.mode_temperature.fill_(3.0)
    model.load_state_dict(state)
    assert torch.equal(model.std_power, torch.ones(TINY.horizon))
    assert model.mode_temperature.item() == 1.0


def test_plan_uncertainty_by_hand():
    """Two members, two modes of equal weight, the last step counts. Member 0 expects the ego at x = (0 + 2) / 2 = 1,
    member 1 at (2 + 2) / 2 = 2: std across members 0.5 in x, 0 in y. Spread: member 0 (1 + 3) / 2 = 2, member 1
    1, per axis; mean over members 1.5, summed over x and y 3. Agent 1 is absent: its huge values never count."""
    E, N, A, K, H = 2, 1, 2, 2, 2
    mean = torch.zeros(E, N, A, K, H, 4)
    mean[0, 0, 0, 1, -1, 0] = 2.0
    mean[1, 0, 0, :, -1, 0] = 2.0
    mean[0, 0, 0, :, 0, 0] = 50.0  # not the last step: ignored
    log_std = torch.zeros(E, N, A, K, H, 4)
    log_std[0, 0, 0, 1, -1, :2] = math.log(3.0)
    mean[:, :, 1], log_std[:, :, 1] = 1e3 * torch.randn(E, N, K, H, 4, generator=torch.Generator().manual_seed(0)), 9.0
    out = {"mean": mean, "log_std": log_std, "logits": torch.full((E, N, A, K), math.log(0.5))}
    disagreement, spread = plan_uncertainty(out, torch.tensor([[True, False]]))
    assert disagreement.tolist() == pytest.approx([0.5], abs=1e-6)
    assert spread.tolist() == pytest.approx([3.0], abs=1e-6)
    disagreement, _ = plan_uncertainty(out, torch.tensor([[True, True]]))  # now agent 1 is the largest
    assert disagreement.item() > 10.0


def test_the_split_keeps_episodes_of_one_env_seed_together():
    """Two datasets collected from the same base seed (idm and explore of one pipeline) replay the same traffic
    episode for episode: split by env seed, no seed has scenes on both sides."""
    from drive_mbrl.fit import env_seeds, split_by_episode

    episode = np.array([0, 0, 1, 2, 3, 10**7 + 0, 10**7 + 1, 10**7 + 1, 10**7 + 2, 2 * 10**7 + 5])
    sources = [{"seed": 0}, {"seed": 0}, {"seed": 100}]
    seeds = env_seeds(episode, sources)
    assert seeds.tolist() == [0, 0, 1, 2, 3, 0, 1, 1, 2, 105]
    for seed in range(20):
        train, val = split_by_episode(seeds, 0.4, seed)
        assert not set(seeds[train]) & set(seeds[val])


def test_auroc_by_hand():
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert auroc(np.array([0.1, 0.2]), np.array([1, 1])) is None
    # A tie that is not next to itself in the unsorted order: pairs (0.5+, 0.5-) half, (0.5+, 0.1-) whole.
    assert auroc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == pytest.approx(0.75)


def test_error_by_decision_index_by_hand():
    # Four scenes at decisions 0, 0, 5, 12; two agents, the second one unseen in scene 2.
    err = np.array([[1.0, 3.0], [5.0, 7.0], [2.0, 100.0], [4.0, 6.0]])
    base = {"cv": np.repeat((2 * err)[:, :, None], 3, -1)}
    sel = np.array([[True, True], [True, True], [True, False], [True, True]])
    rows = by_decision(err, base, sel, np.array([0, 0, 5, 12]), h=2)
    assert [r["decisions"] for r in rows] == ["0", "3-9", "10+"], "groups without samples are left out"
    assert [r["samples"] for r in rows] == [4, 1, 2]
    assert [r["ml_l2_mean"] for r in rows] == [4.0, 2.0, 5.0]
    assert [r["baselines"]["cv"] for r in rows] == [8.0, 4.0, 10.0]
    assert "coverage_90" not in rows[0]
    levels = np.array([[0.3, 0.95], [0.6, 0.85], [0.2, np.nan], [0.7, 0.4]])
    rows = by_decision(err, base, sel, np.array([0, 0, 5, 12]), h=2, levels=levels)
    assert [r["coverage_50"] for r in rows] == [0.25, 1.0, 0.5]
    assert [r["coverage_90"] for r in rows] == [0.75, 1.0, 1.0]


def test_physics_baselines_by_hand():
    scenes = cv_scenes(1, ForecasterConfig(**{**TINY.to_dict(), "agents": 1, "horizon": 1}))
    scenes.history[0, 0, -1, :4] = (0.0, 1.0, 10.0, 1.0)
    scenes.lane[0, 0] = (0.5, 0.0)  # 0.5 m right of the lane centre, lane along +x
    pred = {k: v[0, 0, 0] for k, v in physics_baselines(scenes, policy_dt=1.0).items()}
    np.testing.assert_allclose(pred["constant_velocity"], (10.0, 2.0))
    np.testing.assert_allclose(pred["cv_lane_keeping"], (10.0, 1.0))
    np.testing.assert_allclose(pred["highway_env_constant_speed"], (math.sqrt(101.0), 0.5), rtol=1e-6)


@pytest.mark.parametrize("residual, baseline", [("cv", "constant_velocity"), ("lane", "cv_lane_keeping")])
def test_a_zero_residual_predicts_the_physics_baseline(residual: str, baseline: str):
    # With the trajectory head zeroed the model predicts its physics base, which must be the validation's baseline
    # on the same scenes: lanes turned at random angles, vehicles off their lane direction (mid lane change).
    torch.manual_seed(0)
    config = ForecasterConfig(**{**TINY.to_dict(), "residual": residual, "policy_dt": 0.5})
    scenes = cv_scenes(6, config)
    rng = np.random.default_rng(1)
    psi = rng.uniform(-0.6, 0.6, scenes.lane.shape[:2]).astype(np.float32)
    scenes.lane[..., 1] = psi
    cos_lane, sin_lane = HIST_FEATURES.index("cos_lane"), HIST_FEATURES.index("sin_lane")
    scenes.history[..., cos_lane], scenes.history[..., sin_lane] = np.cos(psi)[..., None], np.sin(psi)[..., None]
    scenes.history[:, :, -1, 2:4] = rng.uniform(-5, 30, scenes.history.shape[:2] + (2,))
    model = Forecaster(config).eval()
    with torch.no_grad():
        model.trajectory_head.weight.zero_()
        model.trajectory_head.bias.zero_()
        out = model(torch.from_numpy(scenes.history), torch.from_numpy(scenes.agent_mask),
                    torch.from_numpy(scenes.actions))
    expected = physics_baselines(scenes, policy_dt=0.5)[baseline]  # (B, A, H, 2), the same for every member and mode
    mean = out["mean"][..., :2].numpy()  # (E, B, A, K, H, 2)
    np.testing.assert_allclose(mean, np.broadcast_to(expected[None, :, :, None], mean.shape), rtol=1e-5, atol=1e-4)


def test_episode_scenes_are_in_the_ego_frame():
    # Ego at x = 10 t heading +x; a leader 20 m ahead in the lane to the right (y = 4), 2 m/s slower.
    xs = [[10.0 * t, 20.0 + 8.0 * t] for t in range(4)]
    state = straight_state(xs, speeds=[10.0, 8.0], ys=[0.0, 4.0])
    scenes = episode_scenes(make_episode(state), SceneSpec(agents=3, history_len=2, horizon=2), frames_per_step=1)
    assert scenes.history.shape == (3, 3, 2, len(HIST_FEATURES))
    np.testing.assert_allclose(scenes.history[1, 1, -1, :4], (18.0, 4.0, 8.0, 0.0))  # at step 1: 28 - 10
    # One step later, still in the decision's frame (origin: the ego at x = 10): 36 - 10.
    np.testing.assert_allclose(scenes.future[1, 1, 0], (26.0, 4.0, 8.0, 0.0))
    assert scenes.future_mask[1, 1, 1] and not scenes.future_mask[2, 1, 1], "the episode ends after 3 steps"
    assert scenes.agent_mask[0].tolist() == [True, True, False]
    origin = np.array([5.0, 5.0, 0, 0, np.pi / 2, 5, 2])
    np.testing.assert_allclose(to_ego_frame(np.array([5.0, 7.0, 0, 3.0, np.pi / 2, 5, 2]), origin)[:4],
                               (2.0, 0.0, 3.0, 0.0), atol=1e-12)


def test_absent_history_frames_are_padded_at_constant_speed():
    # A leader seen only from frame 2 on, at 10 m/s: 2 m per 0.2 s frame, lane y = 4. Last decision at frame 3.
    xs = [[10.0 * t, 30.0 + 2.0 * (t - 2)] for t in range(5)]
    state = straight_state(xs, speeds=[50.0, 10.0], ys=[0.0, 4.0])
    present = np.ones((5, 2), bool)
    present[:2, 1] = False
    spec = SceneSpec(agents=2, history_len=4, horizon=1)
    zero = episode_scenes(make_episode(state, present), spec, frames_per_step=1).history[-1, 1]  # decision at 3
    padded = episode_scenes(make_episode(state, present), SceneSpec(**{**spec.__dict__, "pad_dt": 0.2}),
                            frames_per_step=1).history[-1, 1]
    assert not zero[:2].any(), "without padding the absent frames are zeros"
    np.testing.assert_allclose(padded[2:], zero[2:])  # present frames are untouched
    # Ego frame at frame 3 (ego x = 30): the leader at 30 + 2 = 32 -> 2, 0 m; frame 2 -> 0 m; padded 1 -> -2, 0 -> -4.
    np.testing.assert_allclose(padded[:, 0], (-4.0, -2.0, 0.0, 2.0), atol=1e-5)
    np.testing.assert_allclose(padded[:, 1], 4.0)  # lane held
    np.testing.assert_allclose(padded[:2, 2:PRESENT], np.repeat(zero[2:3, 2:PRESENT], 2, 0))  # the rest copied
    assert padded[:, PRESENT].tolist() == [0.0, 0.0, 1.0, 1.0], "padded frames still read as absent"
    # A gap inside the history is filled from the next present frame; an empty slot stays empty.
    hist = np.zeros((2, 3, len(HIST_FEATURES)), np.float32)
    hist[0, [0, 2], PRESENT], hist[0, [0, 2], 0], hist[0, [0, 2], 2] = 1.0, (-1.0, 7.0), (1.0, 3.0)
    out = pad_history(hist, 0.5)
    np.testing.assert_allclose(out[0, :, 0], (-1.0, 5.5, 7.0))
    assert not out[1].any()


def test_absent_frames_enter_the_model_as_zeros_with_mask_absent():
    # Training statistics of highway: length and width constant (std 0), x around 48 +- 52 m.
    mean = torch.tensor([48.0, 0.0, 20.0, 0.0, 1.0, 0.0, 5.0, 2.0, 0.0, 1.0, 0.0, 1.0])
    std = torch.tensor([52.0, 5.0, 1.7, 0.9, 0.007, 0.045, 0.0, 0.0, 0.18, 0.005, 0.03, 0.0])
    history = torch.zeros(1, 1, 2, len(HIST_FEATURES))  # frame 0 absent (zeros), frame 1 a vehicle 100 m ahead
    history[0, 0, 1] = torch.tensor([100.0, 0.0, 22.0, 0.0, 1.0, 0.0, 5.0, 2.0, 0.0, 1.0, 0.0, 1.0])
    models = {}
    for flag in (False, True):
        models[flag] = Forecaster(ForecasterConfig(**{**TINY.to_dict(), "mask_absent": flag}))
        models[flag].set_normalisation(mean, std, torch.ones(4), 0.0)
    new, old = models[True].normalise(history)[0, 0], models[False].normalise(history)[0, 0]
    assert not new[0].any(), "an absent frame is all zeros, its present feature included"
    # The observed frame: (100 - 48) / 52 = 1 for x, (22 - 20) / 1.7 for vx, a constant feature at its mean -> 0.
    torch.testing.assert_close(new[1, :3], torch.tensor([1.0, 0.0, 2.0 / 1.7]))
    assert new[1, 6] == 0.0 and new[1, PRESENT] == 1.0
    assert models[True].hist_std[6] == 1.0, "a feature constant in training is divided by 1"
    padded = history.clone()  # `pad_history` fills the absent frame but leaves it absent: normalised, present 0
    padded[0, 0, 0] = history[0, 0, 1] - torch.tensor([4.4] + [0.0] * (PRESENT - 1) + [1.0])
    torch.testing.assert_close(models[True].normalise(padded)[0, 0, 0, :PRESENT], new[1, :PRESENT] -
                               torch.tensor([4.4 / 52.0] + [0.0] * (PRESENT - 1)))
    assert models[True].normalise(padded)[0, 0, 0, PRESENT] == 0.0
    # Checkpoints fitted before the flag keep their inputs: the absent frame's length reads (0 - 5) / 1e-3.
    torch.testing.assert_close(old[0, 6], torch.tensor(-5000.0))
    torch.testing.assert_close(old[1], new[1] * torch.tensor([1.0] * PRESENT + [0.0]))


def _fit(tmp: Path, epochs: int, scenes: Scenes, on_epoch=None, config: ForecasterConfig = TINY,
         ema: float = 0.0, precision: str = "fp32") -> dict:
    settings = TrainSettings(epochs=epochs, batch_size=32, lr=3e-3, patience=100, seed=0, ema=ema,
                             precision=precision)
    return fit(scenes.subset(np.arange(0, 160)), scenes.subset(np.arange(160, 200)), config, settings, tmp, {}, CPU,
               on_epoch)


class Interrupt(Exception):
    pass


def _interrupt_after(epoch: int):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Interrupt

    return on_epoch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_constant_velocity_world_is_predicted_almost_exactly(tmp_path: Path, precision: str):
    """Also with the forward pass in bfloat16 (`precision=bf16`): the weights it leaves are fp32 and validated so."""
    torch.manual_seed(0)
    scenes = cv_scenes(200)
    _fit(tmp_path, 30, scenes, precision=precision)
    model, _ = load_forecaster(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    figures = validate(model, scenes.subset(np.arange(160, 200)), CPU, policy_dt=1.0, hdr_samples=64)
    last = figures["per_horizon"][-1]
    assert last["baselines"]["constant_velocity"]["l2_mean"] < 1e-5
    assert last["ml_l2_mean"] < 0.3, f"3 s error {last['ml_l2_mean']:.3f} m in a constant-velocity world"


def test_an_unknown_precision_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(DataError, match="precision 'fp16' is not known: choose auto or one of fp32, bf16"):
        _fit(tmp_path / "out", 1, cv_scenes(200), precision="fp16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bfloat16_only_on_native_hardware_and_records_it(tmp_path: Path, monkeypatch,
                                                                                  native: bool):
    """`fit precision=auto` (the CLI's default) resolves on the training device, and the checkpoint records the
    resolved precision, which is what `planner.precision=auto` reads."""
    import drive_mbrl.forecaster as fc

    monkeypatch.setattr(fc, "native_bfloat16", lambda device: native)
    _fit(tmp_path, 1, cv_scenes(200), precision="auto")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["settings"]["precision"] == ("bf16" if native else "fp32")
    assert fc.planning_precision("auto", meta, "cpu") == ("bf16" if native else "fp32")


def test_a_resumed_auto_fit_keeps_the_precision_it_started_in(tmp_path: Path, monkeypatch):
    import drive_mbrl.forecaster as fc

    scenes = cv_scenes(200)
    monkeypatch.setattr(fc, "native_bfloat16", lambda device: False)
    with pytest.raises(Interrupt):
        _fit(tmp_path, 3, scenes, on_epoch=_interrupt_after(1), precision="auto")
    monkeypatch.setattr(fc, "native_bfloat16", lambda device: True)  # resumed where bf16 is native
    _fit(tmp_path, 3, scenes, precision="auto")
    assert json.loads((tmp_path / "meta.json").read_text())["settings"]["precision"] == "fp32"


def test_resume_continues_exactly_where_training_stopped(tmp_path: Path):
    scenes = cv_scenes(200)
    _fit(tmp_path / "straight", 4, scenes)
    with pytest.raises(Interrupt):
        _fit(tmp_path / "resumed", 4, scenes, on_epoch=_interrupt_after(2))
    resumed = _fit(tmp_path / "resumed", 4, scenes)
    assert resumed["epochs"] == 4 and len(resumed["history"]) == 4
    a = torch.load(tmp_path / "straight" / LAST, weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / LAST, weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_resume_with_a_weight_average_continues_exactly(tmp_path: Path):
    scenes = cv_scenes(200)
    _fit(tmp_path / "straight", 4, scenes, ema=1.0)
    with pytest.raises(Interrupt):
        _fit(tmp_path / "resumed", 4, scenes, on_epoch=_interrupt_after(2), ema=1.0)
    _fit(tmp_path / "resumed", 4, scenes, ema=1.0)
    for name in (LAST, BEST):
        a = torch.load(tmp_path / "straight" / name, weights_only=False)
        b = torch.load(tmp_path / "resumed" / name, weights_only=False)
        for part in ("model", "average") if name == LAST else ("model",):
            for key in a[part]:
                torch.testing.assert_close(a[part][key], b[part][key])


def test_the_weight_average_is_an_exponential_average_of_the_steps(tmp_path: Path, monkeypatch):
    """A window of one step (decay 0) keeps the raw weights: the checkpoint equals training without an average.
    A window of 1 epoch = 5 steps (decay 0.8) over one epoch of 5 steps: w_avg = 0.8^4 w_1 + sum_{k=2..5} 0.2 0.8^(5-k)
    w_k (torch's EMA starts from the first step's weights), recomputed here from the weights after each step."""
    from drive_mbrl.fit import ema_decay

    assert ema_decay(1.0, 5) == pytest.approx(0.8) and ema_decay(0.1, 5) == 0.0 and ema_decay(2.0, 50) == 0.99
    scenes = cv_scenes(200)
    _fit(tmp_path / "raw", 3, scenes)
    _fit(tmp_path / "window1", 3, scenes, ema=0.1)  # 0.1 epoch = 0.5 step: decay 0
    for name in (BEST, LAST):
        a = torch.load(tmp_path / "raw" / name, weights_only=False)["model"]
        b = torch.load(tmp_path / "window1" / name, weights_only=False)["model"]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # By hand: record the raw weights after every optimiser step of one epoch (5 batches of 32 of 160 scenes).
    steps = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        steps.append([p.detach().clone() for group in self.param_groups for p in group["params"]])
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _fit(tmp_path / "ema", 1, scenes, ema=1.0)
    monkeypatch.undo()
    assert len(steps) == 5
    expected = [w.clone() for w in steps[0]]
    for later in steps[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, later, strict=True)]
    kept = torch.load(tmp_path / "ema" / LAST, weights_only=False)["average"]
    names = [name for name, _ in Forecaster(TINY).named_parameters()]  # the optimiser's parameter order
    assert len(names) == len(expected)
    for name, want in zip(names, expected, strict=True):
        torch.testing.assert_close(kept[f"module.{name}"], want, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_gives_the_same_predictions(tmp_path: Path):
    scenes = cv_scenes(200)
    _fit(tmp_path, 1, scenes)
    model, meta = load_forecaster(tmp_path)
    again, _ = load_forecaster(tmp_path)
    batch = {k: torch.as_tensor(v[:5]) for k, v in scenes.__dict__.items()}
    a = model(batch["history"], batch["agent_mask"], batch["actions"])
    b = again(batch["history"], batch["agent_mask"], batch["actions"])
    torch.testing.assert_close(a["mean"], b["mean"])
    assert meta["model"]["members"] == TINY.members and len(meta["normalisation"]["hist_mean"]) == len(HIST_FEATURES)


def test_non_finite_batch_stops_training_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    scenes = cv_scenes(200)
    train, val = scenes.subset(np.arange(0, 160)), scenes.subset(np.arange(160, 200))
    snapshot = {}

    def corrupt_after_first_epoch(record):
        snapshot["best"] = (tmp_path / BEST).read_bytes()
        train.future[3, 1, 0, 0] = np.inf

    settings = TrainSettings(epochs=3, batch_size=32, patience=100, seed=0)
    with pytest.raises(NonFiniteLoss, match="epoch 1"):
        fit(train, val, TINY, settings, tmp_path, {}, CPU, corrupt_after_first_epoch)
    assert (tmp_path / BEST).read_bytes() == snapshot["best"]
    assert torch.load(tmp_path / LAST, weights_only=False)["state"]["epoch"] == 1


def test_learning_rate_schedule_by_hand():
    from drive_mbrl.fit import lr_factor

    assert lr_factor(0, 100) == pytest.approx(0.2)  # 5 warm-up steps
    assert lr_factor(4, 100) == pytest.approx(1.0)
    assert lr_factor(5, 100) == pytest.approx(1.0)
    assert lr_factor(100, 100) == pytest.approx(0.05)
    assert lr_factor(int(5 + 95 / 2), 100) == pytest.approx(0.05 + 0.95 * 0.5, abs=0.02)


@pytest.mark.parametrize(("fusion", "neighbours"), [("early", True), ("late", True), ("early", False)])
def test_rollout_of_many_plans_matches_one_call_per_plan(fusion: str, neighbours: bool):
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(**{**TINY.to_dict(), "plan_fusion": fusion, "neighbours": neighbours})).eval()
    scenes = cv_scenes(2)
    history, mask = torch.as_tensor(scenes.history), torch.as_tensor(scenes.agent_mask)
    plans = torch.randint(0, 5, (2, 6, TINY.horizon))
    out = rollout(model, history, mask, plans)
    assert out["mean"].shape == (TINY.members, 2, 6, TINY.agents, TINY.modes, TINY.horizon, 4)
    for s in range(2):
        for n in (0, 5):
            ref = model(history[s : s + 1], mask[s : s + 1], plans[s, n : n + 1])
            for key in ref:
                torch.testing.assert_close(out[key][:, s, n], ref[key][:, 0], rtol=1e-5, atol=1e-5)
    single = rollout(model, history[1], mask[1], plans[1])
    torch.testing.assert_close(single["reward"], out["reward"][:, 1])


def test_lane_neighbours_by_hand():
    """Ego at the origin at 25 m/s; a car 20 m ahead in its lane at 20 m/s, one 10 m behind one lane to the right
    (+4 m) at 30 m/s, one 30 m ahead two lanes to the left (out of reach), and an empty slot."""
    last = torch.zeros(1, 5, len(HIST_FEATURES))
    last[0, :, 6] = 5.0  # length [m]
    for slot, (x, y, vx) in enumerate([(0, 0, 25), (20, 0.3, 20), (-10, 4, 30), (30, -8, 25), (50, 0, 10)]):
        last[0, slot, :3] = torch.tensor([x, y, vx], dtype=torch.float32)
    mask = torch.tensor([[True, True, True, True, False]])
    f = lane_neighbours(last, mask)[0].reshape(5, 3, 2, 3)  # (agent, lane left/own/right, ahead/behind, feature)
    ego = f[0]
    assert ego[1, 0].tolist() == pytest.approx([15 / 50, 5 / 10, 1.0])  # own lane ahead: gap 20 - 5, closing 25 - 20
    assert ego[2, 1].tolist() == pytest.approx([5 / 50, 5 / 10, 1.0])  # right lane behind: gap 10 - 5, closing 30 - 25
    assert ego[0].flatten().tolist() == pytest.approx([NO_GAP, 0.0, 0.0] * 2)  # two lanes left: not a neighbour
    assert ego[1, 1].tolist() == pytest.approx([NO_GAP, 0.0, 0.0])  # the empty slot 50 m ahead is ignored
    leader = f[1]
    assert leader[1, 1].tolist() == pytest.approx([15 / 50, 5 / 10, 1.0])  # the ego behind it, closing at 5 m/s
    assert leader[2, 1].tolist() == pytest.approx([25 / 50, 10 / 10, 1.0])  # y 4 - 0.3 is still the lane right
    assert (f[4] == 0).all()  # an empty slot has no features


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_planner_fast_paths_match_the_full_model(fusion: str):
    """decode(positions_only=True) equals the full decode's position columns; a member subset equals the first
    members of the full ensemble."""
    from drive_mbrl.forecaster import member_subset

    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(**{**TINY.to_dict(), "plan_fusion": fusion})).eval()
    scenes = cv_scenes(1)
    history, mask = torch.as_tensor(scenes.history), torch.as_tensor(scenes.agent_mask)
    plans = torch.randint(0, 5, (1, 7, TINY.horizon))
    with torch.no_grad():
        tokens = model.encode(history, mask)
        full = model.decode(tokens, history, mask, plans)
        fast = model.decode(tokens, history, mask, plans, positions_only=True)
        for key in ("mean", "log_std"):
            torch.testing.assert_close(fast[key], full[key][..., :2])
        for key in ("logits", "reward"):
            torch.testing.assert_close(fast[key], full[key])
        two = member_subset(model, 2)
        sub = two.decode(two.encode(history, mask), history, mask, plans)
    assert two.config.members == 2 and model.config.members == TINY.members
    for key in full:
        torch.testing.assert_close(sub[key], full[key][:2])


@pytest.mark.slow
def test_a_compiled_decode_matches_eager_across_plan_and_agent_counts():
    """planner.compile: the compiled per-plan network gives the eager outputs (fp32, so up to the order of fused
    sums) for several plan counts and cropped scenes, as the planner's dynamic shapes do."""
    from drive_mbrl.forecaster import compiled

    torch.manual_seed(0)
    model = Forecaster(TINY).eval()
    fast = compiled(copy.deepcopy(model))
    scenes = cv_scenes(1)
    history, mask = torch.as_tensor(scenes.history), torch.as_tensor(scenes.agent_mask)
    with torch.no_grad():
        for n, agents in ((7, 3), (12, 3), (5, 2)):
            h, m = history[:, :agents], mask[:, :agents]
            plans = torch.randint(0, 5, (1, n, TINY.horizon))
            tokens = model.encode(h, m)
            want = model.decode(tokens, h, m, plans, positions_only=True)
            got = fast.decode(tokens, h, m, plans, positions_only=True)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_a_copy_of_a_compiled_forecaster_runs_its_own_weights():
    """The compiled decode is bound to its instance: a deep copy (member_subset, low_precision) calls itself, not
    the original (nothing is compiled here: compiling happens at the first call)."""
    from drive_mbrl.forecaster import compiled, member_subset

    model = compiled(Forecaster(TINY))
    twin = copy.deepcopy(model)
    assert model.decode.__self__ is model and twin.decode.__self__ is twin
    assert member_subset(model, 2).decode.__self__.config.members == 2


def test_planner_compile_without_a_cpp_compiler_is_a_config_error(monkeypatch):
    import shutil

    from drive_mbrl.errors import ConfigError
    from drive_mbrl.forecaster import compiled

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        compiled(Forecaster(TINY))


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_a_bfloat16_network_keeps_fp32_statistics_inputs_and_outputs(fusion: str):
    """`low_precision`: parameters in bfloat16 but the input layer's, buffers (normalisation, calibration) and
    outputs in fp32, the original model untouched, and the predicted residuals within bfloat16's rounding of the
    fp32 model's (8 significant bits: 0.4 % per operation, a few per cent through the network)."""
    from drive_mbrl.forecaster import low_precision, physics_base

    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(**{**TINY.to_dict(), "plan_fusion": fusion})).eval()
    model.std_scale.fill_(1.5)
    half = low_precision(model)
    first = {id(p) for p in half.encoder.layers[0].parameters()}
    assert all(p.dtype == (torch.float32 if id(p) in first else torch.bfloat16) for p in half.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for (name, a), (_, b) in zip(model.named_buffers(), half.named_buffers(), strict=True):
        assert b.dtype == a.dtype and torch.equal(a, b), name
    scenes = cv_scenes(2)
    history, mask = torch.as_tensor(scenes.history), torch.as_tensor(scenes.agent_mask)
    plans = torch.randint(0, 5, (2, 7, TINY.horizon))
    with torch.no_grad():
        full = model.decode(model.encode(history, mask), history, mask, plans)
        low = half.decode(half.encode(history, mask), history, mask, plans)
    base = physics_base(history[:, :, -1], TINY.horizon, TINY.policy_dt, TINY.residual)[None, :, None, :, None]
    for key in full:
        assert low[key].dtype == torch.float32 and low[key].shape == full[key].shape, key
    residual = (full["mean"] - base).abs().max()
    assert (low["mean"] - full["mean"]).abs().max() <= 0.05 * residual
    for key in ("log_std", "logits", "reward"):
        assert (low[key] - full[key]).abs().max() <= 0.05 * full[key].abs().max() + 1e-3, key
    assert low_precision(model, "fp32") is model


def test_auto_precision_plans_in_bfloat16_only_a_bf16_trained_forecaster_on_native_hardware(monkeypatch):
    """And imagines in bfloat16 on native hardware whatever the forecaster was trained in."""
    import drive_mbrl.forecaster as fc

    trained_bf16, trained_fp32 = {"settings": {"precision": "bf16"}}, {"settings": {"precision": "fp32"}}
    monkeypatch.setattr(fc, "native_bfloat16", lambda device: True)
    assert fc.native_precision("auto", "cpu") == "bf16" and fc.native_precision("fp32", "cpu") == "fp32"
    assert fc.planning_precision("auto", trained_bf16, "cpu") == "bf16"
    assert fc.planning_precision("auto", trained_fp32, "cpu") == "fp32"
    assert fc.planning_precision("auto", {"settings": {}}, "cpu") == "fp32"  # checkpoints from before `precision`
    assert fc.planning_precision("fp32", trained_bf16, "cpu") == "fp32"
    monkeypatch.setattr(fc, "native_bfloat16", lambda device: False)
    assert fc.planning_precision("auto", trained_bf16, "cpu") == "fp32"
    assert fc.planning_precision("bf16", trained_fp32, "cpu") == "bf16"
    assert fc.native_precision("auto", "cpu") == "fp32" and fc.native_precision("bf16", "cpu") == "bf16"


def test_datasets_of_different_scenarios_are_not_mixed(tmp_path: Path):
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.fit import load_scenes
    from drive_mbrl.scenarios import load_scenario

    for name in ("highway", "merge"):
        collect(RunSpec(load_scenario(name), "slower", 1, 0, max_steps=3), tmp_path / name)
    config = ForecasterConfig(agents=4, history_len=2, horizon=2)
    scenes, summary = load_scenes([str(tmp_path / "highway")], config, history_dt=0.2)
    assert len(scenes) == 3 and summary["sources"][0]["steps"] == 3
    with pytest.raises(DataError, match="one scenario"):
        load_scenes([str(tmp_path / "highway"), str(tmp_path / "merge")], config, history_dt=0.2)
    with pytest.raises(DataError, match="not a multiple"):
        load_scenes([str(tmp_path / "highway")], config, history_dt=0.3)


def test_the_ego_future_is_learned_from_its_actions(tmp_path: Path):
    # Each LANE_LEFT (0) / LANE_RIGHT (2) moves the ego 4 m sideways; nothing in the history tells which comes.
    torch.manual_seed(0)
    scenes = cv_scenes(200)
    scenes.future[:, 0, :, 1] += np.cumsum(np.where(scenes.actions == 0, -4.0, np.where(scenes.actions == 2, 4.0,
                                                                                          0.0)), axis=1)
    _fit(tmp_path, 100, scenes)
    model, _ = load_forecaster(tmp_path)
    figures = validate(model, scenes.subset(np.arange(160, 200)), CPU, policy_dt=1.0, hdr_samples=32)
    conditioning = figures["ego_conditioning"]
    assert conditioning["ego_l2_true_actions"] < 1.0 < 3.0 < conditioning["ego_l2_shuffled_actions"]


CONTINUOUS = ForecasterConfig(**{**TINY.to_dict(), "action_dim": 2})


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_continuous_plans_roll_out_like_one_call_per_plan(fusion: str):
    """A model with `action_dim` 2 takes (S, N, H, 2) float plans: the batched rollout equals one forward call per
    plan, different actions give different futures, and NaN (no action) is read as zeros."""
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(**{**CONTINUOUS.to_dict(), "plan_fusion": fusion})).eval()
    scenes = cv_scenes(2, CONTINUOUS)
    history, mask = torch.as_tensor(scenes.history), torch.as_tensor(scenes.agent_mask)
    plans = torch.rand(2, 6, TINY.horizon, 2) * 2 - 1
    plans[1, 5, -1] = float("nan")
    out = rollout(model, history, mask, plans)
    assert out["mean"].shape == (TINY.members, 2, 6, TINY.agents, TINY.modes, TINY.horizon, 4)
    assert torch.isfinite(out["mean"]).all()
    for s in range(2):
        for n in (0, 5):
            ref = model(history[s : s + 1], mask[s : s + 1], plans[s, n : n + 1])
            for key in ref:
                torch.testing.assert_close(out[key][:, s, n], ref[key][:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["mean"][:, 0, 0], out["mean"][:, 0, 1])
    zeroed = model(history[1:], mask[1:], torch.nan_to_num(plans[1, 5:6], nan=0.0))
    torch.testing.assert_close(zeroed["mean"][:, 0], out["mean"][:, 1, 5])
    with pytest.raises(AssertionError, match="continuous plans"):
        rollout(model, history, mask, torch.randint(0, 5, (2, 6, TINY.horizon)))


def test_the_ego_future_is_learned_from_continuous_actions(tmp_path: Path):
    # The ego moves 3 m sideways per step per unit of its second action (steering-like); nothing in the history
    # tells which actions come.
    torch.manual_seed(0)
    scenes = cv_scenes(200, CONTINUOUS)
    rng = np.random.default_rng(1)
    scenes.actions = rng.uniform(-1.0, 1.0, (200, TINY.horizon, 2)).astype(np.float32)
    scenes.future[:, 0, :, 1] += np.cumsum(3.0 * scenes.actions[..., 1], axis=1)
    _fit(tmp_path, 100, scenes, config=CONTINUOUS)
    model, _ = load_forecaster(tmp_path)
    assert model.config.action_dim == 2
    figures = validate(model, scenes.subset(np.arange(160, 200)), CPU, policy_dt=1.0, hdr_samples=32)
    conditioning = figures["ego_conditioning"]
    # Ignoring the actions costs about 3.5 m (the spread of the ego's sideways moves, ratio ~1 to shuffled); 100
    # epochs on 160 scenes learn most of the map (1.2 m on this seed).
    assert conditioning["ego_l2_shuffled_actions"] > 2.0
    assert conditioning["ego_l2_true_actions"] < 0.5 * conditioning["ego_l2_shuffled_actions"]


def test_resuming_into_a_folder_of_another_model_config_is_refused(tmp_path: Path):
    from drive_mbrl.errors import DataError

    scenes = cv_scenes(200)
    _fit(tmp_path, 1, scenes)
    other = ForecasterConfig(**{**TINY.to_dict(), "width": 16})
    with pytest.raises(DataError, match="another model config"):
        fit(scenes.subset(np.arange(160)), scenes.subset(np.arange(160, 200)), other, TrainSettings(epochs=1),
            tmp_path, {}, CPU)
