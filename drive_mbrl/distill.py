"""Distilling the planner into the reactive policy: behaviour cloning, then DAgger.

1. `policy_data` turns recorded episodes into (observation, label) pairs: the label is the expert's action — the
   `expert_action` of the episode's step log where a `dagger` agent recorded one, else the executed action (an
   episode driven by the planner itself).
2. `train_policy` fits `PolicyNet` by cross-entropy with a validation split by episode and early stopping on the
   validation loss (optionally starting from a previous policy: DAgger rounds fine-tune).
3. `DaggerAgent` (`agent=dagger`) lets the current policy drive (the expert takes over a `beta` share of steps) and
   records at every step what the expert would have done — so the next round learns the states the policy itself
   visits (Ross et al., 2011).

Library code: progress goes through callbacks, nothing is printed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drive_mbrl.errors import ConfigError, DataError
from drive_mbrl.policy import PolicyConfig, PolicyNet, episode_observations

EXPERT_ACTION = "expert_action"
"""Step-log key of the expert's label (-1: none)."""
EXPERT_COSTS = "expert_costs"
"""Step-log key of the planner's cost of each immediate action (`planning.Decision.action_costs`)."""
EXPERT_COSTS_SINGLE = "expert_costs_single"
"""Step-log key, with `replans` > 1 only: the expert's own call's costs, before averaging (for comparisons)."""


@dataclass(frozen=True)
class PolicyData:
    obs: np.ndarray
    """(N, D) float32 policy observations."""
    label: np.ndarray
    """(N,) int64 the expert's action."""
    target: np.ndarray
    """(N, num_actions) float32 the training target: softmax(-cost / temperature) of the planner's action costs
    where they were logged (and the step was not handed to its fallback), else one-hot of `label`."""
    episode: np.ndarray
    """(N,) int64 episode id, unique across datasets (for splits by episode)."""
    costs: np.ndarray
    """(N, num_actions) float32 the planner's cost of each immediate action relative to the best one, in
    [0, COST_CAP] (rejected actions at COST_CAP); NaN rows where no costs were logged or the step fell back."""
    steps: int
    """Real env steps the datasets hold (sample-efficiency accounting)."""

    def __len__(self) -> int:
        return int(self.label.shape[0])


COST_CAP = 10.0
"""Relative cost given to actions the planner rejected (every plan starting with them broke the chance
constraint), and the clip of the others: the scale of the planner's collision cost."""


def relative_costs(costs: np.ndarray) -> np.ndarray:
    """(N, nA) costs minus each row's best, clipped to [0, COST_CAP]; inf (rejected) -> COST_CAP; rows without a
    finite cost -> NaN."""
    finite = np.isfinite(costs)
    best = np.where(finite, costs, np.inf).min(1, keepdims=True)
    rel = np.where(finite, np.clip(costs - np.where(np.isfinite(best), best, 0.0), 0.0, COST_CAP), COST_CAP)
    return np.where(finite.any(1, keepdims=True), rel, np.nan).astype(np.float32)


def mean_relative_costs(costs: np.ndarray) -> np.ndarray:
    """(R, nA) action costs of R planning calls on one state (inf = rejected) -> (nA,) float32 the mean of their
    `relative_costs` over the calls that had any finite cost (each call's offset is its own noise, so costs are
    compared within a call before averaging); all inf where no call had one."""
    rel = relative_costs(costs)
    usable = ~np.isnan(rel).all(1)
    if not usable.any():
        return np.full(costs.shape[1], np.inf, np.float32)
    return rel[usable].mean(0).astype(np.float32)


def soft_targets(costs: np.ndarray, label: np.ndarray, temperature: float) -> np.ndarray:
    """(N, nA) targets from action costs (N, nA) (inf = rejected): softmax(-(c - min c) / temperature); rows
    without a finite cost, or temperature 0, give one-hot(label)."""
    onehot = np.eye(costs.shape[1], dtype=np.float32)[label]
    finite = np.isfinite(costs)
    if temperature <= 0:
        return onehot
    best = np.where(finite, costs, np.inf).min(1, keepdims=True)
    shifted = np.where(finite, costs - np.where(np.isfinite(best), best, 0.0), np.inf)
    weights = np.exp(-shifted / temperature)
    ok = finite.any(1)
    soft = weights / np.where(ok, weights.sum(1), 1.0)[:, None]
    return np.where(ok[:, None], soft, onehot).astype(np.float32)


