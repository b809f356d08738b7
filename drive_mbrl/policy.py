"""The reactive policy: one network, defined once, used everywhere.

`PolicyNet` maps the project's own observation (`features.policy_observation`: the ego and its V nearest tracks
in the ego frame, two history frames, the ego's lane number and target speed) to logits over the scenario's
meta-actions. The same module is trained by plain supervised code (`distill.py`: behaviour cloning of the
planner, DAgger), wrapped in an RLlib RLModule for RL fine-tuning (`rllib.py`), and exported to ONNX
(`export.py`). Input normalisation lives inside the module as buffers, so every user feeds raw features.

Checkpoint folder (files written atomically):

    meta.json   schema version, PolicyConfig, action names, training summary
    best.pt     {"model": state_dict} — what `load_policy` returns

`agent=policy checkpoint=<folder>` drives with it (`PolicyAgent`, greedy).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drive_mbrl import SCHEMA_VERSION, __version__
from drive_mbrl.errors import ConfigError, DataError
from drive_mbrl.features import (
    SceneSpec,
    X,
    Y,
    episode_policy_obs,
    history_stride,
    live_policy_observation,
    live_target_speed,
    policy_obs_dim,
    route_polyline,
)
from drive_mbrl.types import EGO_TRACK

BEST, META = "best.pt", "meta.json"


@dataclass(frozen=True)
class PolicyConfig:
    agents: int = 8
    """V + 1 slots observed (the ego and its V nearest tracks)."""
    num_actions: int = 5
    hidden: int = 256
    layers: int = 2
    history_dt: float = 1.0
    """[s] between the two observed frames (must be a multiple of the recording's frame time)."""
    set_points: bool = True
    """The ego's target speed follows the slots in the observation (policies saved before it existed: False)."""
    route_ahead: tuple[float, ...] = ()
    """[m] distances along the ego's route at which its centre line is observed (`features.route_ahead`: x, y in
    the ego frame, appended last); () observes no route. Where roads turn (intersection, roundabout) it tells the
    policy where its own path goes and how far the junction is."""

    @property
    def obs_dim(self) -> int:
        return policy_obs_dim(self.agents, self.set_points, len(self.route_ahead))

    def scene_spec(self, stride: int) -> SceneSpec:
        return SceneSpec(agents=self.agents, history_len=2, history_stride=stride, horizon=1)


class PolicyNet(nn.Module):
    """MLP policy: obs (B, D) float32 raw features -> logits (B, num_actions). `trunk(obs)` -> (B, hidden) is its
    representation before the head (RLlib's value function is a separate MLP on the normalised observation:
    `rllib.PolicyRLModule`)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.register_buffer("obs_mean", torch.zeros(config.obs_dim))
        self.register_buffer("obs_std", torch.ones(config.obs_dim))
        layers: list[nn.Module] = []
        width = config.obs_dim
        for _ in range(config.layers):
            layers += [nn.Linear(width, config.hidden), nn.Tanh()]
            width = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.num_actions)

    def set_normalisation(self, obs: np.ndarray) -> None:
        """Set the input mean/std from observations (N, D); constant features get std 1."""
        mean, std = obs.mean(0), obs.std(0)
        self.obs_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def trunk(self, obs: torch.Tensor) -> torch.Tensor:
        return self.body((obs - self.obs_mean) / self.obs_std)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(obs))


def save_policy(folder: Path | str, net: PolicyNet, action_names: list[str], extra: dict[str, Any]) -> None:
    """Write best.pt and meta.json atomically into `folder` (created)."""
    from drive_mbrl.data import write_json
    from drive_mbrl.fit import _save_torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_torch(folder / BEST, {"model": net.state_dict()})
    write_json(folder / META, {"schema_version": SCHEMA_VERSION, "package_version": __version__,
                               "kind": "policy", "policy": asdict(net.config), "action_names": list(action_names),
                               **extra})


def load_policy(folder: Path | str, device: str | torch.device = "cpu") -> tuple[PolicyNet, dict[str, Any]]:
    """The policy of a checkpoint folder and its meta.json; raises DataError on a missing or mismatched folder."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / BEST).is_file():
        raise DataError(f"{folder} is not a policy checkpoint (needs {META} and {BEST}; train one with "
                        "`drive-mbrl distill` or `drive-mbrl rl`)")
    meta = json.loads((folder / META).read_text())
    if meta.get("kind") != "policy":
        raise DataError(f"{folder} holds a {meta.get('kind', 'forecaster')!r} checkpoint, not a policy")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"policy {folder} has schema version {meta.get('schema_version')!r}, this drive_mbrl "
                        f"reads {SCHEMA_VERSION}: retrain it")
    config = {"set_points": False, **meta["policy"]}
    net = PolicyNet(PolicyConfig(**{**config, "route_ahead": tuple(config.get("route_ahead", ()))}))
    try:
        net.load_state_dict(torch.load(folder / BEST, map_location="cpu", weights_only=True)["model"])
    except RuntimeError as exc:
        raise DataError(f"policy {folder} does not match the network its meta.json describes") from exc
    return net.to(device).eval(), meta


