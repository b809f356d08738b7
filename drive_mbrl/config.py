"""Typed configuration of every command: dataclasses are the schema, YAML in configs/ only overrides them.

Each field carries a one-line help and, where it has one, its allowed range or choices in `field(metadata=...)`;
`validate` checks them all in one place and raises ConfigError naming the key and what is allowed. Derived values
(rates, observation sizes) are computed by the code that needs them, never written back here. This module knows
nothing of Hydra: cli.py turns Hydra's config into these dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from drive_mbrl.agents import AGENTS, BUILTIN_AGENTS
from drive_mbrl.errors import ConfigError

EVAL_SEED = 1_000_000
"""Default base seed of evaluation episodes: far from collection's default 0, so they are disjoint by default."""


def opt(default: Any, help: str, lo: float | None = None, hi: float | None = None,
        choices: tuple[Any, ...] | None = None, nonempty: bool = False, pattern: str | None = None) -> Any:
    """A config field with its help text and allowed range [lo, hi], choices or regular expression `pattern` (for
    lists: of each item; `nonempty`: a list that needs at least one item)."""
    metadata = {"help": help, "lo": lo, "hi": hi, "choices": choices, "nonempty": nonempty, "pattern": pattern}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


RISK_MEASURES = ("mean", "cvar", "worst")
"""Risk measures of the planner over sampled plan costs (planning.risk_measure)."""
UNCERTAINTY_LEVELS = (0.9, 0.95, 0.99, 0.995, 0.999)
"""Quantile levels of validation-data uncertainty stored in calibrated forecaster checkpoints (fallback thresholds)."""
PRECISIONS = ("fp32", "bf16")
"""Precisions of the forecaster: the training forward pass (`fit.TrainSettings.precision`) and the planner's network
(`PlannerConfig.precision`)."""
FALLBACKS = ("slower", "least_risk", "policy")
DEVICES = r"auto|cpu|cuda(:\d+)?"
"""The device settings torch takes here (a regular expression for `opt(pattern=)`)."""


