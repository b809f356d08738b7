"""Ego-conditioned, multi-agent, multimodal probabilistic-ensemble trajectory forecaster.

For a scene (features.py) it predicts, for every agent slot and each of the next H policy steps, a mixture of K
diagonal Gaussians over (x, y, vx, vy) in the decision's ego frame, conditioned on the ego's candidate actions:

    encode (once per scene, plan-independent):
      token_a = MLP([history of agent a, (lane neighbours of a), is_ego])        per agent a          (E, B, A, D)
      token   = attention blocks across the agent tokens (masked)                interactions         (E, B, A, D)
    decode (once per scene x candidate plan):
      plan    = MLP(one-hot ego action sequence)                                                      (E, B, N, D)
      z_a     = MLP(LN(W_h token_a + W_p plan + (U_h token_a) * (U_p plan)))   each agent reads the plan (E,B,N,A,D')
      heads   = K mode logits, K x H x 4 means (residual to a physics baseline: `residual`), K x H x 4 log-std; from the
                ego's z: H rewards and H collision logits
      calibrated after training (`validation.calibrate`): std' = std_scale_h x std ** std_power_h per horizon step,
                mode probabilities softmax(mode_temperature x logits) per member

Splitting encode from decode is what makes planning cheap: a planner scores N candidate plans of one scene with
one encoding and N light decodes, instead of N full passes (`rollout`). The interactions between agents are
modelled in the encoder; the ego's plan reaches every agent's prediction through its decoder (ego-conditioning).

E ensemble members hold separate weights (every parameter has a leading member axis E) and run as one batched matmul
(`EnsembleLinear`, as in mbrl-lib's `EnsembleLinearLayer`; PETS, Chua et al. 2018), so member disagreement
(epistemic) and predicted variance (aleatoric) come out separately. Inputs are normalised inside the module with
statistics fitted on training data, so a checkpoint is self-contained. Knows nothing of files or envs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from drive_mbrl.config import UNCERTAINTY_LEVELS
from drive_mbrl.errors import ConfigError
from drive_mbrl.features import HIST_FEATURES, PRESENT, TARGET_FEATURES

LOG_STD_MIN, LOG_STD_MAX = math.log(0.05), math.log(50.0)
"""Bounds of the network's predicted std, in the target's units ([m], [m/s]), before the calibration's power and
factor (`std_power`, `std_scale`), which can move a std outside them: a floor of 5 cm keeps the Gaussian NLL from
collapsing onto vehicles that drive exactly at constant speed (and then exploding on the next small error)."""



_LANE = slice(HIST_FEATURES.index("cos_lane"), HIST_FEATURES.index("sin_lane") + 1)


def physics_base(last: torch.Tensor, horizon: int, policy_dt: float, kind: str) -> torch.Tensor:
    """The physics prediction each agent's predicted mean is a residual to (`ForecasterConfig.residual`).

    last: (..., len(HIST_FEATURES)) every agent's de-normalised features at the decision (ego frame). Returns
    (..., horizon, 4) x, y [m], vx, vy [m/s] at t = policy_dt, 2 policy_dt, ...: `cv` holds the velocity v;
    `lane` holds its component along the lane direction u, (v . u) u, and so the offset from the lane centre
    (positions as `features.physics_baselines`' `cv_lane_keeping`)."""
    p, v = last[..., None, 0:2], last[..., None, 2:4]
    if kind == "lane":
        u = last[..., None, _LANE]
        v = (v * u).sum(-1, keepdim=True) * u
    t = torch.arange(1, horizon + 1, device=last.device, dtype=last.dtype)[:, None] * policy_dt  # (H, 1)
    return torch.cat([p + v * t, v.expand(*v.shape[:-2], horizon, 2)], dim=-1)


@dataclass(frozen=True)
class ForecasterConfig:
    """Architecture of the forecaster (stored in checkpoints' meta.json)."""

    agents: int = 8
    history_len: int = 5
    horizon: int = 5
    num_actions: int = 5
    action_dim: int = 0
    """0: the ego's plan is a sequence of discrete meta-actions (one-hot over `num_actions`, -1 for none); D > 0: a
    sequence of continuous actions (H, D), each in [-1, 1] (highway-env's ContinuousAction: acceleration and
    steering scaled to their ranges), NaN for none. `plan_inputs` turns either into the model's plan features."""
    members: int = 5
    modes: int = 3
    width: int = 128
    heads: int = 4
    blocks: int = 2
    plan_fusion: str = "early"
    """Where the ego's plan enters: `early` (into every agent token before the attention blocks: the most accurate;
    per plan the whole token stack runs) or `late` (after the attention, into a per-plan decoder of
    `decoder_width`: cheaper per plan, but less accurate in our measurements: 1.71 m vs 1.23 m at 5 s on highway)."""
    decoder_width: int = 128
    """Width of the late-fusion decoder (64 trained far worse: validation NLL +1.2 vs -0.5 after 7 epochs)."""
    policy_dt: float = 1.0
    """[s] between horizon steps (the physics baseline of the residual uses it)."""
    residual: str = "cv"
    """The physics prediction the mean is a residual to: `cv` (constant velocity, p + v t) or `lane` (constant
    velocity along the agent's lane with its offset from the lane centre held, p + (v . u) t u with u the lane's
    direction: `features.physics_baselines`' `cv_lane_keeping`). With `cv` a vehicle in a lane change is
    extrapolated across the road (its lateral speed held for the whole horizon), and the head must learn to undo
    up to 20 m of that from the few lane changes in the data; with `lane` it only learns the change itself (about
    one lane width). `cv` is what checkpoints without this field were trained with, and `drive-mbrl fit`'s default
    (`FitConfig.residual`)."""
    neighbours: bool = False
    """Give each agent token its lane neighbours (`lane_neighbours`: gap and closing speed of the nearest agent ahead
    and behind in its own lane and the two next to it) — the quantities IDM and MOBIL act on. Off by default: on
    highway it made the model worse (5 s mean L2 1.30 m vs 1.14 m on the same 28 k steps of data), but that was
    before `mask_absent`; with it, better (1.22 vs 1.31 m, and 5.8 vs 7.8 m at an episode's first decision), yet
    the planner on a 4,411-step forecaster with it crashed more (9 against 4 in 200 episodes; docs/results.md)."""
    pad_history: bool = False
    """Absent history frames (a track younger than the history, every track at an episode's start) are filled by
    `features.pad_history` (extrapolated back at constant speed) instead of zeros. Every scene builder of the model
    follows this flag: fit, validate and the planner through `fit.scene_spec`, the imagination env's start states
    (`imagination.start_states`) and the torch-free onboard agent (from the bundle contract's `pad_history`)."""
    mask_absent: bool = False
    """Normalise only what was observed (`Forecaster.normalise`): an empty history frame (absent, not padded) enters
    the model as zeros (the training data's mean), the `present` feature raw (0 / 1), and a feature that was
    constant in the training data (a vehicle's length on highway) is divided by 1 instead of by ~0. Off reproduces
    checkpoints fitted before this field, where an absent frame's features normalised to -100 .. -5,000 (the
    length, 0 - 5 m over a std clamped at 1e-3): at an episode's first decision, when every track is one frame
    old, the model then predicted the same residual for every agent whatever the scene. `drive-mbrl fit` turns it
    on (`FitConfig.mask_absent`)."""

    def to_dict(self) -> dict:
        return asdict(self)


class EnsembleLinear(nn.Module):
    """E independent affine maps as one batched matmul: (E, N, I) -> (E, N, O), in the weights' dtype."""

    def __init__(self, members: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1]).to(self.weight.dtype)  # (E, N, I)
        return torch.baddbmm(self.bias, flat, self.weight).reshape(*shape[:-1], -1)


