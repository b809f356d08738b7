"""RLlib (new API stack) around the project's own policy network: the only module that imports `ray.rllib`.

- `PolicyRLModule`: a TorchRLModule holding `policy.PolicyNet` (the very network distillation trains and export
  writes to ONNX) plus a separate value MLP for PPO; `model_config["init"]` loads a distilled policy.
- `MixedVectorEnv`: one batched env of `real` real-scenario envs (`imagination.PolicyEnv`) and `imagined` envs of
  the learned model (`imagination.ImaginationEnv`); each call steps all of them, so the real : imagined ratio of
  the env steps is real : imagined (of the transitions RLlib trains on, about that: it does not count the step
  an episode's reset takes, and imagined episodes are shorter). `imagined=0` is the model-free peer, `real=0`
  pure imagination.
- `train_ppo`: PPO iterations with progress, resumable checkpoints (the algorithm's state and the policy folder,
  written to a temp folder, then renamed) and a budget on real env steps.

Why PPO (not DQN): the learned model gives fresh on-policy rollouts cheaply and in large batches, which is what
PPO consumes; short, truncated imagined rollouts are handled by GAE bootstrapping from the value head; and PPO's
clipped update keeps a distilled policy close to where distillation left it, while DQN would first have to learn
Q-values consistent with the distilled policy's logits before it could improve on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule

from drive_mbrl.data import atomic_folder
from drive_mbrl.errors import ConfigError
from drive_mbrl.policy import PolicyConfig, PolicyNet, load_policy, save_policy


class PolicyRLModule(TorchRLModule, ValueFunctionAPI):
    """model_config: {"policy": asdict(PolicyConfig), "init": policy folder or "", "norm": [mean, std] input
    statistics for a fresh network (D floats each), or None}."""

    def setup(self) -> None:
        config = PolicyConfig(**self.model_config["policy"])
        self.policy = PolicyNet(config)
        if self.model_config.get("init"):
            net, _ = load_policy(self.model_config["init"])
            self.policy.load_state_dict(net.state_dict())
        elif self.model_config.get("norm"):
            mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in self.model_config["norm"])
            self.policy.obs_mean.copy_(mean)
            self.policy.obs_std.copy_(std)
        self.value = torch.nn.Sequential(torch.nn.Linear(config.obs_dim, config.hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(config.hidden, config.hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(config.hidden, 1))

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return {Columns.ACTION_DIST_INPUTS: self.policy(batch[Columns.OBS])}

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        obs = batch[Columns.OBS]
        return self.value((obs - self.policy.obs_mean) / self.policy.obs_std).squeeze(-1)


class MixedVectorEnv(gym.vector.VectorEnv):
    """`real` real envs followed by `imagined` model envs, stepped together (gymnasium next-step autoreset)."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: dict[str, Any]):
        from drive_mbrl.imagination import ImaginationConfig, ImaginationEnv, PolicyEnv, observation_space

        torch.set_num_threads(1)
        self.n_real, self.n_imagined = int(config.get("real", 1)), int(config.get("imagined", 0))
        # RLlib hands the env creator a plain dict without the worker index; each runner's first reset brings
        # its seed instead (RLlib's seed + worker index), which `reset` turns into the real envs' seed blocks.
        self.base_seed = seed = int(config.get("seed", 0))
        self.real = [PolicyEnv({"scenario": config["scenario"], "agents": config["agents"],
                                "history_dt": config["history_dt"], "set_points": config.get("set_points", True),
                                "seed_offset": seed + 100_000 * i})
                     for i in range(self.n_real)]
        self.imagined = None
        if self.n_imagined:
            self.imagined = ImaginationEnv(ImaginationConfig(**config["imagination"], seed=seed), self.n_imagined)
        self.num_envs = self.n_real + self.n_imagined
        self.single_observation_space = observation_space(config["agents"], config.get("set_points", True))
        self.single_action_space = self.real[0].action_space if self.real else self.imagined.single_action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self._done = np.zeros(self.n_real, bool)
        self.real_steps = 0
        """Real simulator steps taken so far (reset calls excluded): the exact real-data count."""

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """seed (RLlib's first reset of a runner: its seed + the worker index w): real env i then plays the seeds
        from base + 1,000 w + 100,000 i on, so runners never replay each other's scenarios."""
        worker = None if seed is None else max(0, int(seed) - self.base_seed)
        obs = [env.reset(seed=None if worker is None else self.base_seed + 1_000 * worker + 100_000 * i)[0]
               for i, env in enumerate(self.real)]
        if self.imagined is not None:
            obs += list(self.imagined.reset(seed=seed)[0])
        self._done[:] = False
        return np.stack(obs).astype(np.float32), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions)
        obs, rew, term, trunc = [], [], [], []
        for i, env in enumerate(self.real):
            if self._done[i]:
                o, r, te, tr = env.reset()[0], 0.0, False, False
            else:
                o, r, te, tr, _ = env.step(int(actions[i]))
                self.real_steps += 1
            self._done[i] = te or tr
            obs.append(o)
            rew.append(r)
            term.append(te)
            trunc.append(tr)
        if self.imagined is not None:
            o, r, te, tr, _ = self.imagined.step(actions[self.n_real:])
            obs, rew, term, trunc = obs + list(o), rew + list(r), term + list(te), trunc + list(tr)
        return (np.stack(obs).astype(np.float32), np.asarray(rew, np.float32), np.asarray(term, bool),
                np.asarray(trunc, bool), {})

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.real:
            env.close()


ENV_NAME = "drive_mbrl_mixed"