@dataclass
class PlannerConfig:
    """The MPC planner (`agent=mpc`): search budget, objective, risk and fallback. See planning.py."""

    budget: int = opt(512, "candidate plans scored per decision, through every member (all iterations together); "
                      "all action sequences are enumerated when they fit, categorical CEM beyond", lo=1, hi=10**6)
    iterations: int = opt(2, "CEM (or MPPI) iterations (the budget is split over them)", lo=1, hi=100)
    continuous_search: str = opt("mppi", "search over continuous action sequences (a forecaster with action_dim > "
                                 "0), warm-started from the previous plan shifted", choices=("mppi", "cem"))
    continuous_std: float = opt(0.3, "initial spread of the continuous search, relative to each action's range",
                                lo=1e-3, hi=10.0)
    mppi_temperature: float = opt(0.5, "MPPI's temperature: samples are weighted by exp(-(cost - min) / this)",
                                  lo=1e-6, hi=1e6)
    elites: float = opt(0.1, "share of each CEM population refitted to", lo=0.001, hi=1.0)
    samples: int = opt(4, "sampled futures per member and plan (mode per agent + one Gaussian draw)", lo=1, hi=4096)
    gamma: float = opt(0.9, "discount over the horizon", lo=0.0, hi=1.0)
    collision_cost: float = opt(10.0, "cost of a predicted collision, on top of the rewards lost after it", lo=0.0,
                                hi=1e6)
    lookahead: int = opt(5, "steps beyond the horizon in which collisions are still charged (gamma-discounted), "
                         "every vehicle keeping its last predicted forward speed and its lane (vehicles behind the "
                         "ego no faster than the ego): sees traps such as "
                         "closing on a car slower than the ego can drive, before the horizon does (0 = off; it "
                         "extrapolates along straight lanes: on curved roads such as roundabout use 0)", lo=0, hi=50)
    dead_end_speed: float = opt(0.0, "[m/s] the ego's lowest holdable speed (highway-fast: 20); > 0 charges a plan "
                                "whose sampled future ends behind a same-lane car slower than this: a dead end, "
                                "collision_cost x gamma^(H - 1 + t_c / dt) with t_c = gap / (speed - leader's "
                                "speed), however far away (0 = off; straight lanes only)", lo=0.0, hi=100.0)
    risk: str = opt("cvar", "risk measure over the sampled costs of a plan", choices=RISK_MEASURES)
    alpha: float = opt(0.2, "CVaR level: mean of the worst alpha share of samples (1 = mean)", lo=1e-6, hi=1.0)
    chance_epsilon: float = opt(0.05, "reject plans whose collision probability (exact over the forecaster's modes) "
                                "exceeds this (1 = off)", lo=0.0, hi=1.0)
    mode_sigma: float = opt(1.0, "the chance constraint's collision probability grows each mode's box by this many "
                            "standard deviations", lo=0.0, hi=10.0)
    chance_steps: int = opt(2, "steps the chance constraint looks ahead (0 = the whole horizon): far-future "
                            "collisions are uncertain for every plan and are left to the cost", lo=0, hi=100)
    epistemic_weight: float = opt(0.0, "cost per metre of member disagreement (aversion to the unknown)", lo=0.0,
                                  hi=1e6)
    explore_weight: float = opt(0.0, "bonus per metre of member disagreement (collect data where the model is "
                                "weak)", lo=0.0, hi=1e6)
    ego_model: str = opt("kinematic", "the ego's own motion under a plan: `kinematic` integrates highway-env's "
                         "controller (exact on straight lanes), `route` drives the ego along its planned route's "
                         "lane centres at the controller's speeds (any road shape; actions without lane changes), "
                         "`learned` takes the forecaster's prediction", choices=("kinematic", "route", "learned"))
    reward: str = opt("auto", "the ego's reward in the objective: `learned` (the forecaster's reward head), "
                      "`kinematic` (highway-env's HighwayEnv reward on the kinematic ego's speed and target lane: "
                      "exact for a step without a collision; highway-v0 / highway-fast-v0 with "
                      "planner.ego_model=kinematic), `auto` (kinematic where it applies, else learned)",
                      choices=("auto", "learned", "kinematic"))
    progress_weight: float = opt(0.02, "cost per m/s of the ego's predicted mean forward speed over the plan "
                                 "(negative cost: a speed incentive beside the reward)", lo=0.0, hi=1e6)
    comfort_weight: float = opt(0.0, "cost per change of action within a plan", lo=0.0, hi=1e6)
    margin_long: float = opt(1.0, "[m] added to the sum of half lengths before vehicles count as colliding", lo=0.0,
                             hi=50.0)
    margin_lat: float = opt(0.5, "[m] added to the sum of half widths (with boxes aligned with the ego frame, a "
                            "vehicle turning into a lane change is wider than its width)", lo=0.0, hi=10.0)
    oriented_boxes: bool = opt(False, "turn each vehicle's box to its direction of travel in each step and test "
                               "the rotated rectangles exactly (separating axes; crossing and turning traffic, the "
                               "ego in a turn); off: boxes aligned with the ego frame, exact for parallel lanes and "
                               "about 4x cheaper")
    substeps: int = opt(5, "collision checks per horizon step (linear interpolation; 5 = every frame of "
                        "highway at 5 Hz: at 2 a fast ego passed a slower car between checks)", lo=1, hi=100)
    uncertainty_level: float = opt(0.999, "fall back when the chosen plan's member disagreement or predicted spread "
                                   "exceeds this quantile of the validation data's", choices=UNCERTAINTY_LEVELS)
    fallback: str = opt("slower", "slower: SLOWER (braking) whenever the planner falls back; least_risk: the least "
                        "risky plan when no plan passes the chance constraint (an untrusted model still gets "
                        "SLOWER); policy: the reactive policy's action (needs planner.policy)",
                        choices=FALLBACKS)
    policy: str = opt("", "reactive policy folder (from `drive-mbrl distill`): a `policy_share` of the first CEM "
                      "population is drawn from its action probabilities, its greedy action held over the horizon "
                      "is always a candidate, and planner.fallback=policy hands fallback steps to it")
    policy_share: float = opt(0.25, "share of the first CEM population proposed by planner.policy", lo=0.0, hi=1.0)
    oracle_depth: int = opt(2, "agent=oracle: policy steps of the exhaustive tree on simulator copies "
                            "(num_actions^depth sequences)", lo=1, hi=6)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", pattern=DEVICES)
    precision: str = opt("auto", "the forecaster's network while planning: fp32, bf16 (bfloat16 layers between "
                         "fp32 inputs and outputs; scoring stays fp32: about 2x faster decisions on a CPU with "
                         "native bfloat16 matmuls (AMX, AVX512-BF16) and on GPUs, slower where it is emulated; "
                         "where candidates nearly tie it can choose another plan), or auto: bf16 for a forecaster "
                         "trained in bf16 (`fit precision=bf16`, or `fit`'s default auto on such a device) on such a "
                         "device, else fp32",
                         choices=("auto", *PRECISIONS))
    threads: int = opt(0, "torch CPU threads of the planner; 0 = torch's default", lo=0, hi=1024)
    compile: bool = opt(False, "compile the forecaster's per-plan network with torch.compile (inductor, dynamic "
                        "shapes; on a CPU it needs a C++ compiler): about 1.2x faster decisions on a CPU after "
                        "20-50 s of compiling in each process (a later process reuses inductor's disk cache); "
                        "bf16 rounding may differ from eager, so near-ties can go another way")
    seed: int = opt(0, "seed of the planner's sampling (each episode adds its own seed)", lo=0, hi=2**31 - 1)


@dataclass
class CollectConfig:
    """`drive-mbrl collect`: run an agent on a scenario and store every vehicle's tracks."""

    scenario: str = opt("highway", "scenario name in scenarios/ or path to your own scenario YAML")
    agent: str = opt("idm", "ego driver", choices=AGENTS)
    checkpoint: str = opt("", "agent=mpc: forecaster checkpoint folder (from `drive-mbrl fit`); agent=policy: "
                                "policy folder (from `drive-mbrl distill`)")
    bundle: str = opt("", "exported bundle folder for agent=onnx (from `drive-mbrl export`)")
    onnx_graph: str = opt("auto", "agent=onnx drives with the bundle's policy or planner graph (auto: the policy "
                          "when the bundle has one)", choices=("auto", "policy", "planner"))
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={"help": "agent=mpc settings"})
    episodes: int = opt(10, "number of episodes (the dataset holds episodes 0 .. episodes-1)", lo=1, hi=10**7)
    seed: int = opt(0, "base seed: episode i is reset with seed + i", lo=0, hi=2**31 - 1)
    workers: int = opt(1, "parallel episode workers (Ray actors when > 1)", lo=1, hi=4096)
    ray_address: str = opt("", "join this Ray cluster (HOST:PORT) instead of starting a local one")
    record_hz: int = opt(0, "[Hz] track recording rate; 0 = every simulation frame", lo=0, hi=1000)
    max_steps: int = opt(0, "cap on policy steps per episode; 0 = the scenario's own end", lo=0, hi=10**6)
    noise: float = opt(0.0, "agent=dagger: share of steps on which a uniformly random action is executed instead "
                       "of the planner's (DART-style noise injection: labels for states just off the planner's path)",
                       lo=0.0, hi=1.0)
    learner: str = opt("", "agent=dagger: policy folder (from `drive-mbrl distill`) that drives while the planner "
                       "labels every step (a DAgger round); empty = the planner drives")
    beta: float = opt(0.3, "agent=dagger with a learner: share of steps on which the planner's action is executed",
                      lo=0.0, hi=1.0)
    replans: int = opt(1, "agent=dagger: planning calls whose relative action costs are averaged into each label "
                       "(soft targets with less of the planner's sampling noise); the first is the planner's own "
                       "decision, so the driving does not change", lo=1, hi=64)
    out: str = opt("", "dataset folder; empty = <run dir>/dataset. Rerun with the same folder to resume")