def episode_observations(config: PolicyConfig, episode: Any, manifest: dict[str, Any]) -> np.ndarray:
    """(S, D) the observations a policy of `config` had at each decision of a recorded episode (`manifest`: its
    dataset's, for the frame time, action names, target speeds and, for a policy that observes its route, the
    scenario that `episode_route` resets)."""
    spec = config.scene_spec(history_stride(config.history_dt, manifest["dt"]))
    route = episode_route(manifest, episode) if config.route_ahead else None
    return episode_policy_obs(episode, spec, manifest if config.set_points else None, route, config.route_ahead)


_ROUTE_ENVS: dict[str, Any] = {}


def episode_route(manifest: dict[str, Any], episode: Any) -> np.ndarray:
    """(P, 2) the ego's `route_polyline` in a recorded episode: the episode's scenario reset with its seed again
    (the route is drawn at the reset, and recordings do not store it). Raises DataError when the reset does not
    put the ego where the recording starts (a dataset of another highway-env version or scenario file)."""
    from drive_mbrl.scenarios import make_env, reset_env, scenario_from_dict

    key = json.dumps(manifest["scenario"], sort_keys=True)
    if key not in _ROUTE_ENVS:
        _ROUTE_ENVS.clear()  # one scenario at a time: datasets come one after another
        _ROUTE_ENVS[key] = make_env(scenario_from_dict(manifest["scenario"], "the dataset's manifest"))
    env = _ROUTE_ENVS[key]
    reset_env(env, int(episode.seed))
    start = episode.state[0, EGO_TRACK, [X, Y]]
    if not np.allclose(env.unwrapped.vehicle.position, start, atol=1e-3):
        raise DataError(f"episode {episode.index} (seed {episode.seed}) does not start where its scenario's reset "
                        f"puts the ego ({start} recorded, {env.unwrapped.vehicle.position} now): its route cannot "
                        "be recovered; collect it again with this highway-env, or train without route_ahead")
    return route_polyline(env)


def dataset_observations(config: PolicyConfig, paths: list[str] | tuple[str, ...]) -> np.ndarray:
    """(N, D) `episode_observations` of every decision of the datasets at `paths`, in order."""
    from drive_mbrl.data import load_dataset

    rows = [np.zeros((0, config.obs_dim), np.float32)]
    for path in paths:
        manifest, episodes = load_dataset(Path(path))
        rows += [episode_observations(config, ep, manifest) for ep in episodes if ep.steps]
    return np.concatenate(rows)


class PolicyAgent:
    """`agent=policy`: greedy actions of a policy checkpoint, observing the live track recording."""

    drives_itself = False

    def __init__(self, checkpoint: str = "", threads: int = 1):
        if not checkpoint:
            raise ConfigError("agent=policy needs checkpoint=<policy folder> (train one with `drive-mbrl distill`)")
        if threads:
            torch.set_num_threads(threads)
        self.net, self.meta = load_policy(checkpoint)
        self._recorder: Any = None
        self._env: Any = None

    def reset(self, env: Any, seed: int) -> None:
        from drive_mbrl.agents import meta_actions

        self._env = env
        self._route = route_polyline(env) if self.net.config.route_ahead else None
        if len(meta_actions(env)) != self.net.config.num_actions:
            raise ConfigError(f"the policy was trained for {self.net.config.num_actions} actions, this scenario "
                              f"has {env.action_space.n}: use a policy trained on this scenario")

    def attach_tracks(self, recorder: Any) -> None:
        self.spec = self.net.config.scene_spec(history_stride(self.net.config.history_dt, recorder.frame_dt))
        self._recorder = recorder

    def observation(self) -> np.ndarray:
        """(D,) the current observation from the live recording (and the ego's set-point from the env)."""
        return live_policy_observation(self._recorder, self.spec,
                                       live_target_speed(self._env, self.net.config.set_points), self._route,
                                       self.net.config.route_ahead)

    def act(self, obs: Any, env: Any) -> int:
        if self._recorder is None:
            raise RuntimeError("PolicyAgent.act before attach_tracks: run it through rollout.EpisodeRunner")
        with torch.inference_mode():
            logits = self.net(torch.as_tensor(self.observation())[None])
        return int(logits.argmax(-1))
