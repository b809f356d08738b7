"""Sampling-based model-predictive control over ego action sequences, in torch (batched, CPU or GPU).

Two layers, kept apart so each can be tested on its own:

1. **Search** over plans for any `objective(plans) -> costs` callable (lower is better), batched over candidates:
   `enumerate_plans` (exhaustive, for small discrete spaces), `categorical_cem` (discrete sequences beyond the
   budget), `cem` and `mppi` (continuous sequences, warm-startable). They know nothing of driving.
2. **Scoring** of N candidate plans of one scene through the forecaster (`score_plans`): futures are sampled over
   members x modes x Gaussian draws, each sample is checked for collisions with every surrounding vehicle, and its
   cost is the negative discounted predicted reward with a collision penalty; a risk measure (`risk_measure`) turns
   the sampled costs of a plan into one number; a chance constraint rejects plans whose collision probability
   exceeds epsilon; member disagreement is an optional penalty (risk-aversion) or bonus (exploration).

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
from drive_mbrl.forecaster import LOG_STD_MIN, plan_uncertainty


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
        elite = plans[order[:elites]]
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


def sample_positions(out: dict[str, torch.Tensor], samples: int, generator: torch.Generator) -> torch.Tensor:
    """Draw futures: per member, plan, agent and sample one mode (by its probability) and one standard-normal draw
    shared over the horizon. Returns positions (E, N, A, M, H, 2) [m]."""
    mean, log_std, logits = out["mean"], out["log_std"], out["logits"]
    E, N, A, K, H, T = mean.shape
    probs = logits.exp().reshape(-1, K).nan_to_num(1.0 / K).clamp_min(0) + 1e-12
    mode = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (E N A, M)
    rows = (mode + K * torch.arange(E * N * A, device=mode.device)[:, None]).reshape(-1)  # rows of (E N A K)
    # Copy whole (H, 4) rows of the chosen modes only; only they are ever exponentiated.
    m = mean.reshape(E * N * A * K, H * T).index_select(0, rows)
    s = log_std.reshape(E * N * A * K, H * T).index_select(0, rows).exp_()
    z = torch.randn(E * N * A * samples, 1, T, generator=generator, device=mean.device, dtype=mean.dtype)
    return torch.addcmul(m.view(-1, H, T), s.view(-1, H, T), z)[..., :2].reshape(E, N, A, samples, H, 2)


def agent_hits(positions: torch.Tensor, start: torch.Tensor, size: torch.Tensor, settings: PlannerConfig,
               extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Whether the ego (slot 0) and each other agent overlap during each horizon step, per sample.

    positions: (E, N, A, M, H, 2) futures; start: (A, 2) positions at the decision; size: (A, 2) length and width
    [m]. Vehicles are boxes aligned with the ego frame (exact for parallel lanes, an approximation where headings
    differ), grown by the margins (and by `extra` (x, y), each broadcastable to (E, N, A-1, M, H)); between horizon
    steps positions are interpolated linearly (`settings.substeps` checks per step). Returns (E, N, A-1, M, H) bool.
    """
    E, N, A, M, H, _ = positions.shape
    reach = (size[1:] + size[0]) / 2 + torch.tensor([settings.margin_long, settings.margin_lat], device=size.device,
                                                     dtype=size.dtype)  # (A-1, 2)
    rel, prev, limit = [], [], []
    for c in range(2):  # x and y as contiguous (E, N, A-1, M, H) tensors: fast elementwise kernels
        rel.append(positions[:, :, 1:, :, :, c] - positions[:, :, :1, :, :, c])
        prev.append(torch.cat([(start[1:, c] - start[0, c])[None, None, :, None, None].expand(E, N, A - 1, M, 1),
                               rel[c][..., :-1]], dim=-1))
        limit.append(reach[:, c][:, None, None] + (extra[c] if extra is not None else 0.0))  # (A-1, 1, 1) or more
    hit = torch.zeros(E, N, A - 1, M, H, dtype=torch.bool, device=positions.device)
    for k in range(1, settings.substeps + 1):
        w = k / settings.substeps
        x, y = (torch.lerp(prev[c], rel[c], w) if k < settings.substeps else rel[c] for c in range(2))
        hit |= (x.abs() < limit[0]) & (y.abs() < limit[1])
    return hit