@dataclass
class EvaluateConfig(CollectConfig):
    """`drive-mbrl evaluate`: closed-loop episodes and safety metrics (held-out seeds by default). The episodes are
    stored like collected ones (and resume the same way); only these defaults differ from collect's."""

    episodes: int = opt(100, "number of evaluation episodes", lo=1, hi=10**7)
    seed: int = opt(EVAL_SEED, "base seed: episode i is reset with seed + i (default disjoint from collect's)",
                    lo=0, hi=2**31 - 1)
    out: str = opt("", "folder for the evaluated episodes; empty = <run dir>/episodes (resumable)")


@dataclass
class BenchCollectConfig:
    """`drive-mbrl bench collect`: collection throughput [steps/s] against the worker count, same seeds."""

    scenario: str = opt("highway", "scenario name or path")
    agent: str = opt("idm", "ego driver", choices=BUILTIN_AGENTS)
    episodes: int = opt(16, "episodes per measurement", lo=1, hi=10**6)
    workers: list[int] = opt([1, 2], "worker counts; the first is the baseline", lo=1, hi=4096, nonempty=True)
    repeats: int = opt(3, "measurements per worker count (alternating); medians are reported", lo=1, hi=100)
    seed: int = opt(0, "base seed", lo=0, hi=2**31 - 1)


def validate(cfg: Any, prefix: str = "") -> Any:
    """Check every field of the dataclass `cfg` (nested ones too, named `outer.inner`) against its metadata;
    returns `cfg` or raises ConfigError naming the key and what is allowed."""
    assert is_dataclass(cfg), f"validate expects a config dataclass, got {type(cfg).__name__}"
    for f in fields(cfg):
        value, meta, key = getattr(cfg, f.name), f.metadata, prefix + f.name
        if is_dataclass(value):
            validate(value, prefix=f"{key}.")
            continue
        items = value if isinstance(value, list) else [value]
        if meta.get("nonempty") and not items:
            raise ConfigError(f"{key}=[] is empty: give at least one value ({key}: {meta['help']})")
        for item in items:
            lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
            if choices is not None and item not in choices:
                raise ConfigError(f"{key}={item!r} is not allowed: choose one of {', '.join(map(str, choices))}")
            if meta.get("pattern") and not re.fullmatch(meta["pattern"], str(item)):
                raise ConfigError(f"{key}={item!r} is not allowed: {meta['help']}")
            # Written as "not inside" so that NaN, which compares False with everything, is out of range too.
            if lo is not None and not item >= lo or hi is not None and not item <= hi:
                raise ConfigError(f"{key}={item!r} is out of range: allowed {lo} <= {key} <= {hi} "
                                  f"({key}: {meta['help']})")
    return cfg


def with_scenario_planner(cfg: Any, explicit: frozenset[str] = frozenset()) -> tuple[Any, dict[str, Any]]:
    """Apply the planner settings that `cfg.scenario`'s file recommends (its `planner:` mapping) to `cfg.planner`,
    except those the user set explicitly (`explicit`: dotted keys as typed on the command line, e.g.
    `planner.lookahead`; `planner` itself covers them all). Precedence: the dataclass default and configs/ YAML <
    the scenario file < the command line. An empty `cfg.scenario` applies nothing. Returns (the
    config, validated; the settings taken from the scenario). Raises ConfigError naming the scenario file when it
    names a setting PlannerConfig does not have, or a value of the wrong type or out of range."""
    if not (getattr(cfg, "scenario", "") and isinstance(getattr(cfg, "planner", None), PlannerConfig)) \
            or "planner" in explicit:
        return cfg, {}
    from drive_mbrl.scenarios import load_scenario

    scenario = load_scenario(cfg.scenario)
    defaults = asdict(PlannerConfig())
    for key, value in scenario.planner.items():
        if key not in defaults:
            raise ConfigError(f"scenario {scenario.source}: planner setting {key!r} does not exist; known: "
                              f"{', '.join(sorted(defaults))}")
        kind = type(defaults[key])
        numeric = kind is float and isinstance(value, int)  # YAML's 1 for 1.0
        if not (isinstance(value, kind) or numeric) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"scenario {scenario.source}: planner.{key}={value!r} must be of type {kind.__name__}")
    taken = {k: v for k, v in scenario.planner.items() if f"planner.{k}" not in explicit}
    cfg = replace(cfg, planner=replace(cfg.planner, **taken))
    try:
        validate(cfg.planner, prefix="planner.")
    except ConfigError as exc:
        raise ConfigError(f"scenario {scenario.source}: {exc}") from exc
    return cfg, taken