def policy_data(paths: list[str], config: PolicyConfig, temperature: float = 0.0) -> tuple[PolicyData, list[str]]:
    """(observation, expert label, target) of every decision in the datasets; returns them and the action
    names. `temperature` > 0 turns logged planner costs into soft targets (`soft_targets`)."""
    from drive_mbrl.data import load_dataset

    if not paths:
        raise DataError("no dataset given: pass dataset=[FOLDER,...] of planner episodes (`drive-mbrl collect "
                        "agent=mpc ...`)")
    obs, label, target, costs, episode, steps, names = [], [], [], [], [], 0, None
    for offset, path in enumerate(paths):
        manifest, episodes = load_dataset(Path(path))
        names = names or manifest["action_names"]
        if manifest["action_names"] != names:
            raise DataError(f"dataset {path} has actions {manifest['action_names']}, the first one {names}")
        if len(names) != config.num_actions:
            raise DataError(f"dataset {path} has {len(names)} actions, the policy {config.num_actions}")
        for ep in episodes:
            if ep.steps == 0:
                continue
            logged = getattr(ep, "step_log", None) or {}
            expert = np.asarray(logged.get(EXPERT_ACTION, ep.action)).astype(np.int64).reshape(ep.steps)
            keep = expert >= 0
            onehot = np.eye(config.num_actions, dtype=np.float32)[np.maximum(expert, 0)]
            rel = np.full((ep.steps, config.num_actions), np.nan, np.float32)
            if EXPERT_COSTS in logged:
                planned = (ep.fallback == "")[:, None]
                raw = np.asarray(logged[EXPERT_COSTS], np.float64)
                if np.isnan(raw).any():  # inf means "rejected"; NaN means something went wrong upstream
                    step = int(np.argwhere(np.isnan(raw))[0, 0])
                    raise DataError(f"dataset {path}, episode {ep.index}, step {step}: the planner's action costs "
                                    f"hold NaN ({raw[step].tolist()}): relabel that dataset")
                onehot = np.where(planned, soft_targets(raw, np.maximum(expert, 0), temperature), onehot)
                rel = np.where(planned, relative_costs(raw), np.nan).astype(np.float32)
            obs.append(episode_observations(config, ep, manifest)[keep])
            label.append(expert[keep])
            target.append(onehot[keep])
            costs.append(rel[keep])
            episode.append(np.full(int(keep.sum()), offset * 10**7 + ep.index, np.int64))
            steps += ep.steps
    if not obs:
        raise DataError(f"datasets {paths} hold no decisions")
    return PolicyData(np.concatenate(obs), np.concatenate(label), np.concatenate(target), np.concatenate(episode),
                      np.concatenate(costs), steps), list(names)


def merge_data(parts: list[PolicyData]) -> PolicyData:
    """The parts' decisions together (the base labels and each DAgger round's), episode ids made unique across
    parts (each `policy_data` call numbers its own datasets from 0)."""
    episode = np.concatenate([p.episode + i * PART_EPISODES for i, p in enumerate(parts)])
    return PolicyData(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("obs", "label", "target")),
                      episode, np.concatenate([p.costs for p in parts]), steps=sum(p.steps for p in parts))


PART_EPISODES = 10**12
"""Episode-id offset between `merge_data`'s parts (`policy_data` ids are dataset x 10**7 + episode index)."""


@dataclass(frozen=True)
class BCSettings:
    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 20
    """Stop after this many epochs without a lower validation loss."""
    val_fraction: float = 0.15
    loss: str = "ce"
    """`ce`: cross-entropy against the targets; `cost`: the logits regress the planner's negated relative action
    costs (Huber) where they were logged, cross-entropy on the label elsewhere — the greedy action is then the
    planner's cheapest, and every state teaches all actions' costs, not only the chosen one."""
    cost_weight: float = 3.0
    """With `loss=ce`: plus `cost_weight` x the policy's expected relative action cost, E_pi[c(a)] (where costs
    were logged), which pushes probability off the actions the planner found dangerous however rarely they occur
    (cost-sensitive classification; the soft targets alone barely penalise mass on an action with target ~0).
    0 = plain cross-entropy. The default is DistillConfig.cost_weight's (docs/results.md: W = 3 crashed less than
    W = 0 in every pair measured)."""
    seed: int = 0


