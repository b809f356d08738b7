"""Validation of a forecaster against physics baselines on the very same scenes.

Per horizon step h (h x policy_dt seconds ahead), over the surrounding vehicles (agent slots 1..A-1) whose future
is known at h:
  - `ml_l2_mean`, `ml_l2_p95` [m]: position error of the most likely component of the ensemble's pooled mixture
    (E x K components with weights p_k / E);
  - `min_ade`, `min_fde` [m]: best of the K most likely pooled components, over steps 1..h / at step h;
  - `nll` [nats]: negative log-likelihood of the true 2-D position under the pooled mixture's marginal at h;
  - `coverage_50`, `coverage_90`: how often the truth falls in the mixture's highest-density region of that mass
    (Monte Carlo with a fixed generator); `calibration_error`: mean |coverage(a) - a| over a = 0.1 .. 0.9;
  - the same L2 figures for each baseline of `features.physics_baselines`.
Plus the ego's error, reward MAE, crash-prediction AUROC and Brier score, the error on the top decile of member
disagreement vs the rest, the error near the ego with true vs shuffled ego actions (ego-conditioning), and the
last step's error by decision index within the episode (`DECISION_GROUPS`: highway-env's freshly spawned traffic
settles during the first decisions, where both the model's and the baselines' errors are largest).
Pure torch/numpy; knows nothing of files or plotting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from drive_mbrl.features import Scenes, physics_baselines
from drive_mbrl.fit import tensors
from drive_mbrl.forecaster import UNCERTAINTY_LEVELS, Forecaster, plan_uncertainty
from drive_mbrl.losses import ensemble_mixture

LEVELS = np.round(np.arange(0.1, 1.0, 0.1), 2)
NEAR_EGO = 3
"""Slots 1..NEAR_EGO (the nearest vehicles) are the ones whose error the ego's actions should change."""
DECISION_GROUPS = ((0, 0), (1, 1), (2, 2), (3, 9), (10, None))
"""Decision-index ranges (first, last; None: to the end) of the by-decision error breakdown."""