@dataclass
class FitConfig:
    """`drive-mbrl fit`: train the forecaster ensemble on one or more datasets of the same scenario."""

    dataset: list[str] = opt([], "dataset folders to train on (e.g. [data/idm,data/random]); required")
    holdout: list[str] = opt([], "datasets with held-out seeds to validate on at the end (default: the val split)")
    calibration: list[str] = opt([], "datasets to calibrate the predicted spread and mode probabilities and the "
                                 "planner's uncertainty limits on (default: the val split). Whole episodes like "
                                 "those the model will face, seeds used neither in training nor in the holdout")
    out: str = opt("", "checkpoint folder; empty = <run dir>/checkpoint. Rerun with the same folder to resume")
    init: str = opt("", "checkpoint to fine-tune from (its architecture and normalisation are used; the "
                    "architecture keys below are then ignored)")
    agents: int = opt(8, "ego + nearest vehicles per scene", lo=2, hi=64)
    history_len: int = opt(5, "history frames per agent (the decision frame included)", lo=1, hi=50)
    history_dt: float = opt(0.2, "[s] between history frames (a multiple of the dataset's dt)", lo=0.01, hi=5.0)
    horizon: int = opt(5, "policy steps predicted (seconds ahead = horizon x policy dt)", lo=1, hi=50)
    members: int = opt(5, "ensemble members", lo=1, hi=64)
    modes: int = opt(3, "Gaussian modes per agent", lo=1, hi=32)
    width: int = opt(128, "token width", lo=8, hi=4096)
    blocks: int = opt(2, "attention blocks across agents", lo=0, hi=16)
    plan_fusion: str = opt("early", "where the ego's plan enters: early (every agent token, accurate) or late "
                           "(a per-plan decoder after the attention: cheaper per plan)", choices=("early", "late"))
    decoder_width: int = opt(128, "width of the late-fusion per-plan decoder", lo=8,
                             hi=4096)
    neighbours: bool = opt(False, "give each agent its lane neighbours (gap and closing speed ahead / behind in its "
                           "own lane and the two beside it) as input features")
    pad_history: bool = opt(False, "fill absent history frames (young tracks, every track at an episode's start) by "
                            "extrapolating back at constant speed instead of zeros")
    mask_absent: bool = opt(True, "absent history frames (young tracks, every track at an episode's start) enter "
                            "the model as zeros after normalisation, not as (0 - mean) / std (false: how checkpoints "
                            "were fitted before, blind at an episode's first decision; docs/results.md)")
    residual: str = opt("cv", "the physics prediction the model's means are a residual to: cv (constant velocity: "
                        "a vehicle in a lane change is extrapolated across the road) or lane (constant velocity "
                        "along each agent's lane, offset from the lane centre held: lane changes predicted far "
                        "better on small data, but not better overall on 22 k scenes, and the planner's settings "
                        "were tuned on cv models; see docs/results.md)",
                        choices=("cv", "lane"))
    heads: int = opt(4, "attention heads (must divide width)", lo=1, hi=64)
    epochs: int = opt(60, "maximum epochs", lo=1, hi=100000)
    batch_size: int = opt(256, "scenes per minibatch", lo=1, hi=1 << 20)
    lr: float = opt(5e-4, "AdamW peak learning rate (one-cycle: warm-up, then cosine decay)", lo=1e-7, hi=1.0)
    patience: int = opt(15, "early stopping: epochs without a better validation NLL", lo=1, hi=100000)
    mode_weight: float = opt(1.0, "weight of a cross-entropy of the mode probabilities against the mode closest to "
                             "the truth (0 = the mixture NLL alone trains them: on 4,411 highway steps the most "
                             "likely mode was then no better than constant velocity in 2 of 3 seeds; "
                             "docs/results.md)", lo=0.0, hi=1000.0)
    ema: float = opt(0.0, "averaging window [epochs] of an exponential moving average of the weights, which is "
                     "validated and checkpointed instead of the raw weights (0 = off)", lo=0.0, hi=1000.0)
    val_fraction: float = opt(0.2, "share of episodes held out for validation (split by env seed: the episodes of "
                              "one seed in different datasets stay together)", lo=0.01, hi=0.9)
    seed: int = opt(0, "seed of initialisation, split and shuffling", lo=0, hi=2**31 - 1)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", pattern=DEVICES)
    threads: int = opt(0, "torch CPU threads; 0 = torch's default", lo=0, hi=1024)
    precision: str = opt("auto", "training forward pass: fp32, bf16 (autocast: 1.7-2x the steps/s on a CPU with "
                         "native bfloat16 matmuls such as AVX512-BF16 or AMX, slower where it is emulated; weights, "
                         "optimiser, loss and validation stay fp32), or auto: bf16 where the device has native "
                         "bfloat16 matmuls, else fp32 (the checkpoint records which; `planner.precision=auto` then "
                         "plans a bf16-trained forecaster in bf16)", choices=("auto", *PRECISIONS))


