"""Sampling-based model-predictive control over ego action sequences, in torch (batched, CPU or GPU).

Three layers, kept apart so each can be tested on its own:

1. **Search** over plans for any `objective(plans) -> costs` callable (lower is better), batched over candidates:
   `enumerate_plans` (exhaustive, for small discrete spaces), `categorical_cem` (discrete sequences beyond the
   budget), `cem` and `mppi` (continuous sequences, warm-startable). They know nothing of driving.
2. **Scoring** of N candidate plans of one scene through the forecaster (`score_plans`): futures are sampled over
   members x modes x Gaussian draws, each sample is checked for collisions with every surrounding vehicle, and its
   cost is the negative discounted predicted reward with a collision penalty; a risk measure (`risk_measure`) turns
   the sampled costs of a plan into one number; a chance constraint rejects plans whose collision probability
   exceeds epsilon; member disagreement is an optional penalty (risk-aversion) or bonus (exploration).
3. **A planning step** on one scene: `plan_scene` (discrete meta-actions: enumeration or categorical CEM inside
   `plan_step`, a tensor function that exports to ONNX) and `plan_continuous` (a forecaster with continuous actions:
   MPPI or CEM, warm-started), both ending in the same fallback checks (`fallback_reason`).

Shapes: N candidate plans, H horizon steps, E members, K modes, A agent slots (0 = ego), M samples per member.
Positions are in the decision's ego frame [m] (x forward, y to the right), as the forecaster predicts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from drive_mbrl.config import RISK_MEASURES, UNCERTAINTY_LEVELS, PlannerConfig
from drive_mbrl.forecaster import LOG_STD_MIN, plan_uncertainty, with_ego


def risk_measure(costs: torch.Tensor, measure: str, alpha: float = 0.1) -> torch.Tensor:
    """Reduce sampled costs (..., M) to (...): `mean` (risk-neutral), `cvar` (mean of the worst ceil(alpha M)
    samples: CVaR_alpha of the cost, so CVaR_1 is the mean) or `worst` (the maximum)."""
    if measure == "mean":
        return costs.mean(-1)
    if measure == "worst":
        return costs.amax(-1)
    if measure == "cvar":
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"CVaR alpha must be in (0, 1], got {alpha}")
        k = max(1, math.ceil(alpha * costs.shape[-1] - 1e-9))
        return costs.topk(k, dim=-1).values.mean(-1)
    raise ValueError(f"risk measure {measure!r} is not known: choose one of {', '.join(RISK_MEASURES)}")


Objective = Callable[[torch.Tensor], torch.Tensor]
"""plans (N, H) int64 or (N, H, D) float -> costs (N,) float; lower is better; +inf marks an infeasible plan."""


@dataclass
class SearchResult:
    plan: torch.Tensor
    """(H,) int64 or (H, D) float: the best plan found."""
    cost: float
    plans: torch.Tensor
    """(P, H[, D]) every plan evaluated in the last iteration (enumeration: all of them)."""
    costs: torch.Tensor
    """(P,) their costs."""
    evaluated: int
    """Plans evaluated in total (all iterations)."""


def enumerate_plans(num_actions: int, horizon: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every sequence of `horizon` actions from `num_actions`: (num_actions ** horizon, H) int64, lexicographic."""
    grids = torch.meshgrid(*[torch.arange(num_actions, device=device)] * horizon, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def exhaustive_search(objective: Objective, num_actions: int, horizon: int,
                      device: torch.device | str = "cpu") -> SearchResult:
    """Evaluate every sequence in one batch; ties go to the lexicographically first plan."""
    plans = enumerate_plans(num_actions, horizon, device)
    costs = objective(plans)
    best = int(torch.argmin(costs))
    return SearchResult(plans[best], float(costs[best]), plans, costs, len(plans))


def unique_plans(plans: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Distinct rows of (P, H) int64 plans, sorted (as base-`num_actions` numbers: much faster than unique rows)."""
    weights = num_actions ** torch.arange(plans.shape[1] - 1, -1, -1, device=plans.device)
    codes = torch.unique((plans * weights).sum(-1))
    return torch.div(codes[:, None], weights, rounding_mode="floor") % num_actions


def categorical_cem(objective: Objective, num_actions: int, horizon: int, population: int, iterations: int,
                    elites: int, generator: torch.Generator, prior: torch.Tensor | None = None,
                    include: torch.Tensor | None = None, smoothing: float = 0.2) -> SearchResult:
    """Cross-entropy method over discrete sequences: a categorical distribution per step (H, num_actions), refit
    to the `elites` best plans of each population (with `smoothing` towards the previous distribution).

    prior: (H, num_actions) initial probabilities (default uniform); include: (P, H) plans evaluated in the first
    population in any case (warm start: the previous plan shifted, constant plans). The best plan seen in any
    iteration is returned.
    """
    device = generator.device
    probs = prior.to(device) if prior is not None else torch.full((horizon, num_actions), 1.0 / num_actions,
                                                                  device=device)
    best_plan, best_cost, evaluated = None, math.inf, 0
    plans = costs = torch.empty(0)
    for it in range(iterations):
        plans = torch.multinomial(probs, population, replacement=True, generator=generator).T  # (P, H)
        if it == 0 and include is not None:
            plans = torch.cat([include.to(device), plans[: max(0, population - len(include))]])
        plans = unique_plans(plans, num_actions)
        costs = objective(plans)
        evaluated += len(plans)
        order = torch.argsort(costs)
        if float(costs[order[0]]) < best_cost or best_plan is None:
            best_plan, best_cost = plans[order[0]], float(costs[order[0]])
        finite = order[torch.isfinite(costs[order])][:elites]
        if len(finite) == 0:
            continue
        counts = torch.zeros(horizon, num_actions, device=device)
        counts.scatter_add_(1, plans[finite].T, torch.ones(horizon, len(finite), device=device))
        probs = smoothing * probs + (1 - smoothing) * counts / len(finite)
    return SearchResult(best_plan, best_cost, plans, costs, evaluated)


def _gaussian_start(horizon: int, low: torch.Tensor, high: torch.Tensor, init_mean: torch.Tensor | None,
                    rel_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial mean (the warm start, or the box centre) and std (relative to the box size) of a (H, D) search."""
    mean = init_mean.clone() if init_mean is not None else ((low + high) / 2).expand(horizon, -1).clone()
    return mean, (rel_std * (high - low)).expand(horizon, -1).clone()


def _perturb(mean: torch.Tensor, std: torch.Tensor, count: int, low: torch.Tensor, high: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    """`count` Gaussian perturbations of mean (H, D) clipped to the box; the first is the mean itself."""
    noise = torch.randn(count, *mean.shape, generator=generator, device=mean.device)
    plans = torch.minimum(torch.maximum(mean + std * noise, low), high)
    plans[0] = mean
    return plans


def cem(objective: Objective, horizon: int, low: torch.Tensor, high: torch.Tensor, population: int,
        iterations: int, elites: int, generator: torch.Generator, init_mean: torch.Tensor | None = None,
        init_std: float = 0.5, min_std: float = 1e-3) -> SearchResult:
    """Cross-entropy method over continuous sequences (H, D) bounded in [low, high] (D,), Gaussian per step.

    init_mean: (H, D) warm start (for example the previous solution shifted by one step); default the box centre.
    init_std is relative to the box size. Returns the best plan seen.
    """
    mean, std = _gaussian_start(horizon, low, high, init_mean, init_std)
    best_plan, best_cost, evaluated = mean.clone(), math.inf, 0
    plans = costs = torch.empty(0)
    for _ in range(iterations):
        plans = _perturb(mean, std, population, low, high, generator)  # the current mean is always a candidate
        costs = objective(plans)
        evaluated += population
        order = torch.argsort(costs)
        if float(costs[order[0]]) < best_cost:
            best_plan, best_cost = plans[order[0]].clone(), float(costs[order[0]])
        finite = order[torch.isfinite(costs[order])][:elites]  # rejected plans (+inf) never become elites
        if len(finite) == 0:
            continue
        elite = plans[finite]
        mean, std = elite.mean(0), elite.std(0, unbiased=False).clamp_min(min_std)
    return SearchResult(best_plan, best_cost, plans, costs, evaluated)


def mppi(objective: Objective, horizon: int, low: torch.Tensor, high: torch.Tensor, samples: int, iterations: int,
         temperature: float, generator: torch.Generator, init_mean: torch.Tensor | None = None,
         noise_std: float = 0.3, min_std: float = 1e-3) -> SearchResult:
    """Model-predictive path integral control (Williams et al. 2017) over continuous sequences (H, D) in
    [low, high]: perturb the mean, weight the samples by exp(-(cost - min) / temperature) and average them; as in
    TD-MPC's MPPI the noise std is then refitted to the weighted spread of the samples, so it narrows as the
    search converges.

    init_mean: (H, D) warm start; noise_std is relative to the box size. Returns the final weighted mean (its cost
    evaluated once more) unless a sample was better.
    """
    mean, std = _gaussian_start(horizon, low, high, init_mean, noise_std)
    best_plan, best_cost, evaluated = mean.clone(), math.inf, 0
    plans = costs = torch.empty(0)
    for _ in range(iterations):
        plans = _perturb(mean, std, samples, low, high, generator)
        costs = objective(plans)
        evaluated += samples
        finite = torch.isfinite(costs)
        if not finite.any():
            continue
        i = int(torch.argmin(costs))
        if float(costs[i]) < best_cost:
            best_plan, best_cost = plans[i].clone(), float(costs[i])
        shifted = torch.where(finite, costs - costs[finite].min(), torch.full_like(costs, math.inf))
        weights = torch.softmax(-shifted / temperature, dim=0)[:, None, None]
        kept = torch.where(finite[:, None, None], plans, 0.0)
        mean = (weights * kept).sum(0)
        std = (weights * (kept - mean) ** 2).sum(0).sqrt().clamp_min(min_std)
    final = objective(mean[None])[0]
    evaluated += 1
    if float(final) <= best_cost:
        best_plan, best_cost = mean, float(final)
    return SearchResult(best_plan, best_cost, plans, costs, evaluated)


# ---------------------------------------------------------------------------------------------------------------
# Scoring plans through the forecaster


Draws = tuple[torch.Tensor, torch.Tensor]
"""The random draws that turn forecasts into sampled futures: uniform [0, 1) (E, N, A, M), picking each sample's
mode, and standard normal (E, N, A, M, 2), its Gaussian draw of x and y (shared over the horizon)."""


def sample_draws(generator: torch.Generator, members: int, plans: int, agents: int, samples: int) -> Draws:
    """Fresh `Draws` for (E, N, A, M) = (members, plans, agents, samples) from `generator`."""
    shape, dev = (members, plans, agents, samples), generator.device
    return torch.rand(shape, generator=generator, device=dev), torch.randn(*shape, 2, generator=generator, device=dev)


def sample_categorical(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from categorical distributions: probs (..., C) (normalised here) and uniform [0, 1)
    (S, ...) give (S, ...) int64 indices in [0, C)."""
    cdf = probs.cumsum(-1) / probs.sum(-1, keepdim=True)
    return (uniform[..., None] >= cdf[..., :-1]).to(torch.int64).sum(-1)


def _positions(values: torch.Tensor) -> torch.Tensor:
    """The x, y columns of (..., T) predictions; the tensor itself when T = 2 (a copy in an ONNX graph otherwise)."""
    return values if values.shape[-1] == 2 else values[..., :2]


def sample_positions(out: dict[str, torch.Tensor], draws: Draws) -> torch.Tensor:
    """Futures, per member, plan, agent and sample: the mode picked by its probability (`draws[0]`) and the
    mode's mean plus its std times the standard-normal draw `draws[1]` (shared over the horizon). Returns
    positions (E, N, A, M, H, 2) [m]."""
    mean, log_std, logits = out["mean"], out["log_std"], out["logits"]
    E, N, A, K, H, T = mean.shape
    probs = logits.exp()
    probs = torch.where(torch.isnan(probs), torch.full_like(probs, 1.0 / K), probs).clamp_min(0) + 1e-12
    mode = sample_categorical(probs[None], draws[0].permute(3, 0, 1, 2)).permute(1, 2, 3, 0)  # (E, N, A, M)
    M = mode.shape[-1]
    rows = (mode + K * torch.arange(E * N * A, device=mode.device).reshape(E, N, A, 1)).reshape(-1)  # of (E N A K)
    # Whole (H, 2) rows of the chosen modes only are copied, and only they are exponentiated.
    m = _positions(mean).reshape(E * N * A * K, H * 2).index_select(0, rows).reshape(E, N, A, M, H, 2)
    s = _positions(log_std).reshape(E * N * A * K, H * 2).index_select(0, rows).reshape(E, N, A, M, H, 2).exp()
    gauss = draws[1][:, :, :, :, None, :].to(mean.dtype).expand(E, N, A, M, H, 2).contiguous()  # no inner bcast
    return torch.addcmul(m, s, gauss)


def agent_hits(positions: torch.Tensor, start: torch.Tensor, size: torch.Tensor, settings: PlannerConfig,
               extra: tuple[torch.Tensor, torch.Tensor] | None = None,
               headings: tuple[torch.Tensor, torch.Tensor] | None = None,
               present: torch.Tensor | None = None, compact: bool | None = None) -> torch.Tensor:
    """Whether the ego (slot 0) and each other agent overlap during each horizon step, per sample.

    positions: (E, N, A, M, H, 2) futures; start: (A, 2) positions at the decision; size: (A, 2) length and width
    [m]. The boxes of a pair are grown by `settings.margin_long` in length and `margin_lat` in width together, and
    by `extra` (x, y), each broadcastable to (E, N, A-1, M, H): the half sizes of an ego-frame-aligned box added
    to the pair (a Minkowski sum: the spread of `mode_collision_prob`). Between horizon steps positions are
    interpolated linearly (`settings.substeps` checks per step). Without `headings` every box is aligned with the
    ego frame (exact for parallel lanes); with headings (cos, sin), each (E, N, A, M, H) (`travel_headings`), each
    box is turned to its heading in that step and the test is the exact separating-axis test of the two rectangles
    (and the extra box). present: (A,) bool, optional: absent agents never hit. Returns (E, N, A-1, M, H) bool.

    compact: check only the pair-steps whose segment can reach the pair's bounding box (`_near_segments`, then
    `_pair_hits` on those): the same arithmetic on fewer elements, so the same result as checking all of them
    (tests compare the two), at a fraction of the elementwise passes. None: compact on the CPU outside ONNX
    tracing (on a GPU the dense passes cost less than the synchronising `nonzero`).
    """
    E, N, A, M, H, _ = positions.shape
    if A == 1:  # the ego alone (a scene cropped to its present agents): nobody to hit
        return torch.zeros(E, N, 0, M, H, dtype=torch.bool, device=positions.device)
    margin = torch.tensor([settings.margin_long, settings.margin_lat], device=size.device, dtype=size.dtype)
    half = (size + margin) / 2  # (A, 2) half length and half width, each box taking half of each margin
    rel, prev = [], []
    for c in range(2):  # x and y as contiguous (E, N, A-1, M, H) tensors: fast elementwise kernels
        rel.append(positions[:, :, 1:, :, :, c] - positions[:, :, :1, :, :, c])
        prev.append(torch.cat([(start[1:, c] - start[0, c])[None, None, :, None, None].expand(E, N, A - 1, M, 1),
                               rel[c][..., :-1]], dim=-1))
    ex, ey = extra if extra is not None else (positions.new_zeros(()), positions.new_zeros(()))
    lo, wo = (half[1:, i][:, None, None] for i in range(2))  # (A-1, 1, 1) the other agents' half sizes
    turned = () if headings is None else (*(h[:, :, :1] for h in headings), *(h[:, :, 1:] for h in headings))
    pair = [prev[0], prev[1], rel[0], rel[1], lo, wo, ex, ey, *turned]  # each broadcastable to (E, N, A-1, M, H)
    ego = (half[0, 0], half[0, 1])
    if compact is None:
        compact = positions.device.type == "cpu" and not torch.jit.is_tracing()
    if not compact:
        hit = _pair_hits(*pair, ego=ego, substeps=settings.substeps)
        return hit if present is None else hit & present[1:, None, None]
    shape = rel[0].shape
    near = _near_segments(prev, rel, lo, wo, ex, ey, ego, headings is not None)
    if present is not None:
        near = near & present[1:, None, None]
    index = near.reshape(-1).nonzero().squeeze(1)
    coords = torch.unravel_index(index, shape)
    picked = [_gather(t, coords) for t in pair]
    hit = torch.zeros(shape.numel(), dtype=torch.bool, device=positions.device)
    hit[index] = _pair_hits(*picked, ego=ego, substeps=settings.substeps)
    return hit.reshape(shape)


SLACK = 1e-3
"""[m] added to `_near_segments`' bounds, so that rounding in the interpolation never drops a hit."""


def _near_segments(prev: list[torch.Tensor], rel: list[torch.Tensor], lo: torch.Tensor, wo: torch.Tensor,
                   ex: torch.Tensor, ey: torch.Tensor, ego: tuple[torch.Tensor, torch.Tensor],
                   turned: bool) -> torch.Tensor:
    """Pair-steps (E, N, A-1, M, H) bool whose relative segment (prev -> rel, x and y) comes within the pair's
    bounding extent on both frame axes: the half sizes summed, or with turned boxes each box's half diagonal (its
    largest extent in any direction), plus `extra`. A superset of `_pair_hits` (whose first two checks are these
    axes with radii no larger)."""
    le, we = ego
    if turned:
        reach = torch.hypot(le, we) + torch.hypot(lo, wo)
        bounds = (reach + ex + SLACK, reach + ey + SLACK)
    else:
        bounds = (le + lo + ex + SLACK, we + wo + ey + SLACK)
    near = None
    for c in range(2):
        inside = (torch.minimum(prev[c], rel[c]) < bounds[c]) & (torch.maximum(prev[c], rel[c]) > -bounds[c])
        near = inside if near is None else near & inside
    return near


def _gather(t: torch.Tensor, coords: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The elements of `t` (broadcastable to the shape `coords` index) at coords (D tensors of (n,)): (n,) or a
    0-d tensor when t has one element."""
    if t.numel() == 1:
        return t.reshape(())
    t = t.reshape((1,) * (len(coords) - t.dim()) + tuple(t.shape))
    return t[tuple(c if size > 1 else 0 for c, size in zip(coords, t.shape, strict=True))]


def _pair_hits(prev_x: torch.Tensor, prev_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lo: torch.Tensor,
               wo: torch.Tensor, ex: torch.Tensor, ey: torch.Tensor, *headings: torch.Tensor,
               ego: tuple[torch.Tensor, torch.Tensor], substeps: int) -> torch.Tensor:
    """`agent_hits`' test, elementwise over broadcastable tensors: the other agent's position relative to the
    ego at the step's start (prev_x, prev_y) and end (x, y), its half length and width (lo, wo), the extra box (ex,
    ey), optionally headings (c0, s0, c1, s1: the ego's and the other's cos and sin), and the ego's half sizes.
    True where the boxes overlap at any of `substeps` points of the segment (its end included, its start not)."""
    le, we = ego
    # Separating axes (None: the frame's x or y) and the pair's projected half extents on them.
    axes: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]
    radii = [le + lo + ex, we + wo + ey]
    if headings:
        c0, s0, c1, s1 = headings
        cos_d, sin_d = (c0 * c1 + s0 * s1).abs(), (c0 * s1 - s0 * c1).abs()  # of the angle between the two
        a0c, a0s, a1c, a1s = c0.abs(), s0.abs(), c1.abs(), s1.abs()
        axes += [(c0, s0), (-s0, c0), (c1, s1), (-s1, c1)]  # the ego's length, width; the other's length, width
        radii = [le * a0c + we * a0s + lo * a1c + wo * a1s + ex,
                 le * a0s + we * a0c + lo * a1s + wo * a1c + ey,
                 le + lo * cos_d + wo * sin_d + ex * a0c + ey * a0s,
                 we + lo * sin_d + wo * cos_d + ex * a0s + ey * a0c,
                 lo + le * cos_d + we * sin_d + ex * a1c + ey * a1s,
                 wo + le * sin_d + we * cos_d + ex * a1s + ey * a1c]
    hit = None
    for k in range(1, substeps + 1):
        w = k / substeps
        px, py = (prev_x + w * (x - prev_x), prev_y + w * (y - prev_y)) if k < substeps else (x, y)
        now = None
        for i, (axis, r) in enumerate(zip(axes, radii, strict=True)):
            along = (px, py)[i] if axis is None else px * axis[0] + py * axis[1]
            inside = along.abs() < r
            now = inside if now is None else now & inside
        hit = now if hit is None else hit | now
    return hit


MOVING = 0.5
"""[m] per plan step: a vehicle that moves less keeps its heading at the decision for `travel_headings`."""


def travel_headings(positions: torch.Tensor, start: torch.Tensor, heading: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each agent's heading in each step of its future, for `agent_hits`' turned boxes: the direction of its
    displacement over the step (the direction of the segment the checks interpolate along), or its heading at the
    decision while it moves less than `MOVING`.

    positions: (E, N, A, M, H, 2) [m]; start: (A, 2) positions at the decision; heading: (A, 2) cos, sin of each
    heading at the decision (ego frame). Returns cos, sin (E, N, A, M, H)."""
    E, N, A, M, H, _ = positions.shape
    before = torch.cat([start[None, None, :, None, None, :].expand(E, N, A, M, 1, 2), positions[..., :-1, :]], -2)
    step = positions - before
    norm = step.norm(dim=-1)
    moving = norm > MOVING
    cos, sin = (torch.where(moving, step[..., i] / norm.clamp_min(1e-9), heading[:, i][None, None, :, None, None])
                for i in range(2))
    return cos, sin


def ever(hit: torch.Tensor) -> torch.Tensor:
    """Whether `hit` (..., H) bool has been true at or before each step (a cumulative OR along the last axis)."""
    return hit.to(torch.int32).cumsum(-1) > 0


def collisions(positions: torch.Tensor, start: torch.Tensor, size: torch.Tensor, agent_mask: torch.Tensor,
               settings: PlannerConfig, heading: torch.Tensor | None = None) -> torch.Tensor:
    """Whether the ego collides with any present agent by the end of each horizon step, per sample (see
    `agent_hits`; with `settings.oriented_boxes` and heading (A, 2), boxes turned to the direction of travel:
    `travel_headings`). Returns (E, N, M, H) bool, monotone in H."""
    turned = travel_headings(positions, start, heading) if settings.oriented_boxes and heading is not None \
        else None
    hit = agent_hits(positions, start, size, settings, headings=turned, present=agent_mask).any(2)
    return ever(hit)


def mode_collision_prob(out: dict[str, torch.Tensor], start: torch.Tensor, size: torch.Tensor,
                        agent_mask: torch.Tensor, settings: PlannerConfig,
                        heading: torch.Tensor | None = None) -> torch.Tensor:
    """Probability that the ego collides by the end of each step, exact over every agent's modes (no sampling, so
    a rare mode such as a neighbour's lane change is never missed), per member.

    Each other agent's mode k is checked against the ego's most likely mode with the boxes grown by
    `settings.mode_sigma` standard deviations of their relative position; agents are taken as independent:
    P(h) = 1 - prod_a (1 - sum_k p_ak hit_ak(<= h)). out: decode outputs without the scene axis (mean, log_std
    (E, N, A, K, H, >=2), logits (E, N, A, K)). Returns (E, N, H).
    """
    mean, std, logits = _positions(out["mean"]), _positions(out["log_std"]).exp(), out["logits"]
    E, N, A, K, H, _ = mean.shape
    ego_mode = logits[:, :, 0].argmax(-1)[:, :, None, None, None, None].expand(E, N, 1, 1, H, 2)
    ego, ego_std = mean[:, :, :1].gather(3, ego_mode), std[:, :, :1].gather(3, ego_mode)  # (E, N, 1, 1, H, 2)
    positions = torch.cat([ego.expand(E, N, 1, K, H, 2), mean[:, :, 1:]], dim=2)  # modes as "samples"
    spread = settings.mode_sigma * (std[:, :, 1:] ** 2 + ego_std ** 2).sqrt()  # (E, N, A-1, K, H, 2)
    turned = travel_headings(positions, start, heading) if settings.oriented_boxes and heading is not None \
        else None
    hit = agent_hits(positions, start, size, settings, (spread[..., 0], spread[..., 1]), turned, agent_mask)
    hit = ever(hit)  # (E, N, A-1, K, H)
    # Absent slots' mode weights are dropped, not multiplied by a False hit: NaN x 0 is NaN.
    weight = torch.where(agent_mask[1:, None], logits[:, :, 1:].exp(), 0.0)  # (E, N, A-1, K)
    p_agent = (weight[..., None] * hit).sum(3).clamp(0, 1)  # (E, N, A-1, H)
    return 1 - (1 - p_agent).prod(2)


def lookahead(positions: torch.Tensor, steps: int) -> torch.Tensor:
    """Sampled futures (E, N, A, M, H, 2) [m] extended by `steps` horizon steps beyond the horizon: every
    agent (the ego too) keeps the forward speed of its last predicted step and its lateral position (the
    lane-keeping baseline), except that a vehicle behind the ego at the horizon's end (smaller x) drives no faster
    than the ego: followers brake rather than run into it, so only what the ego closes in on is charged. Returns
    (E, N, A, M, H + steps, 2); the input itself when steps = 0 or H < 2."""
    H = positions.shape[-2]
    if steps <= 0 or H < 2:
        return positions
    last = positions[..., -1:, :]  # (E, N, A, M, 1, 2)
    speed = last[..., :1] - positions[..., -2:-1, :1]  # (E, N, A, M, 1, 1) [m per step]
    behind = last[..., :1] < last[:, :, :1, ..., :1]
    speed = torch.where(behind, torch.minimum(speed, speed[:, :, :1]), speed)
    k = torch.arange(1, steps + 1, device=positions.device, dtype=positions.dtype)[:, None]  # (steps, 1)
    ahead = torch.cat([last[..., :1] + speed * k, last[..., 1:].expand(*last.shape[:-2], steps, 1)], dim=-1)
    return torch.cat([positions, ahead], dim=-2)


LANE_HALF_WIDTH = 2.0
"""[m] two vehicles whose lateral positions differ by less than this share a lane (highway-env lanes are 4 m)."""


def dead_end_costs(positions: torch.Tensor, size: torch.Tensor, agent_mask: torch.Tensor, settings: PlannerConfig,
                   policy_dt: float = 1.0) -> torch.Tensor:
    """The dead-end charge of every sampled future: at the horizon's end, the ego (slot 0) behind a same-lane car
    (|dy| < LANE_HALF_WIDTH, ahead in x) that drives slower than `settings.dead_end_speed` will hit it even at that
    lowest speed after t_c = gap / (dead_end_speed - v_leader) seconds (gap: bumper to bumper, >= 0), so the
    future is charged collision_cost x gamma^(H - 1 + t_c / policy_dt), the soonest such collision counting.

    positions: (E, N, A, M, H, 2) [m] sampled futures in the ego frame (H >= 2; speeds from the last two steps);
    size: (A, 2) length and width [m]; agent_mask: (A,) bool. Returns (E, N, M); zeros where no leader is slower
    or `dead_end_speed` is 0."""
    E, N, A, M, H, _ = positions.shape
    if settings.dead_end_speed <= 0 or H < 2 or A < 2:
        return positions.new_zeros(E, N, M)
    last = positions[..., -1, :]  # (E, N, A, M, 2)
    speed = (positions[:, :, 1:, :, -1, 0] - positions[:, :, 1:, :, -2, 0]) / policy_dt  # (E, N, A-1, M) [m/s]
    dx = last[:, :, 1:, :, 0] - last[:, :, :1, :, 0]
    dy = last[:, :, 1:, :, 1] - last[:, :, :1, :, 1]
    gap = (dx - (size[1:, 0] + size[0, 0])[:, None] / 2).clamp_min(0.0)
    closing = settings.dead_end_speed - speed
    leader = (dx > 0) & (dy.abs() < LANE_HALF_WIDTH) & (closing > 0) & agent_mask[1:, None]
    steps = (H - 1) + gap / closing.clamp_min(1e-6) / policy_dt
    charge = settings.collision_cost * settings.gamma ** steps
    return torch.where(leader, charge, torch.zeros_like(charge)).amax(2)


def offroad_costs(path: torch.Tensor, road: tuple[float, float, float, float], settings: PlannerConfig
                  ) -> torch.Tensor:
    """The off-road charge of each plan for an ego that can leave the road (continuous steering): leaving it ends
    the reward (highway-env pays nothing off the road), so it is charged like a collision, collision_cost x
    gamma^h at the first step h whose end finds the ego's centre outside the road (straight road model).

    path: (P, H, >=2) the ego's positions [m] in the decision's ego frame; road: the ego's offset from its lane
    centre [m] (+ right), its heading relative to the lane [rad], and the road's left and right edges relative to
    that lane centre [m] (`mpc.road_frame`). Returns (P,)."""
    lateral, heading, left, right = road
    across = lateral + path[..., 0] * math.sin(heading) + path[..., 1] * math.cos(heading)  # (P, H) lane frame
    off = (across < left) | (across > right)
    first = off.to(torch.int64).argmax(-1).to(path.dtype)
    return torch.where(off.any(-1), settings.collision_cost * settings.gamma ** first, torch.zeros_like(first))


def sample_costs(positions: torch.Tensor, reward: torch.Tensor, history_last: torch.Tensor,
                 agent_mask: torch.Tensor, settings: PlannerConfig, plans: torch.Tensor | None = None,
                 policy_dt: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cost of every sampled future (see `score_plans`).

    positions: (E, N, A, M, H, 2) sampled futures; reward: (E, N, H) each member's predicted rewards; policy_dt:
    [s] between plan steps (the forecaster's). Returns costs
    (N, E x M) (member-major), crashed (E, N, M, H) and discounted returns (E, N, M).
    """
    E, N, A, M, H, _ = positions.shape
    checked = lookahead(positions, settings.lookahead)  # (E, N, A, M, H + lookahead, 2)
    crashed_all = collisions(checked, history_last[:, :2], history_last[:, 6:8], agent_mask, settings,
                             history_last[:, 4:6])
    crashed = crashed_all[..., :H]  # (E, N, M, H)
    alive = torch.cat([torch.ones_like(crashed[..., :1]), ~crashed[..., :-1]], dim=-1).to(positions.dtype)
    discount = settings.gamma ** torch.arange(H, device=positions.device, dtype=positions.dtype)
    returns = (discount * alive * reward[:, :, None, :]).sum(-1)  # (E, N, M)
    hit = crashed_all.any(-1)
    first_crash = torch.where(hit, crashed_all.to(returns.dtype).argmax(-1),
                              torch.full_like(hit, crashed_all.shape[-1], dtype=torch.int64))
    penalty = torch.where(hit, settings.collision_cost * settings.gamma ** first_crash.to(returns.dtype),
                          dead_end_costs(positions, history_last[:, 6:8], agent_mask, settings, policy_dt))
    costs = penalty - returns
    if settings.progress_weight:
        speed = positions[:, :, 0, :, -1, 0] / (H * policy_dt)  # (E, N, M) ego's mean forward speed
        costs = costs - settings.progress_weight * speed
    costs = costs.permute(1, 0, 2).reshape(N, E * M)
    if settings.comfort_weight and plans is not None:
        if plans.is_floating_point():  # continuous (N, H, D): squared change of the actions (in [-1, 1] units)
            changes = (plans[:, 1:] - plans[:, :-1]).square().sum((1, 2))[:, None]
        else:
            changes = (plans[:, 1:] != plans[:, :-1]).sum(-1, keepdim=True)
        costs = costs + settings.comfort_weight * changes.to(costs.dtype)
    return costs, crashed, returns


def score_plans(out: dict[str, torch.Tensor], history_last: torch.Tensor, agent_mask: torch.Tensor,
                settings: PlannerConfig, draws: torch.Generator | Draws, plans: torch.Tensor | None = None,
                policy_dt: float = 1.0) -> dict[str, torch.Tensor]:
    """Costs of N plans of one scene from the forecaster's predictions under them.

    out: `Forecaster.decode` outputs with the scene axis removed (mean (E, N, A, K, H, 4), reward (E, N, H), ...);
    history_last: (A, F) the agents' features at the decision (x, y, ..., length, width as in HIST_FEATURES);
    agent_mask: (A,) bool. Each of the E x M samples of a plan gets the cost
        -sum_h gamma^h r_h alive_h + collision_cost * gamma^{h_c} * crashed
    with r the member's predicted reward and alive_h "no collision before step h" (collisions are also looked for
    `settings.lookahead` steps beyond the horizon: `lookahead`; a future without a collision pays the dead-end
    charge instead when `settings.dead_end_speed` > 0: `dead_end_costs`), minus `progress_weight` x the
    sample's mean forward speed over the horizon [m/s] (the ego's predicted x at the last step / horizon time),
    plus `comfort_weight` x the number of action changes in the plan (meta-actions, `plans` (N, H)) or the squared
    change of its actions summed over steps and dimensions (continuous, `plans` (N, H, D)). `draws`: the
    sampling's random draws (`Draws`, M = settings.samples), or a generator to draw them from. Returns (N,) tensors:
    cost (risk + epistemic term, +inf where the chance constraint fails or the model's output is not finite), risk
    (the risk measure of the sampled costs, before the epistemic term and the constraint), collision_prob
    (`mode_collision_prob` within the first `chance_steps` steps, mean over members),
    sampled_collision_prob (share of samples colliding within those steps), disagreement
    and spread [m] (`forecaster.plan_uncertainty`), expected_return (mean
    over samples of the discounted reward), finite (the model's outputs for the plan are all finite for the ego and
    the agents in agent_mask).
    """
    E, N, A, K, H, _ = out["mean"].shape
    if isinstance(draws, torch.Generator):
        draws = sample_draws(draws, E, N, A, settings.samples)
    positions = sample_positions(out, draws)
    costs, crashed, returns = sample_costs(positions, out["reward"], history_last, agent_mask, settings, plans,
                                           policy_dt)
    steps = min(settings.chance_steps or H, H)
    sampled_prob = crashed[..., steps - 1].to(returns.dtype).mean((0, 2))
    # Only the first `steps` steps are needed: a step's hits depend on it and the step before (exact).
    first = {"mean": out["mean"][..., :steps, :].contiguous(), "log_std": out["log_std"][..., :steps, :].contiguous(),
             "logits": out["logits"]}  # contiguous: elementwise kernels on these strided slices are several x slower
    collision_prob = mode_collision_prob(first, history_last[:, :2], history_last[:, 6:8], agent_mask,
                                         settings, history_last[:, 4:6])[..., steps - 1].mean(0)
    disagreement, spread = plan_uncertainty(out, agent_mask)
    risk = risk_measure(costs, settings.risk, settings.alpha)
    cost = risk + (settings.epistemic_weight - settings.explore_weight) * disagreement
    # NaN / inf anywhere in a plan's predicted means, spreads, mode weights or rewards of the ego and the present
    # agents propagates into these sums (what an absent slot holds is never used, so it does not count).
    # Summed per plan and agent first (contiguous reductions), then the absent slots dropped from the small sums.
    per_agent = sum(out[k].sum([d for d in range(out[k].dim()) if d not in (1, 2)])
                    for k in ("mean", "log_std", "logits"))  # (N, A)
    totals = torch.where(with_ego(agent_mask), per_agent, 0.0).sum(-1) + out["reward"].sum((0, 2))
    finite = torch.isfinite(totals)
    feasible = finite & (collision_prob <= settings.chance_epsilon) & torch.isfinite(cost)
    return {"cost": torch.where(feasible, cost, torch.full_like(cost, math.inf)), "risk": risk,
            "collision_prob": collision_prob,
            "sampled_collision_prob": sampled_prob, "disagreement": disagreement, "spread": spread,
            "expected_return": returns.mean((0, 2)),
            "finite": finite}


# ---------------------------------------------------------------------------------------------------------------
# One planning step on a scene


@dataclass
class Decision:
    """What the planner decided for one scene."""

    plan: torch.Tensor
    """(H,) int64 the chosen action sequence (its first action is executed); (H, D) float for continuous actions."""
    fallback: str
    """'' when the plan is used; otherwise why control goes to the fallback: `model_output_not_finite`,
    `no_plan_within_collision_limit`, `members_disagree`, `spread_too_wide`."""
    cost: float
    collision_prob: float
    disagreement: float
    """[m] of the chosen plan (`forecaster.plan_uncertainty`)."""
    spread: float
    expected_return: float
    evaluated: int
    """Candidate plans scored (all iterations)."""
    least_risk: torch.Tensor | None = None
    """(H,) (or (H, D)) when no plan passed the chance constraint: the plan with the lowest collision probability
    (ties: the higher expected return), for `planner.fallback=least_risk`."""
    action_costs: torch.Tensor | None = None
    """(num_actions,) the lowest risk cost among the evaluated plans that start with each action (inf where none
    was evaluated or every one broke the chance constraint): the planner's view of each immediate action, used as
    soft targets when distilling it into the policy."""
    candidates: torch.Tensor | None = None
    """(P, H) (or (P, H, D)) every plan scored (all iterations; a plan may repeat across CEM iterations), for step
    logs."""
    scores: dict[str, torch.Tensor] | None = None
    """name -> (P,) `score_plans`' figures of `candidates` (cost, risk, collision_prob, ...)."""
    futures: dict[str, torch.Tensor] | None = None
    """The forecaster's outputs under the chosen plan, as scored (ego slot replaced by `ego_path` when given):
    mean, log_std (E, A, K, H, 2) [m] positions in the decision's ego frame, logits (E, A, K). For meta-actions
    `plan_scene` plans with the present agents only (and the ego's slot 0), so the other slots hold NaN."""


Fault = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""Optional hook applied to the forecaster's outputs before scoring (fault injection in tests)."""
EgoPath = Callable[[torch.Tensor], torch.Tensor]
"""plans (P, H) -> (P, H, >=2) the ego's own positions under each plan (`egomotion.rollout_ego`)."""
EgoReward = Callable[[torch.Tensor], torch.Tensor]
"""an `EgoPath`'s path (P, H, C) -> (P, H) the reward of each step without a collision (`egomotion.highway_reward`),
replacing the forecaster's learned reward in every member."""
PlanCost = Callable[[torch.Tensor], torch.Tensor]
"""plans (P, H[, D]) -> (P,) an extra cost per plan, known without the forecaster (`offroad_costs`)."""
FALLBACK_REASONS = ("", "model_output_not_finite", "spread_too_wide", "members_disagree",
                    "no_plan_within_collision_limit")
"""`plan_step`'s reason codes (index) and names; '' (0): the plan is used."""
CEM_SMOOTHING = 0.2
"""Share of the previous categorical distribution kept at each CEM refit."""


@dataclass
class StepNoise:
    """Every random draw of one planning step, passed in so that `plan_step` is deterministic (and exports to
    ONNX with the noise as an input). I iterations, P candidate rows per iteration (`search_shape`)."""

    candidates: torch.Tensor
    """(I, P, H) uniform [0, 1): categorical CEM's draw of each candidate plan (unused by exhaustive search)."""
    modes: torch.Tensor
    """(I, P, E, A, M) uniform [0, 1): the mode each sampled future follows; row p serves the p-th distinct plan."""
    gauss: torch.Tensor
    """(I, P, E, A, M, 2) standard normal: each sampled future's Gaussian draw of x and y."""


def search_shape(num_actions: int, horizon: int, settings: PlannerConfig) -> tuple[int, int, bool]:
    """(iterations I, candidate rows P per iteration, exhaustive): every sequence in one batch when
    num_actions ** H fits the budget, else categorical CEM with the budget split over its iterations (at least
    num_actions + 2 rows each, the first population's forced candidates, so a tiny budget can be exceeded)."""
    if num_actions ** horizon <= settings.budget:
        return 1, num_actions ** horizon, True
    # At least the first population's forced candidates: the warm start, the constant plans, a policy's plan.
    return settings.iterations, max(num_actions + 2, settings.budget // settings.iterations), False


def draw_noise(generator: torch.Generator, iterations: int, population: int, horizon: int, members: int,
               agents: int, samples: int) -> StepNoise:
    """Fresh `StepNoise` from `generator` (on its device)."""
    dev = generator.device
    return StepNoise(torch.rand(iterations, population, horizon, generator=generator, device=dev),
                     torch.rand(iterations, population, members, agents, samples, generator=generator, device=dev),
                     torch.randn(iterations, population, members, agents, samples, 2, generator=generator,
                                 device=dev))


def _better(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor] | None, prefer: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """`new` where `prefer` (a 0-d bool) holds, else `old` (field by field); `new` when there is no `old`."""
    return new if old is None else {k: torch.where(prefer, new[k], old[k]) for k in new}


def _refit(probs: torch.Tensor, plans: torch.Tensor, costs: torch.Tensor, elites: int) -> torch.Tensor:
    """Categorical CEM's update: the distribution (H, nA) moves towards the frequencies of the `elites` cheapest
    finite plans (P, H); unchanged when no plan is finite."""
    # Stable rank of each cost, by comparison (P^2 for a few hundred P; no sort, so ties break alike everywhere).
    index = torch.arange(costs.shape[0], device=costs.device)
    before = (costs[None, :] < costs[:, None]) | ((costs[None, :] == costs[:, None]) & (index[None] < index[:, None]))
    rank = before.to(torch.int64).sum(1)
    weight = ((rank < elites) & torch.isfinite(costs)).to(probs.dtype)  # (P,)
    onehot = (plans[..., None] == torch.arange(probs.shape[1], device=plans.device)).to(probs.dtype)  # (P, H, nA)
    counts = (onehot * weight[:, None, None]).sum(0)
    n = weight.sum()
    refit = CEM_SMOOTHING * probs + (1 - CEM_SMOOTHING) * counts / n.clamp_min(1.0)
    return torch.where(n > 0, refit, probs)


def plan_step(model: Any, history: torch.Tensor, agent_mask: torch.Tensor, settings: PlannerConfig,
              noise: StepNoise, warm_start: torch.Tensor, ego_path: EgoPath | None = None,
              fault: Fault | None = None, proposal: torch.Tensor | None = None,
              ego_reward: EgoReward | None = None) -> dict[str, torch.Tensor]:
    """One planning step as a tensor function of the scene and the noise, with no data-dependent Python control
    flow: what `plan_scene` runs and what export.py traces into ONNX.

    Search (`search_shape`): every plan at once, or categorical CEM for I iterations of P candidates (the first
    population holds warm_start (H,) and the constant plans; duplicates are scored once; the best plan seen in any
    iteration wins, ties to the first). Each distinct plan is scored by `score_plans` with its row of `noise`.
    proposal: see `plan_scene` (the greedy plan joins the first population, which CEM draws from the prior);
    ego_reward: see `plan_scene`. Returns 0-d tensors unless noted: plan (H,) int64, cost, reason (index into
    FALLBACK_REASONS, in the order of `plan_scene`), least_risk (H,) (the plan of least collision probability, ties
    to the higher expected return), collision_prob, disagreement, spread, expected_return (of the plan), evaluated
    (plans scored), action_costs (num_actions,) (the least cost of any scored plan starting with each action; +inf:
    none),
    future_mean, future_log_std (E, A, K, H, 2) and future_logits (E, A, K) (the forecaster's outputs under the
    plan, as scored), candidates (P, H) and scores (name -> (P,)) of every plan scored in any iteration.
    """
    c = model.config
    nA, H = c.num_actions, c.horizon
    iterations, population, exhaustive = search_shape(nA, H, settings)
    tokens = model.encode(history[None], agent_mask[None])
    last = history[:, -1]
    probs = torch.full((H, nA), 1.0 / nA, device=history.device)
    include = torch.cat([warm_start[None].to(history.device),
                         torch.arange(nA, device=history.device)[:, None].expand(nA, H)])
    if proposal is not None:
        include = torch.cat([proposal.argmax().reshape(1, 1).expand(1, H).to(include), include])
        probs = (1 - settings.policy_share) * probs + settings.policy_share * proposal.to(probs)[None]
    elites = max(1, round(settings.elites * population))
    best = least = summary = action_costs = None
    candidates: list[torch.Tensor] = []
    scored: list[dict[str, torch.Tensor]] = []
    for it in range(iterations):
        if exhaustive:
            plans = enumerate_plans(nA, H, history.device)
        else:
            plans = sample_categorical(probs, noise.candidates[it])  # (P, H)
            if it == 0:
                plans = torch.cat([include, plans[: population - include.shape[0]]])
            plans = unique_plans(plans, nA)  # (U, H) distinct, sorted
        rows = plans.shape[0]
        out = model.decode(tokens, history[None], agent_mask[None], plans[None], positions_only=True)
        out = {k: v[:, 0] for k, v in out.items()}
        if ego_path is not None:
            path = ego_path(plans)
            out = _with_ego_path(out, path)
            if ego_reward is not None:
                out["reward"] = ego_reward(path).to(out["reward"])[None].expand_as(out["reward"])
        if fault is not None:
            out = fault(out)
        draws = (noise.modes[it, :rows].transpose(0, 1), noise.gauss[it, :rows].transpose(0, 1))
        scores = score_plans(out, last, agent_mask, settings, draws, plans, c.policy_dt)
        cost, cp, er = scores["cost"], scores["collision_prob"], scores["expected_return"]
        first = plans[:, :1] == torch.arange(nA, device=plans.device)  # (U, nA)
        costs_by_action = torch.where(first, cost[:, None], torch.full_like(first, math.inf, dtype=cost.dtype))
        least_cost = costs_by_action.amin(0)
        action_costs = least_cost if action_costs is None else torch.minimum(action_costs, least_cost)
        candidates.append(plans)
        scored.append(scores)
        i = torch.argmin(cost)
        new = {"plan": plans[i], **{k: scores[k][i] for k in ("cost", "collision_prob", "disagreement", "spread",
                                                                "expected_return")},
               **{"future_" + k: out[k][:, i] for k in ("mean", "log_std", "logits")}}
        best = _better(new, best, new["cost"] < best["cost"] if best else None)
        j = torch.argmax(torch.where(cp == cp.min(), er, torch.full_like(er, -math.inf)))
        new = {"least_risk": plans[j], "cp": cp[j], "er": er[j]}
        least = _better(new, least, (new["cp"] < least["cp"]) | ((new["cp"] == least["cp"]) & (new["er"] > least[
            "er"])) if least else None)
        new = {"finite": scores["finite"].any(), "spread": scores["spread"].min(),
               "disagreement": scores["disagreement"].min(), "evaluated": torch.tensor(0) + rows}
        summary = new if summary is None else {
            "finite": summary["finite"] | new["finite"], "spread": torch.minimum(summary["spread"], new["spread"]),
            "disagreement": torch.minimum(summary["disagreement"], new["disagreement"]),
            "evaluated": summary["evaluated"] + new["evaluated"]}
        if not exhaustive:
            probs = _refit(probs, plans, cost, elites)
    reason = fallback_reason(best, summary, model.uncertainty_quantiles[
        :, UNCERTAINTY_LEVELS.index(settings.uncertainty_level)])
    return {**best, "reason": reason, "least_risk": least["least_risk"], "evaluated": summary["evaluated"],
            "action_costs": action_costs, "candidates": torch.cat(candidates),
            "scores": {k: torch.cat([s[k] for s in scored]) for k in scored[0]}}


def _with_ego_path(out: dict[str, torch.Tensor], path: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forecaster's outputs with the ego's (slot 0) positions replaced by `path` (N, H, >=2) in every member and
    mode, with the minimum spread."""
    mean, log_std = out["mean"], out["log_std"]
    T = mean.shape[-1]
    is_ego = (torch.arange(mean.shape[2], device=mean.device) == 0)[:, None, None, None]  # (A, 1, 1, 1)
    ego = path[None, :, None, None, :, :T].to(mean.dtype)  # (1, N, 1, 1, H, T)
    return {**out, "mean": torch.where(is_ego, ego, mean),
            "log_std": torch.where(is_ego, torch.full_like(log_std[:1, :1, :1], LOG_STD_MIN), log_std)}


def fallback_reason(best: dict[str, torch.Tensor], summary: dict[str, torch.Tensor],
                    limits: torch.Tensor) -> torch.Tensor:
    """Index into FALLBACK_REASONS: the model's own trouble first (whatever the plan: not finite, every plan too
    spread, every plan's members disagreeing), then the chance constraint (no finite cost), then the chosen plan's
    uncertainty. limits: (2,) the disagreement and spread limits [m]."""
    dis_limit, spread_limit = limits[0], limits[1]
    checks = [~summary["finite"], summary["spread"] > spread_limit, summary["disagreement"] > dis_limit,
              ~torch.isfinite(best["cost"]), best["disagreement"] > dis_limit, best["spread"] > spread_limit]
    codes = [1, 2, 3, 4, 3, 2]
    reason = torch.zeros((), dtype=torch.int64, device=limits.device)
    for check, code in reversed(list(zip(checks, codes, strict=True))):
        reason = torch.where(check, torch.full_like(reason, code), reason)
    return reason


def plan_scene(model: Any, history: torch.Tensor, agent_mask: torch.Tensor, settings: PlannerConfig,
               generator: torch.Generator, warm_start: torch.Tensor | None = None,
               fault: Fault | None = None, ego_path: EgoPath | None = None,
               proposal: torch.Tensor | None = None, plan_cost: PlanCost | None = None,
               ego_reward: EgoReward | None = None) -> Decision:
    """Choose an action sequence for one scene: encode it once, score candidate plans through every member and
    mode (`score_plans`), search (exhaustive when num_actions ** H <= budget, categorical CEM beyond), then check
    the chosen plan against the chance constraint and the calibrated uncertainty limits (`plan_step`, with its
    noise drawn from `generator`).

    model: a `Forecaster`; history: (A, L, F) and agent_mask (A,) on the model's device; warm_start: (H,) the
    previous decision's plan shifted by one step (evaluated first in CEM; default the constant plan 0); ego_path:
    plans (P, H) -> (P, H, >=2) the ego's own positions under each plan (`egomotion.rollout_ego`), replacing the
    forecaster's ego prediction (every member and mode, with the minimum spread), or None to use the forecaster's;
    proposal: (num_actions,) a reactive policy's action probabilities in this scene — CEM's first population then
    draws a `settings.policy_share` of its plans from them (the rest uniformly) and always holds the policy's greedy
    action over the horizon as a candidate (TD-MPC2-style policy proposals; irrelevant when every plan is
    enumerated); ego_reward: the ego's path under a plan -> the reward of each of its steps (`EgoReward`, needs
    ego_path), in place of the forecaster's reward head. A model with continuous actions (`action_dim` > 0) is
    planned by `plan_continuous` (which also takes `plan_cost`).
    """
    c = model.config
    if getattr(c, "action_dim", 0):
        return plan_continuous(model, history, agent_mask, settings, generator, warm_start, fault, ego_path,
                               plan_cost)
    iterations, population, _ = search_shape(c.num_actions, c.horizon, settings)
    noise = draw_noise(generator, iterations, population, c.horizon, c.members, history.shape[0], settings.samples)
    if warm_start is None:
        warm_start = torch.zeros(c.horizon, dtype=torch.int64, device=history.device)
    # Only the agents that are there go through the forecaster: absent slots never reach a present agent's
    # prediction (attention masks them) nor a cost (every check is masked), so this is exact and saves their share
    # of the per-plan work. The noise is drawn for every slot first, so the draws do not depend on the cropping.
    slots = present_slots(agent_mask)
    noise = StepNoise(noise.candidates, noise.modes[:, :, :, slots], noise.gauss[:, :, :, slots])
    step = plan_step(model, history[slots], agent_mask[slots], settings, noise, warm_start, ego_path, fault,
                     proposal, ego_reward)
    futures = {k: uncrop(step["future_" + k], slots, agent_mask.shape[0]) for k in ("mean", "log_std", "logits")}
    reason = FALLBACK_REASONS[int(step["reason"])]
    least_risk = step["least_risk"] if reason == "no_plan_within_collision_limit" else None
    return Decision(step["plan"], reason, float(step["cost"]), float(step["collision_prob"]),
                    float(step["disagreement"]), float(step["spread"]), float(step["expected_return"]),
                    int(step["evaluated"]), least_risk, step["action_costs"], step["candidates"],
                    step["scores"], futures)


def present_slots(agent_mask: torch.Tensor) -> torch.Tensor:
    """(A',) int64 the slots of the agents present in agent_mask (A,) bool, in slot order; the ego's slot 0 always."""
    return with_ego(agent_mask).nonzero().squeeze(1)


def uncrop(values: torch.Tensor, slots: torch.Tensor, agents: int) -> torch.Tensor:
    """values (E, A', ...) of the agents in `slots` -> (E, agents, ...), NaN in the other slots."""
    out = torch.full((values.shape[0], agents, *values.shape[2:]), math.nan, dtype=values.dtype,
                     device=values.device)
    out[:, slots] = values
    return out


CONTINUOUS_MIN_STD = 0.05
"""Floor of the continuous search's spread, relative to each action's range: MPPI's refitted spread otherwise
collapses onto a few samples within two iterations and stalls short of the optimum (on a quadratic objective
over 4 x 2 actions, 8 iterations of 128: 0.41-0.49 off at a floor of 1e-3, 0.01-0.03 at this floor)."""


def plan_continuous(model: Any, history: torch.Tensor, agent_mask: torch.Tensor, settings: PlannerConfig,
                    generator: torch.Generator, warm_start: torch.Tensor | None = None,
                    fault: Fault | None = None, ego_path: EgoPath | None = None,
                    plan_cost: PlanCost | None = None) -> Decision:
    """Plan continuous action sequences (H, D), each action in [-1, 1], for a forecaster with `action_dim` D:
    MPPI or CEM (`settings.continuous_search`; `settings.budget` plans split over `settings.iterations`, spread
    `continuous_std`), warm-started from `warm_start` (H, D) (the previous plan shifted; default zeros). Every
    plan is scored by `score_plans` through every member and mode with fresh draws from `generator`; the chosen
    plan is the search's, checked like a discrete one (chance constraint, calibrated uncertainty: `fallback_reason`).
    least_risk is the scored plan of least collision probability (ties: the higher expected return). ego_path:
    plans (P, H, D) -> (P, H, >=2) the ego's own positions (`egomotion.rollout_ego_continuous`), replacing the
    forecaster's ego prediction; None: the forecaster's. plan_cost: plans (P, H, D) -> (P,) a cost added to each
    plan's (such as `offroad_costs` of its ego path).
    """
    c = model.config
    H, D, dev = c.horizon, c.action_dim, history.device
    tokens = model.encode(history[None], agent_mask[None])
    last = history[:, -1]
    scored: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def objective(plans: torch.Tensor) -> torch.Tensor:
        out = model.decode(tokens, history[None], agent_mask[None], plans[None].to(history.dtype),
                           positions_only=True)
        out = {k: v[:, 0] for k, v in out.items()}
        if ego_path is not None:
            out = _with_ego_path(out, ego_path(plans))
        if fault is not None:
            out = fault(out)
        scores = score_plans(out, last, agent_mask, settings, generator, plans, c.policy_dt)
        if plan_cost is not None:
            scores["cost"] = scores["cost"] + plan_cost(plans).to(scores["cost"])
        scored.append((plans, scores, out))
        return scores["cost"]

    low, high = -torch.ones(D, device=dev), torch.ones(D, device=dev)
    start = torch.zeros(H, D, device=dev) if warm_start is None else warm_start.to(dev, torch.float32)
    population = max(2, settings.budget // settings.iterations)
    min_std = CONTINUOUS_MIN_STD * float((high - low).min())
    if settings.continuous_search == "mppi":
        result = mppi(objective, H, low, high, population, settings.iterations, settings.mppi_temperature, generator,
                      start, settings.continuous_std, min_std)
    else:
        result = cem(objective, H, low, high, population, settings.iterations,
                     max(1, round(settings.elites * population)), generator, start, settings.continuous_std, min_std)
    plans = torch.cat([p for p, _, _ in scored])
    scores = {k: torch.cat([sc[k] for _, sc, _ in scored]) for k in scored[0][1]}
    # The search's plan is one of the scored rows (its best, or MPPI's final mean, scored last).
    match = (plans == result.plan).flatten(1).all(1).nonzero()
    i = int(match[-1]) if len(match) else int(torch.argmin(scores["cost"]))
    future = {k: torch.cat([out[k] for _, _, out in scored], dim=1)[:, i] for k in ("mean", "log_std", "logits")}
    best = {k: scores[k][i] for k in ("cost", "disagreement", "spread")}
    summary = {"finite": scores["finite"].any(), "spread": scores["spread"].min(),
               "disagreement": scores["disagreement"].min()}
    reason = fallback_reason(best, summary, model.uncertainty_quantiles[
        :, UNCERTAINTY_LEVELS.index(settings.uncertainty_level)])
    cp, er = scores["collision_prob"], scores["expected_return"]
    least = int(torch.argmax(torch.where(cp == cp.min(), er, torch.full_like(er, -math.inf))))
    name = FALLBACK_REASONS[int(reason)]
    return Decision(plans[i], name, float(scores["cost"][i]), float(cp[i]), float(scores["disagreement"][i]),
                    float(scores["spread"][i]), float(er[i]), result.evaluated,
                    plans[least] if name == "no_plan_within_collision_limit" else None, None, plans, scores, future)