def make_mixed_env(config: dict[str, Any]) -> MixedVectorEnv:
    """RLlib env creator (vector entry point: RLlib passes num_envs; the split comes from `real`/`imagined`)."""
    n = int(config.get("num_envs", 1))
    if n != int(config.get("real", 1)) + int(config.get("imagined", 0)):
        raise ConfigError(f"num_envs {n} != real + imagined ({config.get('real')} + {config.get('imagined')})")
    return MixedVectorEnv(config)


@dataclass(frozen=True)
class PPOSettings:
    iterations: int = 20
    batch_size: int = 1024
    """Transitions per PPO iteration (real + imagined)."""
    minibatch_size: int = 256
    epochs: int = 6
    lr: float = 1e-4
    gamma: float = 0.9
    lambda_: float = 0.95
    clip: float = 0.2
    entropy: float = 0.003
    real: int = 1
    """Real envs per batched step."""
    imagined: int = 0
    """Imagined envs per batched step."""
    max_real_steps: int = 5000
    """Training stops once this many real env steps were sampled."""
    seed: int = 0


def check_resources(env_runners: int) -> None:
    """RLlib hangs without a message when asked for more CPUs than the cluster has: refuse that here."""
    import ray

    available = int(ray.available_resources().get("CPU", 0))  # free now: other jobs on a cluster hold theirs
    if env_runners + 1 > available:
        raise ConfigError(f"{env_runners} env runner(s) + 1 learner need {env_runners + 1} CPUs, the Ray cluster has "
                          f"{available} free: lower env_runners")


def build_ppo(env_config: dict[str, Any], policy: PolicyConfig, init: str, settings: PPOSettings,
              env_runners: int = 0, norm: list[list[float]] | None = None) -> Any:
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    check_resources(env_runners)
    register_env(ENV_NAME, make_mixed_env)
    n = settings.real + settings.imagined
    config = (
        PPOConfig()
        .environment(env=ENV_NAME, env_config={**env_config, "real": settings.real,
                                                     "imagined": settings.imagined, "seed": settings.seed})
        .env_runners(num_env_runners=env_runners, num_envs_per_env_runner=n,
                     gym_env_vectorize_mode="vector_entry_point", rollout_fragment_length="auto")
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=settings.batch_size, minibatch_size=settings.minibatch_size,
                  num_epochs=settings.epochs, lr=settings.lr, gamma=settings.gamma, lambda_=settings.lambda_,
                  clip_param=settings.clip, entropy_coeff=settings.entropy, vf_clip_param=10.0)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=PolicyRLModule,
                                               model_config={"policy": asdict(policy), "init": init,
                                                             "norm": norm}))
        .debugging(seed=settings.seed)
    )
    return config.build_algo()


def real_steps_taken(algo: Any) -> int:
    """Real simulator steps the MixedVectorEnvs of every env runner took since they were built."""
    counts = algo.env_runner_group.foreach_env_runner(
        lambda runner: getattr(getattr(runner, "env", None), "unwrapped", None) and runner.env.unwrapped.real_steps)
    return int(sum(c or 0 for c in counts))


def train_ppo(env_config: dict[str, Any], policy: PolicyConfig, action_names: list[str], init: str,
              settings: PPOSettings, out: Path, env_runners: int = 0,
              on_iteration: Callable[[dict[str, Any]], None] | None = None,
              norm: list[list[float]] | None = None, real_steps_before: int = 0) -> dict[str, Any]:
    """PPO until `settings.iterations` or the real-step budget; resumes from out/algo. The policy after every
    iteration is in out/policy (a `policy.load_policy` folder). Real steps are counted exactly (the envs' own
    counters, plus `real_steps_before` spent before PPO, e.g. on input statistics). Returns the history; its
    `episode_return_mean` is RLlib's over the training episodes, real and imagined mixed (imagined ones are short),
    so it tracks training only — driving figures come from evaluation."""
    import json

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "history.json"
    history = json.loads(state_file.read_text()) if state_file.is_file() else []
    algo = build_ppo(env_config, policy, init, settings, env_runners, norm)
    try:
        if history:
            saved = next((d for d in (out / "algo", out / ".algo.old") if d.is_dir()), None)
            if saved is None:
                raise ConfigError(f"{out} has a training history but no saved algorithm state: use a new out folder")
            algo.restore_from_path(str(saved.resolve()))
        real_steps_before = history[0].get("real_steps_before", real_steps_before) if history else real_steps_before
        base = history[-1]["real_steps"] if history else real_steps_before
        for it in range(len(history), settings.iterations):
            # Stop before an iteration whose real share (as large as the last one's) would pass the budget.
            spent = history[-1]["real_steps"] if history else base
            before = history[-2]["real_steps"] if len(history) > 1 else base
            if spent >= settings.max_real_steps or spent + (spent - before) > settings.max_real_steps:
                break
            result = algo.train()
            runners = result.get("env_runners", {})
            sampled = int(runners.get("num_env_steps_sampled_lifetime", 0))
            real = base + real_steps_taken(algo)
            row = {"iteration": it, "env_steps": sampled, "real_steps": real, "real_steps_before": real_steps_before,
                   "imagined_steps": max(0, sampled - (real - real_steps_before)),
                   "episode_return_mean": float(runners.get("episode_return_mean", float("nan")))}
            atomic_folder(out / "algo", lambda tmp: algo.save_to_path(str(tmp.resolve())))
            net = algo.get_module().policy
            save_policy(out / "policy", net, action_names, {"ppo": asdict(settings), "iteration": it,
                                                             "real_steps": row["real_steps"]})
            history.append(row)
            from drive_mbrl.data import write_json

            write_json(state_file, history)
            if on_iteration:
                on_iteration(row)
    finally:
        algo.stop()
    return {"history": history, "policy": str(out / "policy")}