@dataclass
class ValidateConfig:
    """`drive-mbrl validate`: forecaster figures per horizon against physics baselines, with a report."""

    checkpoint: str = opt("", "forecaster checkpoint folder (from `drive-mbrl fit`); required")
    dataset: list[str] = opt([], "dataset folders to validate on (use seeds never used in training); required")
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", pattern=DEVICES)
    hdr_samples: int = opt(256, "Monte Carlo samples per prediction for coverage", lo=16, hi=100000)
    seed: int = opt(0, "seed of the coverage sampling and the action shuffle", lo=0, hi=2**31 - 1)


@dataclass
class CalibrateConfig:
    """`drive-mbrl calibrate`: a copy of a forecaster checkpoint with its spread, mode temperature and uncertainty
    limits refitted."""

    checkpoint: str = opt("", "forecaster checkpoint folder (from `drive-mbrl fit`); required")
    dataset: list[str] = opt([], "dataset folders to calibrate on: whole episodes like those the model will face, "
                             "seeds used neither in training nor in validation; required")
    out: str = opt("", "folder for the recalibrated copy (not the checkpoint itself); required")
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", pattern=DEVICES)
    seed: int = opt(0, "seed of the calibration's subsampling and coverage sampling", lo=0, hi=2**31 - 1)


@dataclass
class BenchForecasterConfig:
    """`drive-mbrl bench forecaster`: scene-rollouts/s of the forecaster against the number of candidate plans."""

    checkpoint: str = opt("", "forecaster checkpoint; empty = a fresh model of the default size")
    candidates: list[int] = opt([1, 4, 16, 64, 256, 1024, 4096], "numbers N of candidate plans", lo=1, hi=1 << 20,
                                nonempty=True)
    repeats: int = opt(10, "timed calls per N (median reported)", lo=1, hi=10000)
    device: str = opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N", pattern=DEVICES)
    threads: int = opt(0, "torch CPU threads; 0 = torch's default", lo=0, hi=1024)


@dataclass
class BenchPlanConfig:
    """`drive-mbrl bench plan`: MPC decision latency (p50, p99) against candidate budget and ensemble size, with the
    oracle's latency in the same run."""

    checkpoint: str = opt("", "forecaster checkpoint folder; required")
    scenario: str = opt("highway", "scenario whose idm episodes give the scenes")
    budgets: list[int] = opt([64, 256, 512, 1024], "candidate plans per decision", lo=1, hi=10**6, nonempty=True)
    members: list[int] = opt([1, 5], "ensemble sizes (the checkpoint's first members)", lo=1, hi=64, nonempty=True)
    decisions: int = opt(60, "scenes planned per setting", lo=1, hi=10**6)
    oracle_decisions: int = opt(5, "oracle decisions timed (0 = skip the oracle)", lo=0, hi=10**4)
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={"help": "planner settings"})
    seed: int = opt(EVAL_SEED, "seed of the episodes and of the planner's sampling", lo=0, hi=2**31 - 1)


@dataclass
class TrainConfig:
    """`drive-mbrl train`: the model-based RL loop. Seed data from an exploring agent, then per iteration: fit (the
    first) or fine-tune (later) the forecaster on all real data so far, evaluate the planner on it, and collect more
    data with the planner (with its exploration bonus), until the real-step budget is spent."""

    scenario: str = opt("highway", "scenario name or path")
    iterations: int = opt(4, "fit -> evaluate -> collect iterations", lo=1, hi=1000)
    seed_agent: str = opt("explore", "agent that collects the seed data", choices=BUILTIN_AGENTS)
    seed_episodes: int = opt(60, "episodes of seed data", lo=1, hi=10**6)
    episodes_per_iteration: int = opt(30, "planner episodes collected per iteration", lo=0, hi=10**6)
    max_real_steps: int = opt(5000, "real env steps of training data in total (collection stops there)", lo=1,
                              hi=10**9)
    eval_episodes: int = opt(20, "evaluation episodes per iteration (held-out seeds)", lo=1, hi=10**6)
    finetune_epochs: int = opt(15, "epochs of each fine-tuning after the first fit", lo=1, hi=10**5)
    collect_explore_weight: float = opt(0.5, "the planner's exploration bonus while collecting", lo=0.0, hi=1e6)
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=40),
                           metadata={"help": "first fit (dataset/out are set by the loop)"})
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={"help": "planner settings"})
    workers: int = opt(1, "parallel episode workers (Ray actors when > 1)", lo=1, hi=4096)
    seed: int = opt(0, "base seed of collection episodes", lo=0, hi=2**31 - 1)