def predict(model: Forecaster, scenes: Scenes, device: torch.device, batch_size: int = 512,
            actions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pooled position mixtures and ego heads for every scene.

    Returns mean, std (B, A, EK, H, 2), log_weight (B, A, EK), member_pos (E, B, A, H, 2) expected position of each
    member, reward (E, B, H), crash_prob (E, B, H).
    """
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            index = np.arange(start, min(start + batch_size, len(scenes)))
            batch = tensors(scenes.subset(index), device)
            acts = batch["actions"] if actions is None else torch.as_tensor(actions[index], device=device)
            out = model(batch["history"], batch["agent_mask"], acts)
            mean, log_std, logits = ensemble_mixture(out)
            member_pos = (out["logits"].exp()[..., None, None] * out["mean"][..., :2]).sum(3)
            for key, value in (("mean", mean[..., :2]), ("std", log_std[..., :2].exp()), ("log_weight", logits),
                               ("member_pos", member_pos), ("reward", out["reward"]),
                               ("crash_prob", torch.sigmoid(out["crash_logit"]))):
                parts.setdefault(key, []).append(value.cpu().numpy())
    axis = {"member_pos": 1, "reward": 1, "crash_prob": 1}
    return {k: np.concatenate(v, axis=axis.get(k, 0)) for k, v in parts.items()}


def _mixture_log_density(x: np.ndarray, mean: np.ndarray, std: np.ndarray, log_weight: np.ndarray) -> np.ndarray:
    """log density of points x (N, S, 2) under N mixtures (N, C, 2) -> (N, S)."""
    z = (x[:, :, None, :] - mean[:, None]) / std[:, None]  # (N, S, C, 2)
    comp = -0.5 * (z**2).sum(-1) - np.log(2 * np.pi) - np.log(std).sum(-1)[:, None]
    a = comp + log_weight[:, None]
    peak = a.max(-1, keepdims=True)
    return (peak + np.log(np.exp(a - peak).sum(-1, keepdims=True)))[..., 0]


def hdr_levels(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, log_weight: np.ndarray,
               samples: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """For each of N 2-D mixtures, the mass of the highest-density region whose boundary passes through the truth
    (Monte Carlo): the truth is inside the region of mass a iff its level < a. truth (N, 2), mean/std (N, C, 2),
    log_weight (N, C) -> (N,)."""
    rng = rng or np.random.default_rng(0)
    chunk = 2048
    if len(truth) > chunk:  # bounded memory: (chunk, samples, C) at a time
        return np.concatenate([hdr_levels(truth[i : i + chunk], mean[i : i + chunk], std[i : i + chunk],
                                          log_weight[i : i + chunk], samples, rng)
                               for i in range(0, len(truth), chunk)])
    n, c, _ = mean.shape
    weight = np.exp(log_weight - log_weight.max(-1, keepdims=True))
    weight /= weight.sum(-1, keepdims=True)
    cum = weight.cumsum(-1)
    pick = (rng.random((n, samples, 1)) > cum[:, None, :]).sum(-1).clip(max=c - 1)  # (N, S)
    m = np.take_along_axis(mean, pick[..., None], axis=1)
    s = np.take_along_axis(std, pick[..., None], axis=1)
    draws = m + s * rng.standard_normal((n, samples, 2))
    dens_draws = _mixture_log_density(draws, mean, std, log_weight)
    dens_truth = _mixture_log_density(truth[:, None], mean, std, log_weight)
    return (dens_draws > dens_truth).mean(-1)


def auroc(score: np.ndarray, label: np.ndarray) -> float | None:
    """Area under the ROC curve by ranks (ties averaged); None when only one class is present."""
    label = label.astype(bool)
    pos, neg = label.sum(), (~label).sum()
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    ordered = np.sort(score)
    for value in np.unique(ordered[1:][np.diff(ordered) == 0]):  # average tied ranks (values seen twice in order)
        tie = score == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


SCALE_RANGE = (0.2, 5.0)
CALIBRATION_POINTS = 4000
"""Points per horizon step used to fit the scale (a random subset when there are more)."""


def _calibration_subset(seed: int, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same random `CALIBRATION_POINTS` rows of every array (all of them when there are fewer)."""
    if len(arrays[0]) <= CALIBRATION_POINTS:
        return arrays
    keep = np.random.default_rng(seed).choice(len(arrays[0]), CALIBRATION_POINTS, replace=False)
    return tuple(a[keep] for a in arrays)


def fit_std_scale(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, log_weight: np.ndarray,
                  samples: int = 128, seed: int = 0) -> float:
    """The factor in `SCALE_RANGE` that, multiplying every component's std, brings the highest-density-region
    coverage closest to nominal (mean |coverage(a) - a| over a = 0.1 .. 0.9): golden-section search on the log
    factor (the miscalibration is unimodal in it: a wider spread covers more at every level). Shapes as in
    `hdr_levels`."""
    truth, mean, std, log_weight = _calibration_subset(seed, truth, mean, std, log_weight)

    def miscalibration(log_factor: float) -> float:
        levels = hdr_levels(truth, mean, std * np.exp(log_factor), log_weight, samples, np.random.default_rng(seed))
        return float(np.mean(np.abs((levels[:, None] < LEVELS).mean(0) - LEVELS)))

    lo, hi = np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1])
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = miscalibration(a), miscalibration(b)
    for _ in range(14):  # interval shrinks to 0.618^14 of ln(25): about 0.4 % in the factor
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = miscalibration(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = miscalibration(b)
    return float(np.exp((lo + hi) / 2))


POWER_RANGE = (0.5, 2.0)
TEMPERATURE_RANGE = (0.25, 8.0)


def tempered(log_weight: torch.Tensor, temperature: torch.Tensor | float, members: int) -> torch.Tensor:
    """Pooled log-weights (N, E x K) (member-major, each member's K modes summing to 1 / E) -> the same with each
    member's mode probabilities tempered, softmax(temperature x log p), as `Forecaster.decode` does with
    `mode_temperature` (log_softmax is shift-invariant, so tempering log-probabilities equals tempering logits)."""
    shift = float(np.log(members))
    per_member = (log_weight + shift).reshape(len(log_weight), members, -1) * temperature
    return torch.log_softmax(per_member, dim=-1).reshape(log_weight.shape) - shift


def temper(log_weight: np.ndarray, temperature: float, members: int) -> np.ndarray:
    """`tempered` on a numpy array."""
    return tempered(torch.as_tensor(log_weight, dtype=torch.float64), temperature, members).numpy()


def fit_spread_shape(points: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], members: int,
                     seed: int = 0) -> tuple[float, list[float]]:
    """The mode temperature t (one for the whole trajectory, in `TEMPERATURE_RANGE`) and, per horizon step, the
    exponent b (in `POWER_RANGE`) of the spread map std' = a x std ** b that together maximise the mixtures'
    likelihood of the truth (the factors a fitted jointly, then discarded: `fit_std_scale` sets them for
    coverage). `points`: per horizon step (truth, mean, std, log_weight) shaped as in `hdr_levels`, the pooled
    mixture of `members` members (member-major components); std in the target's units [m].

    b > 1 widens the wide predictions relative to the narrow ones: a model whose spread ranks its errors right but
    grows too slowly with them (a 4,411-step highway forecaster at 5 s: median std 0.79 of the median error in
    steady traffic, 0.39 at an episode's first decision) is then calibrated in both places, which one factor per
    horizon step cannot do. t > 1 sharpens each member's mode probabilities (`temper`): on a 50,529-step highway
    forecaster they were too flat, the minor modes widening the 90 % region (coverage 0.96 at 1 s) while the 50 %
    region was nominal, which no map of the spread alone can undo."""
    data = [tuple(torch.as_tensor(x, dtype=torch.float64) for x in _calibration_subset(seed, *arrays))
            for arrays in points]
    steps = len(data)
    log_a = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    power = torch.ones(steps, dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([log_a, power, log_t], max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optim.zero_grad()
        loss = torch.zeros((), dtype=torch.float64)
        for h, (t, m, s, w) in enumerate(data):
            log_std = log_a[h] + power[h] * s.log()  # (N, C, 2)
            z = (t[:, None] - m) / log_std.exp()
            log_weight = tempered(w, log_t.exp(), members)
            loss = loss - torch.logsumexp(-0.5 * (z**2).sum(-1) - log_std.sum(-1) + log_weight, dim=-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(nll)
    temperature = float(log_t.detach().exp())
    temperature = float(np.clip(temperature, *TEMPERATURE_RANGE)) if np.isfinite(temperature) else 1.0
    powers = [float(np.clip(b, *POWER_RANGE)) if np.isfinite(b) else 1.0 for b in power.detach().tolist()]
    return temperature, powers


def calibrate(model: Forecaster, scenes: Scenes, device: torch.device, samples: int = 128,
              seed: int = 0) -> dict[str, Any]:
    """Fit the model's calibration on `scenes` (a validation split or a calibration set, never the test data) over
    the surrounding vehicles: the mode temperature and the per-horizon spread powers by likelihood
    (`fit_spread_shape`), then the per-horizon spread factors by coverage (`fit_std_scale`), giving std' =
    std_scale x std ** std_power and mode probabilities softmax(mode_temperature x logits). The maps are fitted on
    the position errors [m] and applied to every target's std, the velocities' [m/s] too. Sets those buffers and
    the uncertainty limits (`calibrate_uncertainty`); returns {"std_scale": [...], "std_power": [...]} (H values
    each) and {"mode_temperature": t}."""
    model.reset_calibration()
    pred = predict(model, scenes, device)
    known = scenes.future_mask.copy()
    known[:, 0] = False
    steps, points = [], []
    for h in range(pred["mean"].shape[3]):
        sel = known[:, :, h]
        if sel.any():
            steps.append(h)
            points.append((scenes.future[:, :, h, :2][sel], pred["mean"][:, :, :, h][sel],
                           pred["std"][:, :, :, h][sel], pred["log_weight"][sel]))
    members = model.config.members
    temperature, fitted = fit_spread_shape(points, members, seed) if points else (1.0, [])
    scales, powers = [1.0] * pred["mean"].shape[3], [1.0] * pred["mean"].shape[3]
    for h, (truth, mean, std, log_weight), power in zip(steps, points, fitted, strict=True):
        powers[h] = power
        scales[h] = fit_std_scale(truth, mean, std**power, temper(log_weight, temperature, members), samples, seed)
    model.std_scale.copy_(torch.tensor(scales))
    model.std_power.copy_(torch.tensor(powers))
    model.mode_temperature.fill_(temperature)
    calibrate_uncertainty(model, scenes, device)
    return {"std_scale": scales, "std_power": powers, "mode_temperature": temperature}


def calibrate_uncertainty(model: Forecaster, scenes: Scenes, device: torch.device, batch_size: int = 512) -> None:
    """Store the quantiles (`UNCERTAINTY_LEVELS`) of `plan_uncertainty` on `scenes` under their own actions in
    `model.uncertainty_quantiles`: the planner falls back when a plan is less certain than that."""
    model.eval()
    stats = []
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            batch = tensors(scenes.subset(np.arange(start, min(start + batch_size, len(scenes)))), device)
            out = model(batch["history"], batch["agent_mask"], batch["actions"])
            stats.append(torch.stack(plan_uncertainty(out, batch["agent_mask"]), dim=-1).cpu())
    values = torch.cat(stats).double()  # (B, 2)
    levels = torch.tensor(UNCERTAINTY_LEVELS, dtype=values.dtype)
    model.uncertainty_quantiles.copy_(torch.quantile(values, levels, dim=0).T.to(model.uncertainty_quantiles))


def validate(model: Forecaster, scenes: Scenes, device: torch.device, policy_dt: float, seed: int = 0,
             hdr_samples: int = 256) -> dict[str, Any]:
    """All validation figures (see the module docstring) as a JSON-compatible dict."""
    rng = np.random.default_rng(seed)
    pred = predict(model, scenes, device)
    B, A, C, H, _ = pred["mean"].shape
    truth = scenes.future[..., :2]
    known = scenes.future_mask.copy()
    others = known.copy()
    others[:, 0] = False
    top_k = np.argsort(-pred["log_weight"], axis=-1)[..., : model.config.modes]  # (B, A, K)
    ml = top_k[..., 0]
    ml_pos = np.take_along_axis(pred["mean"], ml[..., None, None, None], axis=2)[:, :, 0]  # (B, A, H, 2)
    err = np.linalg.norm(ml_pos - truth, axis=-1)  # (B, A, H)
    topk_pos = np.take_along_axis(pred["mean"], top_k[..., None, None], axis=2)  # (B, A, K, H, 2)
    topk_err = np.linalg.norm(topk_pos - truth[:, :, None], axis=-1)  # (B, A, K, H)
    baselines = {name: np.linalg.norm(pos - truth, axis=-1)
                 for name, pos in physics_baselines(scenes, policy_dt).items()}
    disagreement = pred["member_pos"][:, :, :, -1].std(0).sum(-1)  # (B, A) at the last step

    per_h = []
    last_levels = None
    for h in range(H):
        sel = others[:, :, h]
        if not sel.any():
            continue
        e = err[:, :, h][sel]
        through = others[:, :, : h + 1].all(-1) & sel
        levels = hdr_levels(truth[:, :, h][sel], pred["mean"][:, :, :, h][sel], pred["std"][:, :, :, h][sel],
                            pred["log_weight"][sel], hdr_samples, rng)
        log_density = _mixture_log_density(truth[:, :, h][sel][:, None], pred["mean"][:, :, :, h][sel],
                                           pred["std"][:, :, :, h][sel], pred["log_weight"][sel])[:, 0]
        coverage = {f"{a:.1f}": float((levels < a).mean()) for a in LEVELS}
        if h == H - 1:  # for the coverage by decision index
            last_levels = np.full((B, A), np.nan)
            last_levels[sel] = levels
        row = {
            "horizon_s": (h + 1) * policy_dt, "samples": int(sel.sum()),
            "ml_l2_mean": float(e.mean()), "ml_l2_p95": float(np.percentile(e, 95)),
            "min_ade": float(topk_err[:, :, :, : h + 1].mean(-1).min(-1)[through].mean()) if through.any() else None,
            "min_fde": float(topk_err[:, :, :, h].min(-1)[sel].mean()),
            "nll": float(-log_density.mean()),
            "coverage_50": float((levels < 0.5).mean()), "coverage_90": float((levels < 0.9).mean()),
            "coverage": coverage,
            "calibration_error": float(np.mean([abs(coverage[f"{a:.1f}"] - a) for a in LEVELS])),
            "ego_l2_mean": float(err[:, 0, h][known[:, 0, h]].mean()) if known[:, 0, h].any() else None,
            "baselines": {name: {"l2_mean": float(b[:, :, h][sel].mean()),
                                 "l2_p95": float(np.percentile(b[:, :, h][sel], 95))}
                          for name, b in baselines.items()},
        }
        per_h.append(row)

    last = others[:, :, H - 1]
    figures: dict[str, Any] = {"per_horizon": per_h, "scenes": B,
                               "by_decision": by_decision(err[:, :, H - 1], baselines, last, scenes.step, H - 1,
                                                          last_levels)}
    if last.any():
        d, e = disagreement[last], err[:, :, H - 1][last]
        top = d >= np.percentile(d, 90)
        figures["epistemic"] = {"disagreement_mean": float(d.mean()), "disagreement_p90": float(np.percentile(d, 90)),
                                "l2_top_decile_disagreement": float(e[top].mean()),
                                "l2_rest": float(e[~top].mean()) if (~top).any() else None}
        shuffled = predict(model, scenes, device, actions=scenes.actions[rng.permutation(B)])
        s_ml = np.argmax(shuffled["log_weight"], axis=-1)
        s_pos = np.take_along_axis(shuffled["mean"], s_ml[..., None, None, None], axis=2)[:, :, 0]
        s_err = np.linalg.norm(s_pos - truth, axis=-1)
        near = last.copy()
        near[:, NEAR_EGO + 1 :] = False
        figures["ego_conditioning"] = {
            "near_slots": NEAR_EGO, "l2_true_actions": float(err[:, :, H - 1][near].mean()),
            "l2_shuffled_actions": float(s_err[:, :, H - 1][near].mean()),
            "ego_l2_true_actions": float(err[:, 0, H - 1][known[:, 0, H - 1]].mean()),
            "ego_l2_shuffled_actions": float(s_err[:, 0, H - 1][known[:, 0, H - 1]].mean()),
        }
    valid = scenes.step_valid
    reward_pred = pred["reward"].mean(0)
    crash_prob = pred["crash_prob"].mean(0)
    figures["reward"] = {"mae": float(np.abs(reward_pred - scenes.reward)[valid].mean()),
                         "mae_of_mean_reward": float(np.abs(scenes.reward[valid].mean() - scenes.reward[valid]).mean())}
    figures["crash"] = {"auroc": auroc(crash_prob[valid], scenes.crash[valid]),
                        "brier": float(((crash_prob - scenes.crash) ** 2)[valid].mean()),
                        "positive_rate": float(scenes.crash[valid].mean())}
    return figures


def by_decision(err: np.ndarray, baselines: dict[str, np.ndarray], sel: np.ndarray, step: np.ndarray,
                h: int, levels: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Mean L2 [m] of the most likely mode and of each baseline at horizon index h, per `DECISION_GROUPS` range of
    the scenes' decision index. err (B, A) at h; baselines name -> (B, A, H); sel (B, A) which agents count;
    step (B,) int64; levels (B, A) the truth's HDR level at h (`hdr_levels`), which adds the coverage of the 50 %
    and 90 % regions per group. Groups without samples are left out."""
    rows = []
    for first, last in DECISION_GROUPS:
        in_group = (step >= first) & (step <= (np.inf if last is None else last))
        mask = sel & in_group[:, None]
        if not mask.any():
            continue
        rows.append({"decisions": f"{first}" if first == last else f"{first}+" if last is None else f"{first}-{last}",
                     "samples": int(mask.sum()), "ml_l2_mean": float(err[mask].mean()),
                     "baselines": {name: float(b[:, :, h][mask].mean()) for name, b in baselines.items()}})
        if levels is not None:
            rows[-1].update(coverage_50=float((levels[mask] < 0.5).mean()),
                            coverage_90=float((levels[mask] < 0.9).mean()))
    return rows
