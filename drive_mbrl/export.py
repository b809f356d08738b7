"""ONNX bundles of the trained models, with their contract and a parity check against torch.

`export_bundle` writes a folder that onboard.py runs with onnxruntime alone:

    contract.json    schema version, package version, source checkpoint and the sha256 of its weights, scene layout
                     (feature order, units, frame, rates), action meanings, and per graph: file, sha256, opset and
                     every input and output (name, shape with symbolic axes, dtype, units, meaning)
    forecaster.onnx  the forecaster ensemble: history, agent_mask, plans -> every member's and mode's futures
    planner.onnx     the whole planning step (export_planner.py): scene, ego state, noise -> the action to execute
    policy.onnx      the reactive policy: observation -> logits and the greedy action
    parity.json      onnxruntime against torch on random and on recorded inputs, per output

Normalisation sits inside the graphs (the forecaster's buffers), batch axes are dynamic, and each graph is one file
(weights inside, no side `.onnx.data`). The bundle is written into a temp folder beside `out` and renamed into place
only after `onnx.checker` and the parity checks passed (outputs within `PARITY_TOLERANCE`; the planner's action
equal to torch's on every recorded scene given the same noise, for two noise draws); a failure raises ExportError
and leaves no bundle.
Exports use torch's TorchScript-based exporter (`dynamo=False`): the dynamo exporter needs the onnxscript package,
which this project does not install.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drive_mbrl import __version__
from drive_mbrl.config import PlannerConfig
from drive_mbrl.data import atomic_folder, write_json
from drive_mbrl.errors import ConfigError, DriveMbrlError
from drive_mbrl.features import HIST_FEATURES, TARGET_FEATURES, Scenes
from drive_mbrl.forecaster import Forecaster
from drive_mbrl.onboard import BUNDLE_SCHEMA_VERSION, CONTRACT, PARITY, make_session, sha256_file, tensor_spec

OPSET = 17
PARITY_TOLERANCE = 1e-5
"""Largest difference allowed between onnxruntime and torch on any output element: absolute for values up to 1,
relative beyond (`check_parity`)."""
PARITY_RULE = "|onnxruntime - torch| <= tolerance * max(1, |torch|) for every output element"
HIST_UNITS = ("m", "m", "m/s", "m/s", "1", "1", "m", "m", "m", "1", "1", "1")
"""Units of HIST_FEATURES, in order."""
FRAME = ("ego frame at the decision: origin at the ego, x along its heading, y to its right (highway-env's "
         "convention); velocities rotated into it, not relative")


class ExportError(DriveMbrlError):
    """An export failed its checks (onnx.checker or parity with torch); no bundle was written."""


# ---------------------------------------------------------------------------------------------------------------
# The forecaster graph


class ForecasterGraph(nn.Module):
    """`Forecaster.encode` then `decode` as one graph: history (B, A, L, F) float32, agent_mask (B, A) bool,
    plans (B, N, H) int64 -> mean, log_std (E, B, N, A, K, H, 4), logits (E, B, N, A, K), reward,
    crash_logit (E, B, N, H): the outputs of `forecaster.rollout` for B scenes."""

    def __init__(self, model: Forecaster):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, agent_mask: torch.Tensor,
                plans: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.decode(self.model.encode(history, agent_mask), history, agent_mask, plans)
        return tuple(out[k] for k in FORECASTER_OUTPUTS)


FORECASTER_OUTPUTS = ("mean", "log_std", "logits", "reward", "crash_logit")


def forecaster_contract(model: Forecaster) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the forecaster graph (B scenes, N plans per scene: dynamic)."""
    c = model.config
    E, A, L, H, K, F, T = c.members, c.agents, c.history_len, c.horizon, c.modes, len(HIST_FEATURES), 4
    return {
        "inputs": [
            tensor_spec("history", ["B", A, L, F], "float32", "per feature: scene.hist_units",
                        "the ego (slot 0) and its A-1 nearest tracks over L history frames (oldest first), features "
                        "in scene.hist_features order, in the ego frame at the decision; zeros where absent"),
            tensor_spec("agent_mask", ["B", A], "bool", "1", "slot holds a track present at the decision"),
            tensor_spec("plans", ["B", "N", H], "int64", "action index",
                        "N candidate ego meta-action sequences per scene (indices into actions; -1: none)"),
        ],
        "outputs": [
            tensor_spec("mean", [E, "B", "N", A, K, H, T], "float32", "m, m, m/s, m/s",
                        "per member, plan, agent and mode: the mean of x, y, vx, vy at each horizon step, ego frame "
                        "at the decision"),
            tensor_spec("log_std", [E, "B", "N", A, K, H, T], "float32", "log of m, m, m/s, m/s",
                        "log of the std of each Gaussian mode (diagonal)"),
            tensor_spec("logits", [E, "B", "N", A, K], "float32", "log probability",
                        "mode log-probabilities (log_softmax over K)"),
            tensor_spec("reward", [E, "B", "N", H], "float32", "env reward",
                        "predicted env reward of each horizon step"),
            tensor_spec("crash_logit", [E, "B", "N", H], "float32", "logit",
                        "logit of 'the ego has crashed by the end of step h'"),
        ],
    }