UNSAFE_COST = COST_CAP / 2
"""A greedy action whose relative planner cost reaches this counts as unsafe in `greedy_regret`: half the
collision cost, i.e. the planner expects a collision with probability >= 0.5 after it (or rejected it)."""


def greedy_regret(logits: torch.Tensor, cost: torch.Tensor) -> tuple[float, float]:
    """(mean relative cost of the greedy action, share of greedy actions costing >= UNSAFE_COST) over the rows of
    `cost` (N, nA) that were logged (not NaN); (nan, nan) when none were."""
    has = ~torch.isnan(cost[:, 0])
    if not has.any():
        return float("nan"), float("nan")
    chosen = cost[has].gather(1, logits[has].argmax(-1, keepdim=True)).squeeze(1)
    return float(chosen.mean()), float((chosen >= UNSAFE_COST).float().mean())


def bc_loss(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor, cost: torch.Tensor, loss: str = "ce",
            cost_weight: float = 0.0) -> torch.Tensor:
    """Behaviour-cloning loss of a batch (see BCSettings.loss): logits (N, nA), label (N,) int64, target (N, nA)
    soft targets, cost (N, nA) relative planner costs with NaN rows where none were logged. `ce`: cross-entropy
    against the targets, plus `cost_weight` x the mean over the batch of E_pi[c] (rows without costs add 0);
    `cost`: Huber regression of -logits on the costs, cross-entropy on the label for rows without costs."""
    has = ~torch.isnan(cost[:, 0])
    if loss == "ce":
        ce = torch.nn.functional.cross_entropy(logits, target)
        if not cost_weight:
            return ce
        return ce + cost_weight * (logits[has].softmax(-1) * cost[has]).sum() / len(logits)
    reg = torch.nn.functional.huber_loss(-logits[has], cost[has], reduction="sum") / cost.shape[1]
    ce = torch.nn.functional.cross_entropy(logits[~has], label[~has], reduction="sum") if (~has).any() else 0.0
    return (reg + ce) / len(logits)