@dataclass
class DistillConfig:
    """`drive-mbrl distill`: the reactive policy learns the MPC planner. Behaviour cloning on planner episodes
    (soft targets from the planner's per-action costs where logged), then DAgger rounds: the policy drives (the
    planner takes a `beta` share of steps, halved each round), the planner labels every visited state, the policy
    is fine-tuned on all labels so far. Each round is evaluated on held-out seeds; every stage resumes."""

    scenario: str = opt("highway", "scenario name or path")
    dataset: list[str] = opt([], "planner episodes to clone (`drive-mbrl collect agent=dagger checkpoint=...` "
                             "logs the planner's costs; agent=mpc episodes give hard labels); required")
    checkpoint: str = opt("", "the expert planner's forecaster checkpoint (needed for DAgger rounds)")
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={"help": "the expert planner"})
    rounds: int = opt(2, "DAgger rounds after behaviour cloning (0 = behaviour cloning only)", lo=0, hi=100)
    episodes_per_round: int = opt(20, "episodes the policy drives per DAgger round", lo=1, hi=10**6)
    beta: float = opt(0.3, "share of the first round's steps on which the planner's action is executed", lo=0.0,
                      hi=1.0)
    temperature: float = opt(0.3, "soft-target temperature on the planner's costs (0 = hard labels)", lo=0.0,
                             hi=1e3)
    loss: str = opt("ce", "ce: cross-entropy on the (soft) targets; cost: the logits regress the planner's relative "
                    "action costs", choices=("ce", "cost"))
    cost_weight: float = opt(3.0, "with loss=ce: weight of the policy's expected planner cost E_pi[c(a)] added to "
                             "the cross-entropy (pushes mass off actions the planner found dangerous; 0 = plain "
                             "cross-entropy)", lo=0.0, hi=1e3)
    hidden: int = opt(256, "policy hidden width", lo=4, hi=8192)
    layers: int = opt(2, "policy hidden layers", lo=1, hi=16)
    history_dt: float = opt(1.0, "[s] between the policy's two observed frames", lo=0.01, hi=10.0)
    route_ahead: list[float] = opt([], "[m] distances along the ego's route at which the policy observes its centre "
                                   "line (e.g. [5,10,20,30] where roads turn: intersection, roundabout); [] = none")
    epochs: int = opt(150, "maximum epochs per training", lo=1, hi=10**5)
    patience: int = opt(20, "early stopping: epochs without a lower validation loss", lo=1, hi=10**5)
    lr: float = opt(1e-3, "AdamW learning rate", lo=1e-7, hi=1.0)
    eval_episodes: int = opt(20, "held-out evaluation episodes after each round (0 = none)", lo=0, hi=10**6)
    eval_seed: int = opt(EVAL_SEED, "base seed of those episodes (default: the held-out seeds; choose settings on "
                         "other seeds, e.g. 2000000, and report the held-out ones once)", lo=0, hi=2**31 - 1)
    workers: int = opt(1, "parallel episode workers (Ray actors when > 1)", lo=1, hi=4096)
    seed: int = opt(0, "seed of training and of the DAgger episodes", lo=0, hi=2**31 - 1)
    out: str = opt("", "final policy folder; empty = <run dir>/policy")


@dataclass
class RLConfig:
    """`drive-mbrl rl`: PPO (RLlib) on the project's policy network. mode=dyna trains on the learned model's
    imagined rollouts (started from recorded states) mixed with real steps at `real` : `imagined` envs;
    mode=model_free is the same algorithm on the real env only (the sample-efficiency peer). `init` fine-tunes a
    distilled policy. Stops at `iterations` or `max_real_steps`; resumes from its folder."""

    scenario: str = opt("highway", "scenario name or path")
    mode: str = opt("dyna", "dyna (imagined + real) or model_free (real only)", choices=("dyna", "model_free"))
    init: str = opt("", "policy folder to start from (from `drive-mbrl distill`); empty = a fresh network")
    checkpoint: str = opt("", "mode=dyna: the forecaster checkpoint that imagines")
    dataset: list[str] = opt([], "mode=dyna: recorded episodes whose states start the imagined rollouts")
    imagined_horizon: int = opt(10, "imagined steps per rollout at most", lo=1, hi=1000)
    uncertainty_level: float = opt(0.99, "imagined rollouts stop where the members disagree beyond this calibrated "
                                   "quantile", choices=UNCERTAINTY_LEVELS)
    uncertainty_penalty: float = opt(0.0, "reward penalty per unit of disagreement / limit", lo=0.0, hi=1e6)
    crash_head: bool = opt(True, "imagined crashes also drawn from the forecaster's crash probability")
    imagined_ego: str = opt("auto", "the imagined ego's own motion: learned (the forecaster's), kinematic "
                            "(highway-env's controllers under the meta-action; straight multi-lane roads) or auto "
                            "(kinematic where the scenario sets lanes_count)", choices=("auto", "learned", "kinematic"))
    imagined_reward: str = opt("learned", "the imagined reward: learned (the forecaster's reward head: the safer "
                               "policy) or kinematic (highway-env's HighwayEnv reward on the kinematic ego's speed "
                               "and target lane; highway scenarios)", choices=("learned", "kinematic"))
    imagined_crash_margin: list[float] = opt([0.0, 0.0], "[m] longitudinal and lateral margins added to the boxes "
                                             "before an imagined ego counts as crashed", lo=0.0, hi=50.0)
    imagined_precision: str = opt("auto", "the imagining forecaster's network: fp32, bf16 (bfloat16 between fp32 "
                                  "inputs and outputs: about 2.5x the imagined steps/s on a CPU with native "
                                  "bfloat16 matmuls), or auto: bf16 on such a device, fp32 elsewhere",
                                  choices=("auto", *PRECISIONS))
    real: int = opt(1, "real envs per batched step", lo=0, hi=4096)
    imagined: int = opt(127, "imagined envs per batched step (mode=dyna)", lo=0, hi=1 << 20)
    iterations: int = opt(20, "PPO iterations at most", lo=1, hi=10**6)
    batch_size: int = opt(1024, "transitions per PPO iteration", lo=16, hi=1 << 24)
    minibatch_size: int = opt(256, "PPO minibatch", lo=8, hi=1 << 24)
    epochs: int = opt(6, "PPO epochs per iteration", lo=1, hi=1000)
    lr: float = opt(1e-4, "learning rate", lo=1e-8, hi=1.0)
    gamma: float = opt(0.9, "discount", lo=0.0, hi=1.0)
    entropy: float = opt(0.003, "entropy bonus", lo=0.0, hi=10.0)
    max_real_steps: int = opt(5000, "real env steps sampled by RL (input statistics included): no iteration starts "
                              "whose real share, taken as large as the last one's, would pass this (the first one "
                              "always runs); the data behind the forecaster and an init policy are counted apart "
                              "(data_real_steps)", lo=0, hi=10**9)
    norm_steps: int = opt(200, "a fresh network's input statistics: random real steps (mode=model_free; mode=dyna "
                          "takes them from the datasets); counted in the budget", lo=2, hi=10**6)
    hidden: int = opt(256, "policy width (a fresh network; init's own otherwise)", lo=4, hi=8192)
    layers: int = opt(2, "policy hidden layers (a fresh network)", lo=1, hi=16)
    agents: int = opt(8, "slots the policy observes, the ego included (a fresh network)", lo=2, hi=64)
    env_runners: int = opt(0, "RLlib env runner processes (0 = sample in the driver)", lo=0, hi=4096)
    ray_address: str = opt("", "join this Ray cluster (HOST:PORT) instead of starting a local one")
    eval_episodes: int = opt(20, "held-out evaluation episodes of the final policy (0 = none)", lo=0, hi=10**6)
    eval_seed: int = opt(EVAL_SEED, "base seed of those episodes (default: the held-out seeds; choose settings on "
                         "other seeds, e.g. 2000000, and report the held-out ones once)", lo=0, hi=2**31 - 1)
    seed: int = opt(0, "seed of the RL run (its real env seeds are disjoint from evaluation's)", lo=0,
                    hi=2**31 - 1)
    out: str = opt("", "run folder (algorithm state + policy); empty = <run dir>/rl")