class EnsembleLayerNorm(nn.Module):
    """Layer norm with a separate affine per member: x (E, ..., D)."""

    def __init__(self, members: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.ones(members, 1, width))
        self.bias = nn.Parameter(torch.zeros(members, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = F.layer_norm(x, (self.width,)).reshape(shape[0], -1, self.width)  # a constant width traces to ONNX
        return (y * self.weight + self.bias).reshape(shape)


class EnsembleMLP(nn.Module):
    def __init__(self, members: int, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.silu(x)
        return x


class AgentAttention(nn.Module):
    """Pre-norm multi-head self-attention across agent tokens plus an MLP, batched over members."""

    def __init__(self, members: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = EnsembleLayerNorm(members, width)
        self.qkv = EnsembleLinear(members, width, 3 * width)
        self.out = EnsembleLinear(members, width, width)
        self.norm2 = EnsembleLayerNorm(members, width)
        self.mlp = EnsembleMLP(members, [width, 2 * width, width])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (E, B, A, D); mask: (B, A) True for real agents."""
        E, B, A, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        split = lambda t: t.reshape(E * B, A, self.heads, D // self.heads).transpose(1, 2)  # (E*B, h, A, d)
        # Masked softmax attention written out: with a handful of agents per scene the batched matmuls beat
        # scaled_dot_product_attention's kernels on a CPU (1.2x in fp32, 3x in bfloat16), and trace to ONNX alike.
        # The scores are laid out key-major, (keys, E*B, h, queries), so that the softmax runs over the outermost
        # axis: a CPU softmax over a last axis of a few agents is 4-15x slower than over a long inner one.
        bias = torch.zeros(B, A, dtype=x.dtype, device=x.device).masked_fill(~mask, -math.inf)
        bias = bias.t()[:, None, :, None, None].expand(A, E, B, 1, 1).reshape(A, E * B, 1, 1)
        scores = torch.matmul(split(k), split(q).transpose(-1, -2)) * (D // self.heads) ** -0.5  # (E*B, h, key, q)
        weights = (scores.permute(2, 0, 1, 3) + bias).softmax(0).permute(1, 2, 3, 0)  # (E*B, h, q, key)
        y = torch.matmul(weights, split(v))  # (E*B, h, A, d)
        x = x + self.out(y.transpose(1, 2).reshape(E, B, A, D))
        return x + self.mlp(self.norm2(x))


def with_ego(agent_mask: torch.Tensor) -> torch.Tensor:
    """agent_mask (..., A) bool with the ego's slot 0 always set: the ego is always there."""
    return agent_mask | (torch.arange(agent_mask.shape[-1], device=agent_mask.device) == 0)


LANE_WIDTH = 4.0
"""[m] lane width that `lane_neighbours` assumes (highway-env's StraightLane.DEFAULT_WIDTH)."""
GAP_SCALE, SPEED_SCALE, NO_GAP = 50.0, 10.0, 1.2
"""Scales of `lane_neighbours`' features ([m], [m/s]) and the scaled gap that stands for "nobody there"."""
NEIGHBOUR_FEATURES = 18
"""3 lanes (left, own, right) x (ahead, behind) x (gap, closing speed, present)."""


def lane_neighbours(last: torch.Tensor, agent_mask: torch.Tensor) -> torch.Tensor:
    """For each agent, the nearest other agent ahead and behind in its own lane and in the lanes either side.

    last: (B, A, F) the decision frame of the history (ego frame, HIST_FEATURES order, not normalised); agent_mask:
    (B, A). Lanes are told apart by the lateral offset between agents (|dy - k LANE_WIDTH| < LANE_WIDTH / 2 for
    k = -1, 0, +1) and ahead / behind by the sign of dx. Returns (B, A, 18): per (lane k, ahead / behind) the
    bumper-to-bumper gap / GAP_SCALE (clipped to [-0.5, NO_GAP]; NO_GAP where nobody is there), the closing speed
    (vx_self - vx_other for one ahead, the reverse behind) / SPEED_SCALE, and 1 where someone is there. Straight
    lanes are assumed; on curved roads the features are only approximate.
    """
    x, y, vx, length = last[..., 0], last[..., 1], last[..., 2], last[..., 6]
    dx = x[:, None, :] - x[:, :, None]  # (B, i, j): j relative to i
    dy = y[:, None, :] - y[:, :, None]
    dv = vx[:, None, :] - vx[:, :, None]
    bumper = (length[:, None, :] + length[:, :, None]) / 2
    slot = torch.arange(last.shape[1], device=last.device)
    pair = agent_mask[:, None, :] & agent_mask[:, :, None] & (slot[:, None] != slot[None, :])  # not eye: ORT
    big = torch.full_like(dx, 1e6)
    feats = []
    for k in (-1.0, 0.0, 1.0):
        in_lane = pair & ((dy - k * LANE_WIDTH).abs() < LANE_WIDTH / 2)
        for sign in (1.0, -1.0):
            side = in_lane & ((dx >= 0) if sign > 0 else (dx < 0))
            dist = torch.where(side, dx * sign, big)
            nearest = dist.argmin(-1, keepdim=True)  # (B, A, 1)
            there = side.gather(-1, nearest)[..., 0]
            gap = (dist.gather(-1, nearest)[..., 0] - bumper.gather(-1, nearest)[..., 0]) / GAP_SCALE
            closing = -sign * dv.gather(-1, nearest)[..., 0] / SPEED_SCALE
            feats += [torch.where(there, gap.clamp(-0.5, NO_GAP), torch.full_like(gap, NO_GAP)),
                      torch.where(there, closing, torch.zeros_like(closing)), there.to(last.dtype)]
    return torch.stack(feats, dim=-1) * agent_mask[..., None]


class Forecaster(nn.Module):
    """See the module docstring. All tensors batch-first after the leading member axis E."""

    def __init__(self, config: ForecasterConfig):
        super().__init__()
        self.config = c = config
        if c.plan_fusion not in ("early", "late"):
            raise ValueError(f"plan_fusion must be early or late, got {c.plan_fusion!r}")
        early = c.plan_fusion == "early"
        # Early fusion: token inputs [history (L F), neighbours, plan one-hot (H num_actions), is_ego]; late: the
        # same without the plan.
        self.scene_inputs = c.history_len * len(HIST_FEATURES) + (NEIGHBOUR_FEATURES if c.neighbours else 0)
        feats = self.scene_inputs + (self.plan_width if early else 0) + 1
        self.register_buffer("hist_mean", torch.zeros(len(HIST_FEATURES)))
        self.register_buffer("hist_std", torch.ones(len(HIST_FEATURES)))
        self.register_buffer("target_scale", torch.ones(len(TARGET_FEATURES)))
        self.register_buffer("reward_mean", torch.zeros(()))
        # Post-hoc calibration of the predicted spread (validation.calibrate), per horizon step: std' = std_scale x
        # std ** std_power, std in the target's units ([m], [m/s]).
        self.register_buffer("std_scale", torch.ones(c.horizon))
        self.register_buffer("std_power", torch.ones(c.horizon))
        # ... and of the mode probabilities, per member: softmax(mode_temperature x logits) (> 1 sharpens).
        self.register_buffer("mode_temperature", torch.ones(()))
        # Quantiles (UNCERTAINTY_LEVELS) of plan_uncertainty's disagreement and spread on validation data: the
        # planner's fallback thresholds. +inf until validation.calibrate sets them.
        self.register_buffer("uncertainty_quantiles", torch.full((2, len(UNCERTAINTY_LEVELS)), math.inf))
        self.encoder = EnsembleMLP(c.members, [feats, c.width, c.width])
        self.blocks = nn.ModuleList(AgentAttention(c.members, c.width, c.heads) for _ in range(c.blocks))
        self.norm = EnsembleLayerNorm(c.members, c.width)
        self._columns: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        dw = c.width if early else c.decoder_width
        if not early:
            self.plan_encoder = EnsembleMLP(c.members, [self.plan_width, dw, dw])
            self.token_in = EnsembleLinear(c.members, c.width, 2 * dw)
            self.plan_in = EnsembleLinear(c.members, dw, 2 * dw)
            self.mix_norm = EnsembleLayerNorm(c.members, dw)
            self.decoder = EnsembleLinear(c.members, dw, dw)
        per_mode = c.horizon * len(TARGET_FEATURES)
        self.trajectory_head = EnsembleLinear(c.members, dw, c.modes * (1 + 2 * per_mode))
        self.ego_head = EnsembleLinear(c.members, dw, 2 * c.horizon)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints from before the power calibration (their spread was std_scale x std) or the mode temperature.
        state_dict.setdefault(prefix + "std_power", torch.ones_like(self.std_power))
        state_dict.setdefault(prefix + "mode_temperature", torch.ones_like(self.mode_temperature))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def plan_width(self) -> int:
        """Features of one plan: H x num_actions (one-hot) or H x action_dim (continuous)."""
        c = self.config
        return c.horizon * (c.action_dim or c.num_actions)

    def plan_inputs(self, plans: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, N, H) int64 meta-actions (-1: none) or (B, N, H, D) continuous actions (NaN: none) -> (B, N,
        plan_width) features: one-hot rows, or the actions themselves; zeros where there is no action."""
        c = self.config
        B, N, H = plans.shape[:3]
        if c.action_dim:
            assert plans.shape == (B, N, H, c.action_dim) and plans.is_floating_point(), \
                f"continuous plans shape {tuple(plans.shape)} {plans.dtype}, want (B, N, {H}, {c.action_dim}) float"
            return torch.nan_to_num(plans.to(dtype), nan=0.0).reshape(B, N, -1)
        assert plans.shape == (B, N, H) and not plans.is_floating_point(), \
            f"plans shape {tuple(plans.shape)} {plans.dtype}, want (B, N, {H}) int64 meta-actions"
        act = F.one_hot(plans.clamp_min(0), c.num_actions).to(dtype) * (plans >= 0).unsqueeze(-1)
        return act.reshape(B, N, -1)

    def reset_calibration(self) -> None:
        """The raw model's spread and mode probabilities (std_scale 1, std_power 1, mode_temperature 1): what
        training sees, and where `validation.calibrate` starts."""
        self.std_scale.fill_(1.0)
        self.std_power.fill_(1.0)
        self.mode_temperature.fill_(1.0)

    def set_normalisation(self, hist_mean: torch.Tensor, hist_std: torch.Tensor, target_scale: torch.Tensor,
                          reward_mean: float) -> None:
        self.hist_mean.copy_(hist_mean)
        if self.config.mask_absent:  # a feature constant in the training data stays in its units
            self.hist_std.copy_(torch.where(hist_std < 1e-3, torch.ones_like(hist_std), hist_std))
        else:
            self.hist_std.copy_(hist_std.clamp_min(1e-3))
        self.target_scale.copy_(target_scale.clamp_min(1e-3))
        self.reward_mean.fill_(reward_mean)

    def encode(self, history: torch.Tensor, agent_mask: torch.Tensor) -> torch.Tensor:
        """Plan-independent part of the model, once per scene. history: (B, A, L, len(HIST_FEATURES)) ego frame;
        agent_mask: (B, A) bool. Returns (E, B, A, D) tokens: for `late` fusion the agent tokens after attention;
        for `early` fusion the history's share of the first layer's pre-activation (the first layer is affine, so
        adding the plan's share in `decode` is exact)."""
        c = self.config
        B, A, L, Fh = history.shape
        # Fewer slots than `agents` is a scene cropped to its present agents (`planning.present_slots`).
        assert A <= c.agents and (L, Fh) == (c.history_len, len(HIST_FEATURES)), \
            f"history shape {tuple(history.shape)}, want (B, <={c.agents}, {c.history_len}, {len(HIST_FEATURES)})"
        x = self.normalise(history).reshape(B, A, L * Fh)
        if c.neighbours:
            x = torch.cat([x, lane_neighbours(history[:, :, -1], agent_mask)], dim=-1)
        is_ego = torch.zeros(B, A, 1, device=history.device, dtype=history.dtype)
        is_ego[:, 0] = 1.0
        first = self.encoder.layers[0]
        x = torch.cat([x, is_ego], dim=-1).to(first.weight.dtype)
        if c.plan_fusion == "early":
            w_hist, w_ego = first.weight[:, : self.scene_inputs], first.weight[:, -1:]
            flat = x.reshape(1, B * A, -1).expand(c.members, -1, -1)
            pre = torch.baddbmm(first.bias, flat, torch.cat([w_hist, w_ego], dim=1))
            return pre.reshape(c.members, B, A, -1)
        h = self.encoder(x.unsqueeze(0).expand(c.members, -1, -1, -1))
        return self.norm(self._attend(h, agent_mask))

    def normalise(self, history: torch.Tensor) -> torch.Tensor:
        """History features (..., len(HIST_FEATURES)) in their units -> the model's inputs, same shape: standardised
        with the training statistics; with `mask_absent`, zeros in empty frames (absent and not padded: every
        feature 0) and the `present` feature raw (0 / 1)."""
        x = (history - self.hist_mean) / self.hist_std
        if not self.config.mask_absent:
            return x
        filled = (history != 0).any(-1, keepdim=True).to(x.dtype)  # observed, or padded (`pad_history`)
        present = (history[..., PRESENT:PRESENT + 1] > 0.5).to(x.dtype)
        x = x * filled
        return torch.cat([x[..., :PRESENT], present, x[..., PRESENT + 1:]], dim=-1)

    def _attend(self, h: torch.Tensor, agent_mask: torch.Tensor) -> torch.Tensor:
        """Attention blocks over agent tokens h (E, B, A, D) with agent_mask (B, A)."""
        mask = with_ego(agent_mask)  # also keeps every attention row non-empty
        for block in self.blocks:
            h = block(h, mask)
        return h

    def decode(self, tokens: torch.Tensor, history: torch.Tensor, agent_mask: torch.Tensor, plans: torch.Tensor,
               positions_only: bool = False) -> dict[str, torch.Tensor]:
        """Futures of every agent under each of N plans per scene.

        tokens: (E, B, A, D) from `encode`; history: (B, A, L, F) and agent_mask (B, A) the same scenes; plans:
        (B, N, H) int64 ego meta-actions (-1: none), or (B, N, H, D) float continuous actions (NaN: none) for a
        model with `action_dim` D (`plan_inputs`). Returns (E members, B scenes, N plans, A agents, K modes,
        H steps, T targets):
            mean, log_std: (E, B, N, A, K, H, T)  [m], [m/s] in the decision's ego frame; log of std in those units
            logits: (E, B, N, A, K)   mode log-probabilities (log_softmax over K of the head's logits times
                                      the calibrated `mode_temperature`)
            reward: (E, B, N, H)      predicted env reward of each step
            crash_logit: (E, B, N, H) logit of "the ego has crashed by the end of step h"
        with T = 4 (x, y, vx, vy), or T = 2 (x, y) when `positions_only`: a planner's fast path that computes
        only the head's position columns (about half the work per plan).
        """
        c = self.config
        E, B, A, _ = tokens.shape
        N, H, K = plans.shape[1], c.horizon, c.modes
        assert plans.shape[:3] == (B, N, H), f"plans shape {tuple(plans.shape)}, want ({B}, N, {H}[, D])"
        act = self.plan_inputs(plans, tokens.dtype).unsqueeze(0).expand(E, -1, -1, -1)  # (E, B, N, plan_width)
        if c.plan_fusion == "early":
            first, second = self.encoder.layers
            w_plan = first.weight[:, self.scene_inputs: -1]  # (E, H nA, D)
            plan = torch.bmm(act.reshape(E, B * N, -1), w_plan).reshape(E, B, N, 1, -1)
            dt = second.weight.dtype  # the scene's and the plan's shares (fp32 input layer) meet in the network's
            h = second(F.silu(tokens.to(dt)[:, :, None] + plan.to(dt)))  # (E, B, N, A, D)
            mask = agent_mask.repeat_interleave(N, dim=0)  # (B N, A)
            z = self.norm(self._attend(h.reshape(E, B * N, A, -1), mask)).reshape(E, B, N, A, -1)
        else:
            plan = self.plan_encoder(act)
            # Additive and multiplicative (bilinear) mixing of each agent's token with the plan: how a plan moves an
            # agent depends on who it is (the ego follows it, a follower reacts to it, a far vehicle ignores it).
            t_add, t_mul = self.token_in(tokens)[:, :, None].chunk(2, dim=-1)  # (E, B, 1, A, D)
            p_add, p_mul = self.plan_in(F.silu(plan))[:, :, :, None].chunk(2, dim=-1)  # (E, B, N, 1, D)
            # Normalised before the activation: the product term alone made training diverge at the peak lr.
            z = F.relu(self.mix_norm(torch.addcmul(t_add + p_add, t_mul, p_mul)))  # (E, B, N, A, decoder_width)
            z = F.relu(self.decoder(z))
        T = 2 if positions_only else len(TARGET_FEATURES)
        head, zs = self.trajectory_head, z.reshape(E, -1, z.shape[-1])
        # The head's logit, mean and log-std columns as three contiguous outputs, and every small operand below
        # expanded over (A, K, H, T) first: an elementwise op that broadcasts a few values over an inner axis
        # (a scale per target, a baseline per step) runs inner loops of 2-10 elements, 10-20x slower on a CPU
        # than one over whole rows of A K H T.
        logits, mean, log_std = (torch.baddbmm(head.bias[..., cols], zs, head.weight[..., cols]).float()
                                 for cols in self._head_columns(T, tokens.device))
        row = (A, K, H, T)
        L = A * K * H * T
        base = physics_base(history[:, :, -1], H, c.policy_dt, c.residual)[..., :T]  # (B, A, H, T)
        base = base[:, :, None].expand(B, *row).reshape(B, 1, L)
        scale = self.target_scale[:T]

        def tile(v: torch.Tensor) -> torch.Tensor:  # a constant over (H, T), repeated over A and K: (L,)
            return v.expand(row).reshape(L)

        mean = torch.addcmul(base, mean.reshape(E, B, N, L), tile(scale))
        log_std = torch.addcmul(tile(self.std_scale.log()[:, None]),
                                (log_std.reshape(E, B, N, L) + tile(scale.log())).clamp_(LOG_STD_MIN, LOG_STD_MAX),
                                tile(self.std_power[:, None]))
        ego = self.ego_head(z[:, :, :, 0]).float()  # (E, B, N, 2H)
        return {"mean": mean.reshape(E, B, N, *row), "log_std": log_std.reshape(E, B, N, *row),
                "logits": F.log_softmax(logits.reshape(E, B, N, A, K) * self.mode_temperature, dim=-1),
                "reward": ego[..., :H] + self.reward_mean, "crash_logit": ego[..., H:]}

    def _head_columns(self, targets: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Columns of the trajectory head that hold the mode logits (K), and the means and the log-stds of the
        first `targets` target features (each K x H x targets, in that order)."""
        key = (targets, str(device))
        if key not in self._columns:
            c, T = self.config, len(TARGET_FEATURES)
            index = torch.arange(c.modes * (1 + 2 * c.horizon * T), device=device)
            rest = index[c.modes:].reshape(c.modes, 2, c.horizon, T)[..., :targets]
            self._columns[key] = (index[: c.modes], rest[:, 0].reshape(-1), rest[:, 1].reshape(-1))
        return self._columns[key]

    def forward(self, history: torch.Tensor, agent_mask: torch.Tensor,
                actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict each scene's futures under its own action sequence (training and validation).

        history: (B, A, L, len(HIST_FEATURES)) ego frame; agent_mask: (B, A) bool; actions: (B, H) int64 (-1 none), or
        (B, H, D) float (NaN none) with `action_dim` D.
        Returns `decode`'s outputs without the plan axis: mean, log_std (E, B, A, K, H, 4); logits (E, B, A, K);
        reward, crash_logit (E, B, H).
        """
        out = self.decode(self.encode(history, agent_mask), history, agent_mask, actions[:, None])
        return {k: v[:, :, 0] for k, v in out.items()}


def rollout(model: Forecaster, history: torch.Tensor, agent_mask: torch.Tensor,
            plans: torch.Tensor) -> dict[str, torch.Tensor]:
    """Roll N candidate ego action sequences of each of S scenes through every member and mode in one call.

    history: (S, A, L, F) or (A, L, F) for one scene; agent_mask: (S, A) or (A,); plans: (S, N, H) or (N, H) int64
    meta-action indices ((S, N, H, D) or (N, H, D) float with `action_dim` D). Each scene is encoded once and
    decoded under its N plans. Returns
        mean, log_std: (E, S, N, A, K, H, 4); logits: (E, S, N, A, K); reward, crash_logit: (E, S, N, H)
    (the S axis is dropped again when a single scene was passed). Runs on the model's device.
    """
    single = history.dim() == 3
    if single:
        history, agent_mask, plans = history[None], agent_mask[None], plans[None]
    assert history.shape[0] == plans.shape[0] == agent_mask.shape[0], "history, agent_mask and plans need the same S"
    out = model.decode(model.encode(history, agent_mask), history, agent_mask, plans)
    return {k: v[:, 0] for k, v in out.items()} if single else out


def plan_uncertainty(out: dict[str, torch.Tensor], agent_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How unsure the model is about a scene's future under each plan, at the last horizon step, over the agents
    present (the ego included), taking the largest agent:

    - disagreement [m] (epistemic): std across members of each member's expected position, summed over x and y;
    - spread [m] (aleatoric): the predicted std of the position, averaged over modes (by probability) and members,
      summed over x and y.

    out: outputs of `Forecaster.decode` (or `rollout`) with members first: mean, log_std (E, ..., A, K, H, 4),
    logits (E, ..., A, K); agent_mask: (..., A) bool broadcastable to them. Returns two (...) tensors.
    """
    # The last step's positions copied out first, and the sums over modes as (1, K) x (K, 2) products: elementwise
    # kernels over strided slices with an inner axis of 2 are several x slower on a CPU.
    p = out["logits"].exp()[..., None, :]  # (E, ..., A, 1, K)
    last, last_log_std = (out[k][..., -1, :2].to(p.dtype).contiguous() for k in ("mean", "log_std"))  # (E,...,A,K,2)
    expected = torch.matmul(p, last).squeeze(-2)  # (E, ..., A, 2)
    centred = expected - expected.mean(0)
    disagreement = centred.square().mean(0).sqrt().sum(-1)  # (..., A) std across members, summed over x and y
    spread = torch.matmul(p, last_log_std.exp()).squeeze(-2).mean(0).sum(-1)  # (..., A)
    mask = with_ego(agent_mask)
    zero = torch.zeros((), dtype=disagreement.dtype, device=disagreement.device)
    return torch.where(mask, disagreement, zero).amax(-1), torch.where(mask, spread, zero).amax(-1)


def member_subset(model: Forecaster, members: int) -> Forecaster:
    """A forecaster made of the first `members` members of `model` (every parameter has the member axis first;
    buffers are shared statistics). For benchmarks against the ensemble size."""
    import copy

    if members == model.config.members:
        return model
    subset = copy.deepcopy(model)
    subset.config = replace(model.config, members=members)
    for param in subset.parameters():
        param.data = param.data[:members].clone()
    return subset


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""`config.PRECISIONS` -> the dtype of the forecaster's network (`low_precision`) while planning
(`planner.precision`) or imagining (`rl imagined_precision`)."""


def native_bfloat16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CUDA GPU that supports bfloat16, or a CPU with
    AVX512-BF16 or AMX (elsewhere bfloat16 is emulated, slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):  # the GPU asked about, not the current one; emulation does not count
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def planning_precision(setting: str, meta: dict, device: str | torch.device) -> str:
    """`planner.precision` resolved to fp32 or bf16: `auto` is bf16 for a forecaster trained with `fit
    precision=bf16` (its meta.json) on a device with native bfloat16 matmuls, where it plans as in fp32 at about
    twice the speed; fp32 otherwise (a forecaster trained in fp32 chooses other plans where they nearly tie)."""
    if setting != "auto":
        return setting
    trained = meta.get("settings", {}).get("precision", "fp32")
    return "bf16" if trained == "bf16" and native_bfloat16(device) else "fp32"


def native_precision(setting: str, device: str | torch.device) -> str:
    """A precision setting resolved to fp32 or bf16: `auto` is bf16 on a device with native bfloat16 matmuls, fp32
    elsewhere. What `fit precision` (the training forward pass) and `rl imagined_precision` (the imagination's
    network) mean by `auto`, whatever precision the forecaster was trained in (unlike `planning_precision`: Dyna
    on bfloat16 imagination trained policies as good as on fp32 imagination, and a forecaster trained in bf16
    drove as well as one trained in fp32 on the same data: docs/results.md)."""
    if setting != "auto":
        return setting
    return "bf16" if native_bfloat16(device) else "fp32"


def compiled(model: Forecaster) -> Forecaster:
    """`model` with its `decode` (the per-plan network and the decoder's tail) compiled by `torch.compile`:
    inductor fuses the elementwise work between the matmuls (layer norms, activations, residual adds, the
    attention's softmax), which is most of a CPU planning step's network time. Shapes are dynamic, since the
    number of distinct plans and of present agents change from decision to decision. On a CPU inductor emits C++
    (with its C++ wrapper, which saves the Python launch overhead of each kernel): without a C++ compiler on the
    PATH this raises ConfigError. Compiling happens at the first calls (20-50 s on 2 cores). The compiled
    `decode` is bound to the instance, so a deep copy (`member_subset`, `low_precision`) gets its own binding and
    compiles again on its first call; compile last. A compiled model does not pickle."""
    import shutil
    import types

    device = next(model.parameters()).device
    options = {}
    if device.type == "cpu":
        if not (shutil.which("c++") or shutil.which("g++")):
            raise ConfigError("planner.compile=true needs a C++ compiler on the PATH (c++ or g++) for "
                              "torch.compile on a CPU: install one (apt install g++) or leave planner.compile off")
        options["cpp_wrapper"] = True
    model.decode = types.MethodType(torch.compile(Forecaster.decode, dynamic=True, options=options), model)
    return model


def low_precision(model: Forecaster, precision: str = "bf16") -> Forecaster:
    """`model` itself for precision `fp32`; for `bf16` a copy whose parameters are in bfloat16 (the planner's and
    the imagination's fast path on a CPU with native bfloat16 matmuls, and on GPUs), except the scene encoder's
    input layer. Buffers (normalisation, calibration) stay fp32, and so do the inputs and outputs of `encode` /
    `decode`: the network between them runs in bfloat16 (8 significant bits). The input layer stays fp32 because
    it is cheap (once per scene; a plan enters it as a one-hot row) and its inputs are not: a far vehicle's
    position rounded to 8 bits moves by decimetres."""
    import copy

    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
    dtype = PRECISION_DTYPES[precision]
    if dtype == torch.float32:
        return model
    cast = copy.deepcopy(model)
    keep = {id(p) for p in cast.encoder.layers[0].parameters()}
    for param in cast.parameters():
        if id(param) not in keep:
            param.data = param.data.to(dtype)
    cast._columns = {}
    return cast