def train_policy(data: PolicyData, config: PolicyConfig, settings: BCSettings, init: PolicyNet | None = None,
                 on_epoch: Callable[[dict[str, float]], None] | None = None) -> tuple[PolicyNet, dict[str, Any]]:
    """Behaviour cloning (`settings.loss`: cross-entropy against the targets, or regression of the planner's action
    costs), validation split by episode, best weights by validation loss; accuracy is against the expert's
    executed label. `init` (a previous round's policy) is fine-tuned, keeping its normalisation."""
    from drive_mbrl.fit import split_by_episode

    torch.manual_seed(settings.seed)
    train_mask, val_mask = split_by_episode(data.episode, settings.val_fraction, settings.seed)
    net = PolicyNet(config)
    if init is not None:
        net.load_state_dict(init.state_dict())
    else:
        net.set_normalisation(data.obs[train_mask])
    x, y, t = torch.as_tensor(data.obs), torch.as_tensor(data.label), torch.as_tensor(data.target)
    c = torch.as_tensor(data.costs)
    xt, yt, tt, ct = x[train_mask], y[train_mask], t[train_mask], c[train_mask]
    xv, yv, tv, cv = x[val_mask], y[val_mask], t[val_mask], c[val_mask]

    objective = partial(bc_loss, loss=settings.loss, cost_weight=settings.cost_weight)

    optim = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed)
    best = {"val_loss": float("inf"), "epoch": -1, "state": None}
    history = []
    for epoch in range(settings.epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            loss = objective(net(xt[idx]), yt[idx], tt[idx], ct[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        with torch.no_grad():
            logits = net(xv)
            val_loss = float(objective(logits, yv, tv, cv))
            val_acc = float((logits.argmax(-1) == yv).float().mean())
            val_regret, val_unsafe = greedy_regret(logits, cv)
        record = {"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_accuracy": val_acc,
                  "val_regret": val_regret, "val_unsafe_rate": val_unsafe}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_acc, "val_regret": val_regret,
                    "val_unsafe_rate": val_unsafe, "epoch": epoch,
                    "state": {k: v.clone() for k, v in net.state_dict().items()}}
        elif epoch - best["epoch"] >= settings.patience:
            break
    net.load_state_dict(best["state"])
    net.eval()
    return net, {"best_epoch": best["epoch"], "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"],
                 # None (JSON null) where no planner costs were logged, e.g. hard labels of agent=mpc episodes
                 **{k: None if np.isnan(best[k]) else best[k] for k in ("val_regret", "val_unsafe_rate")},
                 "train_decisions": int(train_mask.sum()), "val_decisions": int(val_mask.sum()),
                 "epochs_run": len(history)}


class DaggerAgent:
    """`agent=dagger`: the policy drives, the planner labels. Options: `policy` (policy folder; empty: the expert
    drives every step), `checkpoint` and `planner` (the expert MPC's), `beta` (share of steps on which the
    expert's action is executed), `noise` (share of steps on which a uniformly random action is executed instead:
    DART-style noise injection, so the expert's labels also cover states just off its own path), `seed`. Logs the
    expert's action and its per-action costs at every step; with `replans` R > 1 the costs are the mean of R
    planning calls' relative costs (`mean_relative_costs`): the first call is the expert's own decision, the others
    re-plan the same state with a random stream of their own, so that the driving is that of R = 1."""

    drives_itself = False

    def __init__(self, policy: str = "", checkpoint: str = "", planner: dict[str, Any] | None = None,
                 beta: float = 0.0, noise: float = 0.0, seed: int = 0, replans: int = 1, weights: str = ""):
        from drive_mbrl.mpc import MPCAgent
        from drive_mbrl.policy import PolicyAgent

        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"dagger beta must be in [0, 1], got {beta}")
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"dagger noise must be in [0, 1], got {noise}")
        if replans < 1:
            raise ConfigError(f"dagger replans must be >= 1 (planning calls averaged per label), got {replans}")
        self.learner = PolicyAgent(policy) if policy else None
        self.expert = MPCAgent(checkpoint, planner, weights=weights)
        self.beta, self.noise, self.seed, self.replans = beta, noise, seed, replans
        self.last_fallback = ""
        self._expert_action, self._costs = -1, None

    def reset(self, env: Any, seed: int) -> None:
        from drive_mbrl.agents import meta_actions

        meta_actions(env)  # distillation labels meta-actions
        if self.learner:
            self.learner.reset(env, seed)
        self.expert.reset(env, seed)
        self._costs = np.full(env.action_space.n, np.inf, np.float32)
        self._rng = np.random.default_rng(self.seed * 1_000_003 + seed)
        if self.replans > 1:
            import torch

            self._replan_generator = torch.Generator(self.expert.device).manual_seed(
                (self.seed * 1_000_003 + seed) ^ 0x5EED)

    def attach_tracks(self, recorder: Any) -> None:
        if self.learner:
            self.learner.attach_tracks(recorder)
        self.expert.attach_tracks(recorder)

    def act(self, obs: Any, env: Any) -> int:
        self._expert_action = self.expert.act(obs, env)
        self.last_fallback = self.expert.last_fallback
        self._costs = self._single = self._action_costs(self.expert.last_decision)
        if self.replans > 1 and np.isfinite(self._costs).any():
            calls = [self._costs] + [self._action_costs(self.expert.replan(self._replan_generator))
                                     for _ in range(self.replans - 1)]
            self._costs = mean_relative_costs(np.stack(calls))
        if self.noise and self._rng.random() < self.noise:
            return int(self._rng.integers(len(self._costs)))
        if self.learner is None or self._rng.random() < self.beta:
            return self._expert_action
        return self.learner.act(obs, env)

    def _action_costs(self, decision: Any) -> np.ndarray:
        costs = decision.action_costs
        return costs.float().cpu().numpy() if costs is not None else np.full_like(self._costs, np.inf)

    def step_log(self) -> dict[str, np.ndarray]:
        log = {EXPERT_ACTION: np.asarray(self._expert_action, np.int64), EXPERT_COSTS: self._costs.copy()}
        if self.replans > 1:
            log[EXPERT_COSTS_SINGLE] = self._single.copy()
        return log