@dataclass
class BenchPolicyConfig:
    """`drive-mbrl bench policy`: imagined transitions/s against real env steps/s on the same cores, and the
    reactive policy's decision latency against the planner's on the same scenes (one torch thread)."""

    policy: str = opt("", "policy folder; required")
    checkpoint: str = opt("", "forecaster checkpoint (imagination and planner); required")
    imagination: str = opt("", "a separate forecaster for the imagination env (e.g. a small horizon-1 model fitted "
                           "for Dyna); empty = checkpoint")
    imagined_precision: str = opt("auto", "the imagination's network: auto, fp32 or bf16 (as `rl "
                                  "imagined_precision`)", choices=("auto", *PRECISIONS))
    dataset: list[str] = opt([], "recorded episodes: start states and latency scenes; required")
    scenario: str = opt("highway", "scenario of the real env")
    envs: list[int] = opt([64, 256, 1024], "imagination batch sizes", lo=1, hi=1 << 20, nonempty=True)
    steps: int = opt(10, "batched imagination steps per measurement", lo=1, hi=10**6)
    real_steps: int = opt(150, "real env steps per measurement", lo=1, hi=10**6)
    repeats: int = opt(3, "alternating repeats (medians reported)", lo=1, hi=1000)
    decisions: int = opt(40, "scenes for the latency comparison", lo=1, hi=10**6)
    planner: PlannerConfig = field(default_factory=lambda: PlannerConfig(threads=1),
                                   metadata={"help": "planner settings"})
    seed: int = opt(0, "seed", lo=0, hi=2**31 - 1)


def _pipeline_fit() -> FitConfig:
    return FitConfig(epochs=25, patience=6, members=3, modes=3, width=64, heads=4, blocks=2, decoder_width=64)


@dataclass
class PipelineConfig:
    """`drive-mbrl pipeline`: the main job, every stage on one scenario; rerunning reuses finished stages.

    Stages: collect (each of `collect_agents`) -> evaluate the rule agents on held-out seeds -> fit the forecaster
    on the collected data and validate it on the held-out evaluation episodes -> evaluate the MPC planner on the
    forecaster (same held-out seeds as the rule agents).
    """

    scenario: str = opt("highway", "scenario name in scenarios/ or path to your own scenario YAML")
    collect_agents: list[str] = opt(["idm", "explore"], "agents that collect the training data",
                                    choices=BUILTIN_AGENTS, nonempty=True)
    collect_episodes: int = opt(20, "episodes to collect per collecting agent", lo=1, hi=10**7)
    eval_agents: list[str] = opt(["slower", "idm"], "agents to evaluate", choices=BUILTIN_AGENTS)
    eval_episodes: int = opt(20, "evaluation episodes per agent", lo=1, hi=10**7)
    workers: int = opt(1, "parallel episode workers (Ray actors when > 1)", lo=1, hi=4096)
    seed: int = opt(0, "base seed of collection; evaluation uses seed + 1,000,000", lo=0, hi=2**31 - 1)
    fit: FitConfig = field(default_factory=_pipeline_fit)
    """Forecaster training settings (its dataset/holdout/out are set by the pipeline)."""
    plan_episodes: int = opt(10, "evaluation episodes of the MPC planner (0 skips the stage)", lo=0, hi=10**7)
    planner: PlannerConfig = field(default_factory=PlannerConfig, metadata={"help": "planner settings"})
    expert_episodes: int = opt(20, "planner episodes labelled for the reactive policy (0 skips the policy stages; "
                               "6 with 6 per DAgger round gave a policy that crashed in 9 of 10 episodes, 20 with 10 "
                               "in 2 of 10)", lo=0, hi=10**7)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(rounds=1, episodes_per_round=10,
                                                                         eval_episodes=10),
                                   metadata={"help": "policy distillation (dataset/checkpoint set by the pipeline)"})
    rl_iterations: int = opt(2, "Dyna PPO iterations fine-tuning the distilled policy (0 skips)", lo=0, hi=10**6)
    export_samples: int = opt(200, "random and recorded inputs the ONNX export's parity check compares (0 skips the "
                              "export and onboard stages)", lo=0, hi=10**6)
    export_planner_scenes: int = opt(10, "recorded scenes the exported planning step is checked on (0: no planner "
                                     "graph)", lo=0, hi=10**6)
    onboard_episodes: int = opt(1, "held-out episodes driven from the ONNX bundle without torch", lo=0, hi=10**6)


