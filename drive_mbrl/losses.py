"""Losses and probabilistic scores of the forecaster's Gaussian mixtures (pure torch functions).

Each agent's future over the horizon is one mixture of K diagonal Gaussians over the whole (H, 4) trajectory (a mode
is a whole trajectory). Unknown future entries are masked out of the product.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
HUBER_DELTA = 3.0
"""[m] where the winner-takes-all loss turns from squared to linear."""


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, exp(log_std)^2)."""
    return -0.5 * (((x - mean) / log_std.exp()) ** 2 + LOG_2PI) - log_std


def mixture_log_prob(target: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                     logits: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of each agent's known future under its K-mode mixture.

    target: (B, A, H, T) with NaN where unknown; mask: (B, A, H) bool; mean, log_std: (..., B, A, K, H, T);
    logits: (..., B, A, K) log-probabilities. Returns (..., B, A); 0 for agents with no known step.
    """
    x = torch.nan_to_num(target)[..., None, :, :]  # (B, A, 1, H, T)
    per_point = gaussian_log_prob(x, mean, log_std).sum(-1)  # (..., B, A, K, H)
    per_mode = (per_point * mask[..., None, :]).sum(-1)  # (..., B, A, K)
    return torch.logsumexp(logits + per_mode, dim=-1)


def ensemble_mixture(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool members into one mixture of E*K components with weights p_k / E: returns mean, log_std (B, A, EK, H, T)
    and logits (B, A, EK)."""
    mean, log_std, logits = out["mean"], out["log_std"], out["logits"]
    E, B, A, K, H, T = mean.shape
    pool = lambda t: t.permute(1, 2, 0, 3, *range(4, t.dim())).reshape(B, A, E * K, *t.shape[4:])
    return pool(mean), pool(log_std), pool(logits) - math.log(E)


def huber(distance: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    """0.5 d^2 for d <= delta, delta (d - delta / 2) beyond: squared near the truth, linear in the heavy tail."""
    return torch.where(distance <= delta, 0.5 * distance**2, delta * (distance - 0.5 * delta))


def best_mode_l2(target: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
                 velocity_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner-takes-all error of the mode closest to the truth in position: per agent, the mean over known steps
    of the Huber loss of its position error [m] plus `velocity_weight` x that of its velocity error [m/s] (x 1 s).
    A squared error near the truth lets large, rare errors (the ego's lane changes) drive learning; the linear tail
    keeps crashes from dominating. target: (B, A, H, T); mask: (B, A, H); mean: (..., B, A, K, H, T).
    Returns the error (..., B, A) and the index of the winning mode (..., B, A, 1)."""
    truth = torch.nan_to_num(target)[..., None, :, :]
    pos = huber(torch.linalg.vector_norm(mean[..., :2] - truth[..., :2], dim=-1))  # (..., B, A, K, H)
    vel = huber(torch.linalg.vector_norm(mean[..., 2:4] - truth[..., 2:4], dim=-1))
    steps = mask.sum(-1, keepdim=True).clamp_min(1)
    pos_err = (pos * mask[..., None, :]).sum(-1) / steps  # (..., B, A, K)
    vel_err = (vel * mask[..., None, :]).sum(-1) / steps
    best = pos_err.detach().argmin(dim=-1, keepdim=True)
    return (pos_err + velocity_weight * vel_err).gather(-1, best)[..., 0], best


def forecaster_loss(out: dict[str, torch.Tensor], future: torch.Tensor, future_mask: torch.Tensor,
                    reward: torch.Tensor, crash: torch.Tensor, step_valid: torch.Tensor,
                    reward_weight: float = 1.0, crash_weight: float = 1.0,
                    mode_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Training loss summed over members (each member fits the data on its own).

    The modes' means are trained by the winner-takes-all error (`best_mode_l2`, Huber in metres); the mixture NLL per
    known (agent, step) point trains the spreads and the mode probabilities with the means held fixed. Trained
    jointly, the NLL lets the most precise dimensions (speeds of vehicles cruising at constant speed) dominate the
    shared layers' gradients, and the means of rarer, larger motions (the ego's lane changes under its actions)
    barely learn (the heteroscedastic pitfall, Seitzer et al. 2022). `mode_weight` adds the cross-entropy of the
    mode probabilities against the winning mode (`mode_ce`: the classification term of MultiPath-style
    forecasters, which trains the mode choice on the position error the most likely mode is judged by). Reward MSE
    and crash BCE per valid step. Returns the scalar terms and their weighted `total`.
    """
    log_prob = mixture_log_prob(future, future_mask, out["mean"].detach(), out["log_std"], out["logits"])
    points = future_mask.sum().clamp_min(1)
    nll = -log_prob.sum(dim=(1, 2)) / points  # (E,)
    has_future = future_mask.any(-1)
    agents = has_future.sum().clamp_min(1)
    wta_per_agent, winner = best_mode_l2(future, future_mask, out["mean"])
    wta = (wta_per_agent * has_future).sum(dim=(1, 2)) / agents
    mode_ce = -(out["logits"].gather(-1, winner)[..., 0] * has_future).sum(dim=(1, 2)) / agents
    valid = step_valid.float()
    steps = valid.sum().clamp_min(1)
    reward_mse = ((out["reward"] - torch.nan_to_num(reward)) ** 2 * valid).sum(dim=(1, 2)) / steps
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        out["crash_logit"], crash.float().expand_as(out["crash_logit"]), reduction="none")
    crash_bce = (bce * valid).sum(dim=(1, 2)) / steps
    total = (nll + wta + reward_weight * reward_mse + crash_weight * crash_bce + mode_weight * mode_ce).sum()
    return {"total": total, "nll": nll.mean(), "wta_l2": wta.mean(), "mode_ce": mode_ce.mean(),
            "reward_mse": reward_mse.mean(), "crash_bce": crash_bce.mean()}