def collisions(positions: torch.Tensor, start: torch.Tensor, size: torch.Tensor, agent_mask: torch.Tensor,
               settings: PlannerConfig) -> torch.Tensor:
    """Whether the ego collides with any present agent by the end of each horizon step, per sample (see
    `agent_hits`). Returns (E, N, M, H) bool, monotone in H."""
    hit = (agent_hits(positions, start, size, settings) & agent_mask[1:, None, None]).any(2)  # (E, N, M, H)
    return hit.cummax(-1).values


def mode_collision_prob(out: dict[str, torch.Tensor], start: torch.Tensor, size: torch.Tensor,
                        agent_mask: torch.Tensor, settings: PlannerConfig) -> torch.Tensor:
    """Probability that the ego collides by the end of each step, exact over every agent's modes (no sampling, so
    a rare mode such as a neighbour's lane change is never missed), per member.

    Each other agent's mode k is checked against the ego's most likely mode with the boxes grown by
    `settings.mode_sigma` standard deviations of their relative position; agents are taken as independent:
    P(h) = 1 - prod_a (1 - sum_k p_ak hit_ak(<= h)). out: decode outputs without the scene axis (mean, log_std
    (E, N, A, K, H, >=2), logits (E, N, A, K)). Returns (E, N, H).
    """
    mean, std, logits = out["mean"][..., :2], out["log_std"][..., :2].exp(), out["logits"]
    E, N, A, K, H, _ = mean.shape
    ego_mode = logits[:, :, 0].argmax(-1)[:, :, None, None, None, None].expand(E, N, 1, 1, H, 2)
    ego, ego_std = mean[:, :, :1].gather(3, ego_mode), std[:, :, :1].gather(3, ego_mode)  # (E, N, 1, 1, H, 2)
    positions = torch.cat([ego.expand(E, N, 1, K, H, 2), mean[:, :, 1:]], dim=2)  # modes as "samples"
    spread = settings.mode_sigma * (std[:, :, 1:] ** 2 + ego_std ** 2).sqrt()  # (E, N, A-1, K, H, 2)
    hit = agent_hits(positions, start, size, settings, (spread[..., 0], spread[..., 1]))  # (E, N, A-1, K, H)
    hit = hit.cummax(-1).values & agent_mask[1:, None, None]
    p_agent = (logits[:, :, 1:].exp()[..., None] * hit).sum(3).clamp(0, 1)  # (E, N, A-1, H)
    return 1 - (1 - p_agent).prod(2)