@dataclass
class ExportConfig:
    """`drive-mbrl export`: an ONNX bundle (forecaster, planning step, policy) with its contract and parity check."""

    checkpoint: str = opt("", "forecaster checkpoint folder (from `drive-mbrl fit`); required")
    scenario: str = opt("", "scenario whose planner settings (its file's `planner:`) the planning step takes; "
                        "empty = the shipped scenario of the checkpoint's env id")
    out: str = opt("", "bundle folder; empty = export/bundles/<checkpoint folder name>. An older bundle there is "
                   "replaced once the new one passed its checks")
    dataset: list[str] = opt([], "datasets whose recorded scenes the parity check runs on (default: the "
                             "checkpoint's training data)")
    samples: int = opt(1000, "random inputs, and recorded scenes, the parity check compares", lo=1, hi=10**6)
    seed: int = opt(0, "seed of the random parity inputs", lo=0, hi=2**31 - 1)
    planner: PlannerConfig = field(default_factory=PlannerConfig,
                                   metadata={"help": "settings of the exported planning step (constants of its "
                                                    "graph); planner.threads also sets torch's CPU threads of "
                                                    "the export and its parity checks"})
    planner_scenes: int = opt(100, "recorded scenes the planner graph is checked on (0: export no planner graph)",
                              lo=0, hi=10**6)
    policy: str = opt("", "reactive policy folder (from `drive-mbrl distill` or `drive-mbrl rl`) to export too")


@dataclass
class BenchExportConfig:
    """`drive-mbrl bench export`: batch-1 latency of each graph of a bundle, onnxruntime against torch eager."""

    bundle: str = opt("", "bundle folder (from `drive-mbrl export`); required")
    repeats: int = opt(2000, "timed calls of the forecaster and the policy (p50 / p99)", lo=10, hi=10**7)
    decisions: int = opt(30, "recorded scenes the planning step is timed on", lo=1, hi=10**6)
    threads: int = opt(1, "CPU threads of both onnxruntime (intra-op) and torch", lo=1, hi=1024)
    dataset: list[str] = opt([], "datasets of the recorded scenes (default: those of the bundle's parity check)")


@dataclass
class ReplayConfig:
    """`drive-mbrl replay`: render one recorded episode (GIF, MP4 when ffmpeg exists, PNG key frames) with the
    planner's plans and predicted futures when the episode has a planning step log."""

    run: str = opt("", "an evaluate or collect run folder, or a dataset folder (holding manifest.json); required")
    episode: int = opt(0, "episode index within the dataset", lo=0, hi=10**7)
    out: str = opt("", "output folder; empty = the replay's run dir")
    hz: float = opt(5.0, "[Hz] rendered frames per second of episode time (0 = every recorded frame); the GIF "
                    "plays in real time", lo=0.0, hi=1000.0)
    key_frames: int = opt(4, "PNG key frames at evenly spaced policy steps", lo=0, hi=1000)
    view: float = opt(0.0, "[m] width of the view that follows the ego; 0 = 160 on long roads (highway, merge), "
                      "90 on compact ones (intersection, roundabout)", lo=0.0, hi=5000.0)
    dpi: int = opt(80, "pixels per inch of the frames (a frame is 12 x 5.2 or 9 x 10 inches)", lo=20, hi=600)
    mp4: bool = opt(True, "also write an MP4 when ffmpeg is installed")


@dataclass
class BenchReplayConfig:
    """`drive-mbrl bench replay`: rendering speed [frames/s] of the replay for the first `steps` policy steps of an
    episode, drawing only and drawing + GIF encoding, medians over repeats."""

    run: str = opt("", "an evaluate or collect run folder, or a dataset folder; required")
    episode: int = opt(0, "episode index", lo=0, hi=10**7)
    steps: int = opt(30, "policy steps rendered (one frame per policy step)", lo=1, hi=10**5)
    repeats: int = opt(3, "timed repeats (median reported)", lo=1, hi=100)
    dpi: int = opt(80, "pixels per inch of the frames", lo=20, hi=600)


PLOT_KINDS = ("learning", "forecaster", "reliability", "evaluation")


@dataclass
class PlotConfig:
    """`drive-mbrl plot`: figures from metrics.json files of earlier runs."""

    kind: str = opt("evaluation", "learning: `train` learning curves; forecaster: error vs horizon against "
                    "baselines (`validate`/`fit`); reliability: calibration (`validate`/`fit`); evaluation: agents "
                    "compared (`evaluate`)", choices=PLOT_KINDS)
    inputs: list[str] = opt([], "metrics.json files or the run folders holding them; required")
    labels: list[str] = opt([], "one legend label per input (default: the run folder's name)")
    out: str = opt("", "PNG path; empty = <run dir>/<kind>.png")
    title: str = opt("", "figure title (default: one naming the kind)")