def random_scene_inputs(model: Forecaster, count: int, plans_per_scene: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` random scenes drawn around the training statistics (history = mean + std x N(0, 1) per feature,
    about a third of the slots empty, random plans with some -1), as forecaster inputs."""
    c = model.config
    A, L, F = c.agents, c.history_len, len(HIST_FEATURES)
    noise = torch.randn(count, A, L, F, generator=generator)
    history = model.hist_mean + model.hist_std * noise
    mask = torch.rand(count, A, generator=generator) > 0.35
    mask[:, 0] = True
    history = history * mask[:, :, None, None]
    plans = torch.randint(-1, c.num_actions, (count, plans_per_scene, c.horizon), generator=generator)
    return {"history": history, "agent_mask": mask, "plans": plans}


def recorded_scene_inputs(model: Forecaster, scenes: Scenes, count: int, plans_per_scene: int,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Up to `count` recorded scenes (evenly spread over `scenes`), each with its own recorded actions as the first
    plan and random plans after it."""
    pick = np.linspace(0, len(scenes) - 1, min(count, len(scenes))).round().astype(np.int64)
    actions = torch.as_tensor(scenes.actions[pick])[:, None]
    extra = torch.randint(0, model.config.num_actions, (len(pick), plans_per_scene - 1, model.config.horizon),
                          generator=generator)
    return {"history": torch.as_tensor(scenes.history[pick]), "agent_mask": torch.as_tensor(scenes.agent_mask[pick]),
            "plans": torch.cat([actions, extra], dim=1)}


# ---------------------------------------------------------------------------------------------------------------
# Export, check and parity (any graph)


def export_graph(module: nn.Module, example: dict[str, torch.Tensor], contract: dict[str, Any], path: Path) -> None:
    """torch.onnx.export `module` (called with the example inputs in contract order) into the single file `path`,
    with every lettered axis of the contract dynamic, then run onnx.checker on it."""
    import onnx

    names_in = [t["name"] for t in contract["inputs"]]
    names_out = [t["name"] for t in contract["outputs"]]
    dynamic = {t["name"]: {i: s for i, s in enumerate(t["shape"]) if isinstance(s, str)}
               for t in contract["inputs"] + contract["outputs"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about asserts on shapes (they hold for every batch size)
        torch.onnx.export(module.eval(), tuple(example[n] for n in names_in), str(path), input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    _set_output_shapes(proto, contract["outputs"])
    onnx.save(proto, str(path))  # well under protobuf's 2 GB: one file, weights inside
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path.name}: {exc}") from exc


def _set_output_shapes(proto: Any, outputs: list[dict[str, Any]]) -> None:
    """Write the contract's output shapes (fixed sizes and axis letters) into the graph's output declarations
    (the tracer leaves generated names such as 'Addmean_dim_0' where it could not infer a size)."""
    by_name = {t["name"]: t for t in outputs}
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, by_name[value.name]["shape"], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def batches(inputs: dict[str, torch.Tensor], sizes: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive slices of the inputs (first axis) of the given sizes, cycling through `sizes`."""
    total, start, i = len(next(iter(inputs.values()))), 0, 0
    while start < total:
        size = sizes[i % len(sizes)]
        yield {k: v[start: start + size] for k, v in inputs.items()}
        start, i = start + size, i + 1


def parity(session: Any, reference: Callable[..., tuple[torch.Tensor, ...]], contract: dict[str, Any],
           inputs: dict[str, torch.Tensor], sizes: list[int]) -> dict[str, Any]:
    """Max absolute and relative difference between onnxruntime and torch per output, over `inputs` fed in
    batches of `sizes` (several batch sizes exercise the dynamic axes)."""
    names_in = [t["name"] for t in contract["inputs"]]
    names_out = [t["name"] for t in contract["outputs"]]
    worst = {n: 0.0 for n in names_out}
    scaled = {n: 0.0 for n in names_out}
    scale = {n: 0.0 for n in names_out}
    count = 0
    with torch.no_grad():
        for batch in batches(inputs, sizes):
            expected = reference(*(batch[n] for n in names_in))
            got = session.run(names_out, {n: batch[n].numpy() for n in names_in})
            for name, e, g in zip(names_out, expected, got, strict=True):
                e = e.numpy()
                if e.shape != g.shape:
                    raise ExportError(f"output {name}: onnxruntime gave shape {g.shape}, torch {e.shape}")
                both_inf = np.isinf(e) & (e == g)
                diff = np.where(both_inf, 0.0, np.abs(e.astype(np.float64) - g.astype(np.float64)))
                diff = np.nan_to_num(diff, nan=np.inf)
                worst[name] = max(worst[name], float(diff.max(initial=0.0)))
                relative = diff / np.maximum(1.0, np.abs(np.where(np.isfinite(e), e, 0.0)))
                scaled[name] = max(scaled[name], float(relative.max(initial=0.0)))
                scale[name] = max(scale[name], float(np.abs(np.where(np.isfinite(e), e, 0)).max(initial=0.0)))
            count += len(batch[names_in[0]])
    return {"inputs": count, "max_abs_error": worst, "max_scaled_error": scaled, "max_abs_value": scale}


def check_parity(graph: str, figures: dict[str, dict[str, Any]], tolerance: float = PARITY_TOLERANCE) -> None:
    """Raise ExportError if any output element of any input set differs from torch by more than
    `tolerance` x max(1, |torch value|): `tolerance` absolute up to 1, relative beyond (float32 itself resolves
    positions of 256-512 m only to 3e-5 m, so an absolute bound cannot hold there)."""
    for kind, row in figures.items():
        for name, error in row["max_scaled_error"].items():
            if not error <= tolerance:
                raise ExportError(f"{graph} parity failed on {kind} inputs: output {name} differs from torch by "
                                  f"{row['max_abs_error'][name]:.3g} (scaled {error:.3g}, largest |value| "
                                  f"{row['max_abs_value'][name]:.3g}), more than {tolerance:g}; no bundle was "
                                  "written")


def scene_contract(model: Forecaster, meta: dict[str, Any]) -> dict[str, Any]:
    """The bundle-wide description of scenes, rates and actions."""
    c = model.config
    return {
        "hist_features": list(HIST_FEATURES), "hist_units": list(HIST_UNITS),
        "target_features": list(TARGET_FEATURES), "frame": FRAME,
        "agents": c.agents, "history_len": c.history_len, "history_dt": meta["history_dt"],
        "horizon": c.horizon, "policy_dt": c.policy_dt,
        "pad_history": c.pad_history,
        "absent_frames": "features.pad_history (constant speed back from the next present frame, present 0)"
                         if c.pad_history else "zeros",
        "normalisation": "inside the graphs (hist_mean / hist_std below are for reference only)",
        "hist_mean": model.hist_mean.tolist(), "hist_std": model.hist_std.tolist(),
    }


def write_bundle(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `build(tmp)` on a fresh temp folder beside `out` (it writes the files and returns the contract), write
    the contract, then swap the folder into place (`data.atomic_folder`): nothing is left behind when `build`
    raises, and an older bundle is replaced only by a complete one."""

    def build_with_contract(tmp: Path) -> dict[str, Any]:
        contract = build(tmp)
        write_json(tmp / CONTRACT, contract)
        return contract

    return atomic_folder(Path(out), build_with_contract)


def export_forecaster(model: Forecaster, folder: Path, scenes: Scenes, samples: int,
                      seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """forecaster.onnx in `folder`, checked against torch on `samples` random and `samples` recorded scenes.
    Returns its contract entry and parity figures."""
    contract = forecaster_contract(model)
    graph = ForecasterGraph(model).eval()
    gen = torch.Generator().manual_seed(seed)
    path = folder / "forecaster.onnx"
    export_graph(graph, random_scene_inputs(model, 2, 3, gen), contract, path)
    session = make_session(path)
    figures = {"random": parity(session, graph, contract, random_scene_inputs(model, samples, 4, gen), [1, 7, 32]),
               "recorded": parity(session, graph, contract, recorded_scene_inputs(model, scenes, samples, 4, gen),
                                  [1, 7, 32])}
    check_parity("forecaster", figures)
    entry = {"file": path.name, "sha256": sha256_file(path), "opset": OPSET,
             "exporter": f"torch {torch.__version__} torch.onnx (TorchScript)", **contract}
    return entry, figures


def export_planner(model: Forecaster, folder: Path, scenes: Scenes, settings: PlannerConfig, manifest: dict[str, Any],
                   scene_count: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """planner.onnx in `folder`: the whole planning step under `settings` for the scenario of `manifest`, checked
    on `scene_count` recorded scenes (with the same noise, on both of `planner_parity`'s noise draws, every chosen
    action must equal torch's). Returns its
    contract entry and parity figures."""
    from drive_mbrl.export_planner import (
        PlannerGraph,
        planner_contract,
        planner_description,
        planner_inputs,
        planner_parity,
        scene_ego_state,
        step_noise,
    )

    resolved = manifest["env_config_resolved"]
    frames_per_step = int(resolved["simulation_frequency"]) // int(resolved["policy_frequency"])
    sim_dt, lanes, names = 1.0 / int(resolved["simulation_frequency"]), int(resolved.get("lanes_count", 3)), \
        list(manifest["action_names"])
    from drive_mbrl.mpc import ego_reward_spec

    reward = ego_reward_spec(manifest["scenario"]["env_id"], resolved, settings,
                             manifest.get("action_space") == "continuous")
    graph = PlannerGraph(model, settings, names, frames_per_step, sim_dt, reward).eval()
    contract = planner_contract(model, settings)
    warm = np.full(model.config.horizon, names.index("IDLE"))
    example = planner_inputs(model, settings, scenes.history[0], scenes.agent_mask[0], warm,
                             scene_ego_state(scenes.history[0], lanes),
                             step_noise(model, settings, torch.Generator().manual_seed(seed)))
    path = folder / "planner.onnx"
    export_graph(graph, example, contract, path)
    figures = planner_parity(make_session(path), graph, contract, scenes, scene_count, lanes, seed)
    counts, n = figures["counts"], figures["scenes"]
    if min(counts["same_noise"], counts["same_noise_b"], counts["same_plan"], counts["same_reason"]) < n \
            or counts["cost_mismatch"]:
        raise ExportError(f"planner parity failed: with the same noise onnxruntime chose torch's action on only "
                          f"{counts['same_noise']} and {counts['same_noise_b']} (two noise draws) of {n} recorded "
                          f"scenes, its plan on {counts['same_plan']}, its fallback reason on "
                          f"{counts['same_reason']}, and its cost differed on {counts['cost_mismatch']} (independent "
                          f"noise: ONNX vs torch {counts['independent']}, torch vs torch {counts['torch_self']}); no "
                          "bundle was written")
    entry = {"file": path.name, "sha256": sha256_file(path), "opset": OPSET,
             "exporter": f"torch {torch.__version__} torch.onnx (TorchScript)",
             **planner_description(settings, names, frames_per_step, sim_dt, reward),
             **contract}
    return entry, figures


class PolicyGraph(nn.Module):
    """`policy.PolicyNet` with its greedy action: obs (B, D) float32 raw features -> logits (B, num_actions),
    action (B,) int64 (argmax; normalisation is inside the network)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(obs)
        return logits, logits.argmax(-1)


def policy_contract(net: Any) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of the policy graph (B observations: dynamic)."""
    c = net.config
    return {
        "inputs": [tensor_spec("obs", ["B", c.obs_dim], "float32", "per feature: policy.observation_units",
                               "features.policy_observation: every slot's policy.observation_features flattened "
                               "slot-major (the ego first, then its nearest tracks), then policy.ego_features "
                               "(the ego's lane number, its target speed when policy.set_points, then the route "
                               "points of policy.route_ahead: features.route_ahead); raw values "
                               "(normalisation is inside the graph)")],
        "outputs": [tensor_spec("logits", ["B", c.num_actions], "float32", "logit", "action logits"),
                    tensor_spec("action", ["B"], "int64", "action index", "the greedy action (argmax of logits)")],
    }


def policy_observations(net: Any, datasets: list[str], count: int) -> np.ndarray:
    """Up to `count` recorded policy observations (N, D) from the episodes of `datasets`, evenly spread."""
    from drive_mbrl.policy import dataset_observations

    obs = dataset_observations(net.config, datasets)
    return obs[np.linspace(0, len(obs) - 1, min(count, len(obs))).round().astype(np.int64)]


def export_policy(policy: Path, folder: Path, datasets: list[str], samples: int,
                  seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """policy.onnx in `folder` from the policy checkpoint folder `policy`, checked against torch on `samples`
    random observations (around its normalisation statistics) and `samples` recorded ones. Returns its contract
    entry and parity figures."""
    from drive_mbrl.features import POLICY_FEATURES, policy_ego_features, route_feature_names
    from drive_mbrl.policy import BEST as POLICY_BEST
    from drive_mbrl.policy import load_policy

    net, meta = load_policy(policy)
    contract = policy_contract(net)
    graph = PolicyGraph(net).eval()
    gen = torch.Generator().manual_seed(seed)
    random_obs = net.obs_mean + net.obs_std * torch.randn(samples, net.config.obs_dim, generator=gen)
    path = folder / "policy.onnx"
    export_graph(graph, {"obs": random_obs[:2]}, contract, path)
    session = make_session(path)
    recorded = torch.as_tensor(policy_observations(net, datasets, samples))
    figures = {"random": parity(session, graph, contract, {"obs": random_obs}, [1, 7, 32]),
               "recorded": parity(session, graph, contract, {"obs": recorded}, [1, 7, 32])}
    check_parity("policy", figures)
    units = [u for u in HIST_UNITS] + ["m/s", "m/s"]
    ego_features = (*policy_ego_features(net.config.set_points), *route_feature_names(net.config.route_ahead))
    entry = {"file": path.name, "sha256": sha256_file(path), "opset": OPSET,
             "exporter": f"torch {torch.__version__} torch.onnx (TorchScript)",
             "source": {"checkpoint": str(policy), "weights_sha256": sha256_file(policy / POLICY_BEST)},
             "observation_features": list(POLICY_FEATURES),
             "ego_features": list(ego_features),
             "observation_units": units + (["lane number", "m/s"][:1 + net.config.set_points] +
                                           ["m"] * 2 * len(net.config.route_ahead)),
             "set_points": net.config.set_points, "route_ahead": list(net.config.route_ahead),
             "agents": net.config.agents, "history_len": 2,
             "history_dt": net.config.history_dt, **contract}
    return entry, figures


def export_bundle(checkpoint: Path | str, out: Path | str, datasets: list[str] | None = None, samples: int = 1000,
                  seed: int = 0, planner: PlannerConfig | None = None, planner_scenes: int = 100,
                  policy: Path | str = "") -> dict[str, Any]:
    """Export the forecaster checkpoint, the planning step on it (with `planner` settings; None: no planner
    graph) and the reactive policy of the folder `policy` (if given) into the bundle folder `out` (see the module
    docstring); recorded scenes for parity come from
    `datasets` (default: those the checkpoint was trained on). Returns the contract and parity figures."""
    from drive_mbrl.data import read_manifest
    from drive_mbrl.fit import BEST, load_forecaster, load_scenes

    if planner is not None and (planner.policy or planner.fallback == "policy"):
        raise ConfigError("the planner graph takes no reactive policy: export without planner.policy and with "
                          "planner.fallback=slower or least_risk (the policy goes into the bundle as its own graph "
                          "with policy=FOLDER)")
    if planner is not None and planner.ego_model == "route":
        raise ConfigError("planner.ego_model=route reads the ego's route from the road network, which the planner "
                          "graph does not take as an input: export with planner.ego_model=learned (any road) or "
                          "kinematic (straight lanes), or without the planner graph (planner_scenes=0)")
    checkpoint = Path(checkpoint).resolve()
    model, meta = load_forecaster(checkpoint, "cpu")
    if model.config.action_dim:
        raise ConfigError(f"the forecaster in {checkpoint} takes continuous actions: bundles hold meta-action "
                          "graphs only so far (continuous planning runs in torch, `agent=mpc`)")
    datasets = list(datasets or [s["path"] for s in meta["data"]["sources"]])
    manifest = read_manifest(Path(datasets[0]))
    trained = meta.get("data", {})
    seen = {"env_id": manifest["scenario"]["env_id"], "dt": manifest["dt"], "policy_dt": manifest["policy_dt"]}
    wanted = {"env_id": trained.get("scenario"), "dt": trained.get("dt"), "policy_dt": trained.get("policy_dt")}
    differ = {k: (seen[k], v) for k, v in wanted.items() if v is not None and seen[k] != v}
    if differ:  # the planner graph bakes in the dataset's simulation rates and reward
        detail = ", ".join(f"{k} {a} against {b}" for k, (a, b) in differ.items())
        raise ConfigError(f"dataset {datasets[0]} was recorded on another scenario than the forecaster in "
                          f"{checkpoint} was trained on ({detail}): pass datasets of the forecaster's own scenario "
                          "(or none: its training data)")
    if policy:
        from drive_mbrl.policy import load_policy

        load_policy(Path(policy).resolve())  # a bad policy folder fails now, not after the long parity checks
    scenes = load_scenes(datasets, model.config, meta["history_dt"])[0]
    figures: dict[str, Any] = {}

    def build(folder: Path) -> dict[str, Any]:
        graphs = {}
        graphs["forecaster"], figures["forecaster"] = export_forecaster(model, folder, scenes, samples, seed)
        if planner is not None:
            graphs["planner"], figures["planner"] = export_planner(model, folder, scenes, planner, manifest,
                                                                   planner_scenes, seed)
        if policy:
            graphs["policy"], figures["policy"] = export_policy(Path(policy).resolve(), folder, datasets, samples,
                                                               seed)
        write_json(folder / PARITY, {"tolerance": PARITY_TOLERANCE, "rule": PARITY_RULE,
                                     "datasets": [str(Path(d).resolve()) for d in datasets], **figures})
        return {
            "schema_version": BUNDLE_SCHEMA_VERSION, "package": "drive_mbrl", "package_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"checkpoint": str(checkpoint), "weights_file": BEST,
                       "weights_sha256": sha256_file(checkpoint / BEST), "env_id": manifest["scenario"]["env_id"]},
            "scene": scene_contract(model, meta),
            "actions": list(manifest["action_names"]),
            "action_meaning": "index i of an action input or output is highway-env's DiscreteMetaAction "
                              "actions[i] (set-point changes: target lane or target speed)",
            "graphs": graphs,
        }

    contract = write_bundle(Path(out), build)
    return {"contract": contract, "parity": figures}