def sample_costs(positions: torch.Tensor, reward: torch.Tensor, history_last: torch.Tensor,
                 agent_mask: torch.Tensor, settings: PlannerConfig, plans: torch.Tensor | None = None,
                 policy_dt: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cost of every sampled future (see `score_plans`).

    positions: (E, N, A, M, H, 2) sampled futures; reward: (E, N, H) each member's predicted rewards; policy_dt:
    [s] between plan steps (the forecaster's). Returns costs
    (N, E x M) (member-major), crashed (E, N, M, H) and discounted returns (E, N, M).
    """
    E, N, A, M, H, _ = positions.shape
    crashed = collisions(positions, history_last[:, :2], history_last[:, 6:8], agent_mask, settings)  # (E,N,M,H)
    alive = torch.cat([torch.ones_like(crashed[..., :1]), ~crashed[..., :-1]], dim=-1).to(positions.dtype)
    discount = settings.gamma ** torch.arange(H, device=positions.device, dtype=positions.dtype)
    returns = (discount * alive * reward[:, :, None, :]).sum(-1)  # (E, N, M)
    hit = crashed.any(-1)
    first_crash = torch.where(hit, crashed.to(torch.int64).argmax(-1), torch.full_like(hit, H, dtype=torch.int64))
    penalty = torch.where(hit, settings.collision_cost * settings.gamma ** first_crash.to(returns.dtype),
                          torch.zeros_like(returns))
    costs = penalty - returns
    if settings.progress_weight:
        speed = positions[:, :, 0, :, -1, 0] / (H * policy_dt)  # (E, N, M) ego's mean forward speed
        costs = costs - settings.progress_weight * speed
    costs = costs.permute(1, 0, 2).reshape(N, E * M)
    if settings.comfort_weight and plans is not None:
        costs = costs + settings.comfort_weight * (plans[:, 1:] != plans[:, :-1]).sum(-1, keepdim=True)
    return costs, crashed, returns


def score_plans(out: dict[str, torch.Tensor], history_last: torch.Tensor, agent_mask: torch.Tensor,
                settings: PlannerConfig, generator: torch.Generator, plans: torch.Tensor | None = None,
                policy_dt: float = 1.0) -> dict[str, torch.Tensor]:
    """Costs of N plans of one scene from the forecaster's predictions under them.

    out: `Forecaster.decode` outputs with the scene axis removed (mean (E, N, A, K, H, 4), reward (E, N, H), ...);
    history_last: (A, F) the agents' features at the decision (x, y, ..., length, width as in HIST_FEATURES);
    agent_mask: (A,) bool. Each of the E x M samples of a plan gets the cost
        -sum_h gamma^h r_h alive_h + collision_cost * gamma^{h_c} * crashed
    with r the member's predicted reward and alive_h "no collision before step h", minus `progress_weight` x the
    sample's mean forward speed over the horizon [m/s] (the ego's predicted x at the last step / horizon time),
    plus `comfort_weight` x the number of action changes in the plan (needs `plans` (N, H)). Returns (N,) tensors:
    cost (risk + epistemic term, +inf where the chance constraint fails or the model's output is not finite), risk
    (the risk measure of the sampled costs, before the epistemic term and the constraint), collision_prob
    (`mode_collision_prob` within the first `chance_steps` steps, mean over members),
    sampled_collision_prob (share of samples colliding within those steps), disagreement
    and spread [m] (`forecaster.plan_uncertainty`), expected_return (mean
    over samples of the discounted reward), finite (the model's outputs for the plan are all finite).
    """
    E, N, A, K, H, _ = out["mean"].shape
    positions = sample_positions(out, settings.samples, generator)
    costs, crashed, returns = sample_costs(positions, out["reward"], history_last, agent_mask, settings, plans,
                                           policy_dt)
    steps = min(settings.chance_steps or H, H)
    sampled_prob = crashed[..., steps - 1].to(returns.dtype).mean((0, 2))
    collision_prob = mode_collision_prob(out, history_last[:, :2], history_last[:, 6:8], agent_mask,
                                         settings)[..., steps - 1].mean(0)
    disagreement, spread = plan_uncertainty(out, agent_mask)
    risk = risk_measure(costs, settings.risk, settings.alpha)
    cost = risk + (settings.epistemic_weight - settings.explore_weight) * disagreement
    # NaN / inf anywhere in a plan's predicted means, spreads, mode weights or rewards propagates into these sums.
    totals = [out[k].transpose(0, 1).reshape(N, -1).sum(-1) for k in ("mean", "log_std", "logits", "reward")]
    finite = torch.isfinite(sum(totals))
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
    """(H,) int64 the chosen action sequence (its first action is executed)."""
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
    """(H,) when no plan passed the chance constraint: the plan with the lowest collision probability (ties: the
    higher expected return), for `planner.fallback=least_risk`."""
    action_costs: torch.Tensor | None = None
    """(num_actions,) the lowest risk cost among the evaluated plans that start with each action (inf where none
    was evaluated or every one broke the chance constraint): the planner's view of each immediate action, used as
    soft targets when distilling it into the policy."""
    candidates: torch.Tensor | None = None
    """(P, H) every plan scored (all iterations; a plan may repeat across CEM iterations), for step logs."""
    scores: dict[str, torch.Tensor] | None = None
    """name -> (P,) `score_plans`' figures of `candidates` (cost, risk, collision_prob, ...)."""
    futures: dict[str, torch.Tensor] | None = None
    """The forecaster's outputs under the chosen plan, as scored (ego slot replaced by `ego_path` when given):
    mean, log_std (E, A, K, H, 2) [m] positions in the decision's ego frame, logits (E, A, K)."""


Fault = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""Optional hook applied to the forecaster's outputs before scoring (fault injection in tests)."""


def plan_scene(model: Any, history: torch.Tensor, agent_mask: torch.Tensor, settings: PlannerConfig,
               generator: torch.Generator, warm_start: torch.Tensor | None = None,
               fault: Fault | None = None,
               ego_path: Callable[[torch.Tensor], torch.Tensor] | None = None,
               proposal: torch.Tensor | None = None) -> Decision:
    """Choose an action sequence for one scene: encode it once, score candidate plans through every member and
    mode (`score_plans`), search (exhaustive when num_actions ** H <= budget, categorical CEM beyond), then check
    the chosen plan against the chance constraint and the calibrated uncertainty limits.

    model: a `Forecaster`; history: (A, L, F) and agent_mask (A,) on the model's device; warm_start: (H,) the
    previous decision's plan shifted by one step (evaluated first in CEM); ego_path: plans (P, H) -> (P, H, >=2)
    the ego's own positions under each plan (`egomotion.rollout_ego`), replacing the forecaster's ego prediction
    (every member and mode, with the minimum spread), or None to use the forecaster's; proposal: (num_actions,)
    a reactive policy's action probabilities in this scene — CEM's first population then draws a
    `settings.policy_share` of its plans from them (the rest uniformly) and always holds the policy's greedy action
    over the horizon as a candidate (TD-MPC2-style policy proposals; irrelevant when every plan is enumerated).
    """
    c = model.config
    nA, H = c.num_actions, c.horizon
    tokens = model.encode(history[None], agent_mask[None])
    last = history[:, -1]
    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def objective(plans: torch.Tensor) -> torch.Tensor:
        out = model.decode(tokens, history[None], agent_mask[None], plans[None], positions_only=True)
        out = {k: v[:, 0] for k, v in out.items()}
        if ego_path is not None:
            out["mean"][:, :, 0] = ego_path(plans)[None, :, None, :, :2].to(out["mean"].dtype)
            out["log_std"][:, :, 0] = LOG_STD_MIN
        if fault is not None:
            out = fault(out)
        scores = score_plans(out, last, agent_mask, settings, generator, plans, c.policy_dt)
        seen.append((plans, scores, out))
        return scores["cost"]

    if nA ** H <= settings.budget:
        result = exhaustive_search(objective, nA, H, history.device)
    else:
        population = max(2, settings.budget // settings.iterations)
        include = torch.arange(nA, device=history.device)[:, None].expand(nA, H)  # constant plans
        if warm_start is not None:
            include = torch.cat([warm_start[None].to(history.device), include])
        prior = None
        if proposal is not None:
            greedy = torch.full((1, H), int(proposal.argmax()), device=history.device)
            include = torch.cat([greedy, include])
            uniform = torch.full((H, nA), 1.0 / nA, device=history.device)
            prior = (1 - settings.policy_share) * uniform + settings.policy_share * proposal.to(uniform)[None]
        result = categorical_cem(objective, nA, H, population, settings.iterations,
                                 max(1, round(settings.elites * population)), generator, prior=prior,
                                 include=include)
    plans = torch.cat([p for p, _, _ in seen])
    every = {k: torch.cat([s[k] for _, s, _ in seen]) for k in seen[0][1]}
    stats = {k: v[(plans == result.plan).all(-1).nonzero()[0, 0]] for k, v in every.items()}
    dis_limit, spread_limit = model.uncertainty_quantiles[:, UNCERTAINTY_LEVELS.index(settings.uncertainty_level)]
    # The model's own trouble first (whatever the plan), then the constraint, then the chosen plan's uncertainty.
    if not bool(every["finite"].any()):
        reason = "model_output_not_finite"
    elif float(every["spread"].min()) > float(spread_limit):
        reason = "spread_too_wide"
    elif float(every["disagreement"].min()) > float(dis_limit):
        reason = "members_disagree"
    elif not math.isfinite(result.cost):
        reason = "no_plan_within_collision_limit"
    elif float(stats["disagreement"]) > float(dis_limit):
        reason = "members_disagree"
    elif float(stats["spread"]) > float(spread_limit):
        reason = "spread_too_wide"
    else:
        reason = ""
    least_risk = None
    if reason == "no_plan_within_collision_limit":
        order = torch.argsort(-every["expected_return"], stable=True)
        least_risk = plans[order[torch.argmin(every["collision_prob"][order])]]
    action_costs = torch.full((nA,), math.inf, device=plans.device).scatter_reduce(
        0, plans[:, 0], every["cost"].to(torch.float32), reduce="amin")
    return Decision(result.plan, reason, result.cost, float(stats["collision_prob"]), float(stats["disagreement"]),
                    float(stats["spread"]), float(stats["expected_return"]), result.evaluated, least_risk,
                    action_costs, plans, every, chosen_futures(seen, result.plan))


def chosen_futures(seen: list[tuple[torch.Tensor, Any, dict[str, torch.Tensor]]],
                   plan: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decode outputs (mean, log_std (E, A, K, H, 2), logits (E, A, K)) of `plan` (H,) from the first scored
    batch (plans (P, H), scores, outputs with a plan axis) that holds it: no extra forecaster call."""
    for plans, _, out in seen:
        rows = (plans == plan).all(-1).nonzero()
        if len(rows):
            row = int(rows[0, 0])
            return {k: out[k][:, row].clone() for k in ("mean", "log_std", "logits")}  # not a view of the batch
    raise ValueError("the chosen plan was never scored")
