"""`drive-mbrl <command> key=value ...`: the command line, and the only module that imports Hydra.

Each command is a short function from its typed config (config.py) and its run directory to a metrics dict; the
wrapper composes the config with Hydra (so `--cfg job`, `-m` multirun and `hydra.run.dir=PATH` work), validates it,
owns the progress bars, writes metrics.json into the run directory and turns user errors into a one-line message
and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl import config as C
from drive_mbrl.errors import DriveMbrlError
from drive_mbrl.runtime import keep_freed_memory

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TRAIN_SEED_BLOCK = 10_000
"""`train`: seeds between the starts of two iterations' collections."""


@dataclass(frozen=True)
class Command:
    schema: type
    run: Callable[[Any, Path], dict[str, Any]]
    help: str


def _progress(total: int, desc: str) -> tuple[Any, Callable[[Any], None]]:
    """A tqdm bar over episodes showing env steps/s, and the per-episode callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="ep", dynamic_ncols=True)
    state = {"steps": 0, "start": time.perf_counter()}

    def on_episode(episode: Any) -> None:
        state["steps"] += episode.steps
        rate = state["steps"] / max(time.perf_counter() - state["start"], 1e-9)
        bar.set_postfix(steps=state["steps"], steps_per_s=f"{rate:.1f}")
        bar.update(1)

    return bar, on_episode


def _collect_into(spec: Any, out: Path, workers: int, ray_address: str, desc: str) -> dict[str, Any]:
    from drive_mbrl.data import collect, finished_indices

    bar, on_episode = _progress(spec.episodes, desc)
    bar.update(sum(i < spec.episodes for i in finished_indices(out)))
    try:
        return collect(spec, out, workers, ray_address, on_episode)
    finally:
        bar.close()


def agent_options(cfg: C.CollectConfig) -> str:
    """The agent's options as canonical JSON: a planner's checkpoint (absolute) and settings, a bundle (absolute);
    '' for rule agents."""
    from dataclasses import asdict

    from drive_mbrl.data import agent_options_json

    if cfg.learner and cfg.agent != "dagger":
        raise C.ConfigError(f"learner= drives DAgger rounds: it needs agent=dagger (got agent={cfg.agent})")
    if cfg.replans > 1 and cfg.agent != "dagger":
        raise C.ConfigError(f"replans= averages the planner's labels: it needs agent=dagger (got agent={cfg.agent})")
    if cfg.noise and cfg.agent != "dagger":
        raise C.ConfigError(f"noise= perturbs the executed actions of DAgger labelling: it needs agent=dagger (got "
                            f"agent={cfg.agent})")
    if cfg.agent in ("mpc", "dagger"):
        if not cfg.checkpoint:
            raise C.ConfigError(f"agent={cfg.agent} needs checkpoint=<forecaster folder> (train one with "
                                "`drive-mbrl fit`)")
        options = mpc_options(cfg.checkpoint, cfg.planner)
        if cfg.agent != "dagger":
            return options
        extra: dict[str, Any] = {"noise": cfg.noise} if cfg.noise else {}
        if cfg.replans > 1:
            extra["replans"] = cfg.replans
        if cfg.learner:
            learner = json.loads(policy_options(cfg.learner))["checkpoint"]  # a bad folder fails here
            extra.update(policy=learner, beta=cfg.beta)
        return agent_options_json({**json.loads(options), **extra}) if extra else options
    if cfg.agent == "oracle":
        return agent_options_json({"planner": asdict(cfg.planner)})
    if cfg.agent == "policy":
        return policy_options(cfg.checkpoint)
    if cfg.agent == "onnx":
        from drive_mbrl.onboard import read_contract

        if not cfg.bundle:
            raise C.ConfigError("agent=onnx needs bundle=<folder> (write one with `drive-mbrl export`)")
        read_contract(Path(cfg.bundle))  # a bad bundle fails here, before any episode is written
        return agent_options_json({"bundle": str(Path(cfg.bundle).resolve()), "graph": cfg.onnx_graph,
                                   "seed": cfg.planner.seed})
    return ""


def policy_options(checkpoint: Path | str) -> str:
    """agent=policy's options as canonical JSON; a bad checkpoint fails here, before any file is written."""
    from drive_mbrl.data import agent_options_json
    from drive_mbrl.policy import load_policy

    if not checkpoint:
        raise C.ConfigError("agent=policy needs checkpoint=<policy folder> (train one with `drive-mbrl distill`)")
    load_policy(checkpoint)
    return agent_options_json({"checkpoint": str(Path(checkpoint).resolve())})


def mpc_options(checkpoint: Path | str, planner: C.PlannerConfig) -> str:
    """agent=mpc's options as canonical JSON (absolute checkpoint path); a bad checkpoint fails here, before any
    episode or file is written."""
    from dataclasses import asdict

    from drive_mbrl.data import agent_options_json
    from drive_mbrl.fit import forecaster_digest, load_forecaster

    load_forecaster(checkpoint)
    if planner.policy:
        from dataclasses import replace

        from drive_mbrl.policy import load_policy

        load_policy(planner.policy)
        planner = replace(planner, policy=str(Path(planner.policy).resolve()))
    elif planner.fallback == "policy":
        raise C.ConfigError("planner.fallback=policy needs planner.policy=<policy folder>")
    # The weights' digest makes a dataset's identity follow the forecaster's contents, not only its path: a
    # retrained checkpoint in the same folder never resumes (or is reused for) episodes of the old one.
    return agent_options_json({"checkpoint": str(Path(checkpoint).resolve()), "planner": asdict(planner),
                               "weights": forecaster_digest(checkpoint)})


def run_collect(cfg: C.CollectConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.data import RunSpec
    from drive_mbrl.scenarios import load_scenario

    spec = RunSpec(load_scenario(cfg.scenario), cfg.agent, cfg.episodes, cfg.seed, cfg.record_hz, cfg.max_steps,
                   agent_options(cfg))
    out = Path(cfg.out) if cfg.out else run_dir / "dataset"
    metrics = _collect_into(spec, out, cfg.workers, cfg.ray_address, f"collect {spec.scenario.name}/{cfg.agent}")
    print(f"dataset: {out} ({metrics['episodes_total']} episodes, {metrics['episodes_new']} new, "
          f"{metrics['steps_per_s']:.1f} steps/s)")
    return metrics


def evaluate_agent(scenario: str, agent: str, episodes: int, seed: int, workers: int, ray_address: str,
                   out: Path, record_hz: int = 0, max_steps: int = 0, options: str = "") -> dict[str, Any]:
    """Run (or resume) evaluation episodes into `out` and summarise episodes 0 .. episodes-1."""
    from drive_mbrl.data import RunSpec, episode_path, load_episode
    from drive_mbrl.evaluate import summarise
    from drive_mbrl.scenarios import load_scenario

    spec = RunSpec(load_scenario(scenario), agent, episodes, seed, record_hz, max_steps, options)
    _collect_into(spec, out, workers, ray_address, f"evaluate {spec.scenario.name}/{agent}")
    loaded = [load_episode(episode_path(out, i)) for i in range(episodes)]
    return {"scenario": spec.scenario.name, "agent": agent, "seed": seed, **summarise(loaded)}


def run_evaluate(cfg: C.EvaluateConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.evaluate import format_table

    out = Path(cfg.out) if cfg.out else run_dir / "episodes"
    metrics = evaluate_agent(cfg.scenario, cfg.agent, cfg.episodes, cfg.seed, cfg.workers, cfg.ray_address, out,
                             cfg.record_hz, cfg.max_steps, agent_options(cfg))
    print(format_table({cfg.agent: metrics}))
    return metrics


def run_pipeline(cfg: C.PipelineConfig, run_dir: Path) -> dict[str, Any]:
    from dataclasses import replace

    from drive_mbrl.data import RunSpec
    from drive_mbrl.evaluate import format_table
    from drive_mbrl.scenarios import load_scenario

    if cfg.expert_episodes == 1:
        raise C.ConfigError("expert_episodes=1: the policy's validation split by episode needs at least 2 (or 0 to "
                            "skip the policy stages)")
    scenario = load_scenario(cfg.scenario)
    collected = {}
    for agent in cfg.collect_agents:
        spec = RunSpec(scenario, agent, cfg.collect_episodes, cfg.seed)
        collected[agent] = _collect_into(spec, run_dir / "data" / agent, cfg.workers, "",
                                         f"collect {scenario.name}/{agent}")
    evaluations = {agent: evaluate_agent(cfg.scenario, agent, cfg.eval_episodes, cfg.seed + C.EVAL_SEED,
                                         cfg.workers, "", run_dir / "eval" / agent)
                   for agent in cfg.eval_agents}
    print(format_table(evaluations))
    fit_cfg = replace(cfg.fit, dataset=[str(run_dir / "data" / a) for a in cfg.collect_agents],
                      holdout=[str(run_dir / "eval" / a) for a in cfg.eval_agents],
                      out=str(run_dir / "forecaster"))
    fitted = run_fit(fit_cfg, run_dir)
    if cfg.plan_episodes:
        options = mpc_options(run_dir / "forecaster", cfg.planner)
        evaluations["mpc"] = evaluate_agent(cfg.scenario, "mpc", cfg.plan_episodes, cfg.seed + C.EVAL_SEED,
                                            cfg.workers, "", run_dir / "eval" / "mpc", options=options)
        print(format_table(evaluations))
    result: dict[str, Any] = {"collect": collected, "evaluate": evaluations, "forecaster": fitted}
    if cfg.expert_episodes:
        result.update(pipeline_policy(cfg, run_dir, evaluations))
    if cfg.export_samples:
        result["export"] = pipeline_export(cfg, run_dir, evaluations)
    result["outputs"] = pipeline_replay_and_plots(cfg, run_dir, evaluations)
    print(f"dataset:    {run_dir / 'data'}\nforecaster: {run_dir / 'forecaster'}\n"
          f"report:     {run_dir / 'report.md'}\nmetrics:    {run_dir / 'metrics.json'}")
    if cfg.expert_episodes:
        print(f"policy:     {run_dir / 'policy'} (distilled; Dyna fine-tuned: {run_dir / 'rl' / 'policy'})")
    if "export" in result:
        result["outputs"]["bundle"] = result["export"]["bundle"]
        print(format_table({k: v for k, v in evaluations.items() if v}))
    for name, path in result["outputs"].items():
        print(f"{name + ':':<11} {path}")
    return result


def pipeline_export(cfg: C.PipelineConfig, run_dir: Path, evaluations: dict[str, Any]) -> dict[str, Any]:
    """The ONNX bundle of the forecaster, the planning step and the distilled policy (parity-checked on held-out
    recorded scenes), then `onboard_episodes` held-out episodes driven from it by onnxruntime alone."""
    from drive_mbrl.data import agent_options_json
    from drive_mbrl.export import export_bundle
    from drive_mbrl.fit import forecaster_digest
    from drive_mbrl.onboard import read_contract

    bundle = run_dir / "bundle"
    policy = run_dir / "policy" if cfg.expert_episodes else ""
    built = read_contract(bundle)["source"]["weights_sha256"] if (bundle / "contract.json").is_file() else None
    if built != forecaster_digest(run_dir / "forecaster"):  # none yet, or of a forecaster since retrained
        export_bundle(run_dir / "forecaster", bundle, [str(run_dir / "eval" / a) for a in cfg.eval_agents],
                      cfg.export_samples, cfg.seed, cfg.planner if cfg.export_planner_scenes else None,
                      cfg.export_planner_scenes, str(policy))
    contract = read_contract(bundle)
    if cfg.onboard_episodes:
        options = agent_options_json({"bundle": str(bundle.resolve()), "graph": "auto", "seed": cfg.planner.seed})
        evaluations["onnx"] = evaluate_agent(cfg.scenario, "onnx", cfg.onboard_episodes, cfg.seed + C.EVAL_SEED,
                                             1, "", run_dir / "eval" / "onnx", options=options)
    return {"bundle": str(bundle), "graphs": list(contract["graphs"])}


def pipeline_replay_and_plots(cfg: C.PipelineConfig, run_dir: Path, evaluations: dict[str, Any]) -> dict[str, str]:
    """The pipeline's last stages: the agents compared (PNG with 95 % intervals) and a replay of the planner's first
    held-out episode (GIF + key frames) with its plans and the predicted futures of the others."""
    from drive_mbrl.plots import evaluation_png
    from drive_mbrl.replay import load_replay, write_replay

    outputs = {"plot": str(evaluation_png([(a, m, run_dir / "eval" / a) for a, m in evaluations.items() if m],
                                          run_dir / "agents.png", f"{cfg.scenario}, held-out seeds"))}
    if cfg.plan_episodes:
        replay_dir = run_dir / "replay"
        if not (replay_dir / "ep_000000.gif").is_file():
            write_replay(load_replay(run_dir / "eval" / "mpc", 0), replay_dir)
        outputs["replay"] = str(replay_dir / "ep_000000.gif")
    return outputs


def pipeline_policy(cfg: C.PipelineConfig, run_dir: Path, evaluations: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's policy stages: planner-labelled episodes (agent=dagger without a policy: the planner drives
    and logs its costs) -> distill (BC + DAgger) -> a short Dyna PPO fine-tune -> evaluation next to the others."""
    from dataclasses import replace

    from drive_mbrl.data import RunSpec
    from drive_mbrl.evaluate import format_table
    from drive_mbrl.scenarios import load_scenario

    expert = run_dir / "data" / "expert"
    spec = RunSpec(load_scenario(cfg.scenario), "dagger", cfg.expert_episodes, cfg.seed + 500_000,
                   agent_options=mpc_options(run_dir / "forecaster", cfg.planner))
    _collect_into(spec, expert, cfg.workers, "", f"planner labels {cfg.scenario}")
    distilled = run_distill(replace(cfg.distill, scenario=cfg.scenario, dataset=[str(expert)],
                                    checkpoint=str(run_dir / "forecaster"), planner=cfg.planner,
                                    out=str(run_dir / "policy"), workers=cfg.workers), run_dir / "distill")
    evaluations["policy"] = distilled["rounds"][-1].get("evaluate", {})
    out: dict[str, Any] = {"distill": distilled}
    if cfg.rl_iterations:
        data = [str(run_dir / "data" / a) for a in cfg.collect_agents]
        rl_cfg = C.RLConfig(scenario=cfg.scenario, mode="dyna", init=str(run_dir / "policy"),
                            checkpoint=str(run_dir / "forecaster"), dataset=data, iterations=cfg.rl_iterations,
                            batch_size=512, imagined=63, real=1, eval_episodes=cfg.distill.eval_episodes,
                            out=str(run_dir / "rl"), seed=cfg.seed)
        out["rl"] = run_rl(rl_cfg, run_dir / "rl_run")
        evaluations["policy_dyna"] = out["rl"].get("evaluate", {})
    print(format_table({k: v for k, v in evaluations.items() if v}))
    return out


def run_train(cfg: C.TrainConfig, run_dir: Path) -> dict[str, Any]:
    """The MBRL loop (see TrainConfig). Every stage resumes (episodes by index, fits by folder), so a rerun of the
    same command after an interrupt continues where it stopped; the learning curve is rebuilt from the stages."""
    from dataclasses import replace

    from drive_mbrl.data import RunSpec, read_manifest
    from drive_mbrl.plots import learning_curve_png
    from drive_mbrl.scenarios import load_scenario

    # Seed blocks: the seed data from `seed`, iteration i's collection from seed + TRAIN_SEED_BLOCK x (i + 1);
    # none may reach into the next block or into the held-out evaluation seeds.
    blocks = [(cfg.seed, cfg.seed_episodes)] + [(cfg.seed + TRAIN_SEED_BLOCK * (it + 1), cfg.episodes_per_iteration)
                                                for it in range(cfg.iterations)]
    if max(cfg.seed_episodes, cfg.episodes_per_iteration) > TRAIN_SEED_BLOCK or any(
            start < C.EVAL_SEED + cfg.eval_episodes and C.EVAL_SEED < start + count for start, count in blocks):
        raise C.ConfigError(f"train's collection seeds (seed={cfg.seed}, blocks of {TRAIN_SEED_BLOCK:,} per "
                            f"iteration, {cfg.iterations} iterations) would overlap each other or the held-out "
                            f"evaluation seeds from {C.EVAL_SEED:,}: keep seed_episodes and episodes_per_iteration "
                            f"<= {TRAIN_SEED_BLOCK:,} and seed + {TRAIN_SEED_BLOCK:,} x (iterations + 1) below "
                            f"{C.EVAL_SEED:,}")
    scenario = load_scenario(cfg.scenario)
    data = [run_dir / "data" / "seed"]
    _collect_into(RunSpec(scenario, cfg.seed_agent, cfg.seed_episodes, cfg.seed), data[0], cfg.workers, "",
                  f"seed data {scenario.name}/{cfg.seed_agent}")
    resolved = read_manifest(data[0])["env_config_resolved"]
    longest = int(round(float(resolved["duration"]) * float(resolved["policy_frequency"])))
    curve: list[dict[str, Any]] = []
    previous = None
    for it in range(cfg.iterations):
        steps = sum(_dataset_steps(d) for d in data)
        ck = run_dir / "model" / f"iter{it}"
        fit_cfg = replace(cfg.fit, dataset=[str(d) for d in data], holdout=[], out=str(ck),
                          init=str(previous) if previous else "",
                          epochs=cfg.finetune_epochs if previous else cfg.fit.epochs)
        fitted = run_fit(fit_cfg, run_dir / "model" / f"iter{it}_report")
        options = mpc_options(ck, cfg.planner)
        evaluation = evaluate_agent(cfg.scenario, "mpc", cfg.eval_episodes, C.EVAL_SEED, cfg.workers, "",
                                    run_dir / "eval" / f"iter{it}", options=options)
        h = fitted["validation"]["per_horizon"]
        curve.append({"iteration": it, "real_steps": steps, "return_mean": evaluation["return_mean"],
                      "crash_rate": evaluation["crash_rate"], "speed_mean": evaluation["speed_mean"],
                      "fallback_rate": evaluation["fallback_rate"], "model_l2_last": h[-1]["ml_l2_mean"],
                      "baseline_l2_last": h[-1]["baselines"]["cv_lane_keeping"]["l2_mean"]})
        print(f"iteration {it}: {steps} real steps, return {evaluation['return_mean']:.2f}, crashes "
              f"{evaluation['crash_rate']:.0%}, speed {evaluation['speed_mean']:.1f} m/s")
        learning_curve_png(curve, run_dir / "learning_curve.png")
        previous = ck
        # Episodes that fit the remaining real-step budget even if every one runs to the scenario's end.
        episodes = min(cfg.episodes_per_iteration, (cfg.max_real_steps - steps) // longest)
        if it == cfg.iterations - 1 or episodes <= 0:
            continue
        explore = replace(cfg.planner, explore_weight=cfg.collect_explore_weight)
        out = run_dir / "data" / f"iter{it}"
        spec = RunSpec(scenario, "mpc", episodes, cfg.seed + TRAIN_SEED_BLOCK * (it + 1),
                       agent_options=mpc_options(ck, explore))
        _collect_into(spec, out, cfg.workers, "", f"collect {scenario.name}/mpc iteration {it}")
        data.append(out)
    return {"learning_curve": curve, "real_steps": sum(_dataset_steps(d) for d in data),
            "checkpoint": str(previous), "plot": str(run_dir / "learning_curve.png")}


DAGGER_SEED = 3_000_000
"""DAgger episodes reset with seeds from here (+ 100,000 per round): disjoint from collection's (from 0) and
evaluation's (from 1,000,000)."""


def run_distill(cfg: C.DistillConfig, run_dir: Path) -> dict[str, Any]:
    """Behaviour cloning then DAgger rounds (see DistillConfig); round r's policy is run_dir/rounds/policy_r."""
    import json
    import shutil
    from dataclasses import asdict

    import torch

    from drive_mbrl.data import RunSpec, atomic_folder, read_manifest
    from drive_mbrl.distill import BCSettings, merge_data, policy_data, train_policy
    from drive_mbrl.policy import PolicyConfig, load_policy, save_policy
    from drive_mbrl.scenarios import load_scenario

    if cfg.rounds and not cfg.checkpoint:
        raise C.ConfigError("DAgger rounds need the expert: pass checkpoint=<forecaster folder>, or rounds=0")
    scenario = load_scenario(cfg.scenario)
    expert = mpc_options(cfg.checkpoint, cfg.planner) if cfg.rounds else ""
    torch.set_num_threads(1)
    if not cfg.dataset:
        raise C.ConfigError("distill needs dataset=[FOLDER,...] of planner episodes (`drive-mbrl collect "
                            "agent=dagger checkpoint=...`)")
    names = read_manifest(Path(cfg.dataset[0]))["action_names"]
    if any(d < 0 for d in cfg.route_ahead):
        raise C.ConfigError(f"route_ahead={cfg.route_ahead}: distances along the route must be >= 0 metres")
    config = PolicyConfig(num_actions=len(names), hidden=cfg.hidden, layers=cfg.layers, history_dt=cfg.history_dt,
                          route_ahead=tuple(float(d) for d in cfg.route_ahead))
    parts = [policy_data(cfg.dataset, config, cfg.temperature)[0]]
    settings = BCSettings(epochs=cfg.epochs, patience=cfg.patience, lr=cfg.lr, seed=cfg.seed, loss=cfg.loss,
                          cost_weight=cfg.cost_weight)
    rounds, previous = [], None
    for r in range(cfg.rounds + 1):
        folder = run_dir / "rounds" / f"policy_{r}"
        if r > 0:  # the previous policy drives, the planner labels
            options = json.loads(expert)
            options.update(policy=str(previous.resolve()), beta=cfg.beta * 0.5 ** (r - 1), seed=cfg.seed)
            data_dir = run_dir / "rounds" / f"dagger_{r}"
            spec = RunSpec(scenario, "dagger", cfg.episodes_per_round, DAGGER_SEED + cfg.seed + 100_000 * r,
                           agent_options=json.dumps(options, sort_keys=True))
            if not (folder / "meta.json").is_file():  # a finished round's data is read, not re-collected
                _collect_into(spec, data_dir, cfg.workers, "", f"DAgger round {r}")
            parts.append(policy_data([str(data_dir)], config, cfg.temperature)[0])
        data = merge_data(parts)
        if (folder / "meta.json").is_file():
            net, meta = load_policy(folder)
            summary = meta["summary"]
            ignore = {"rounds", "eval_episodes", "eval_seed", "workers", "out"}
            changed = sorted(k for k, v in asdict(cfg).items()
                             if k not in ignore and meta.get("distill", {}).get(k, v) != v)
            if changed:
                raise C.ConfigError(f"{folder} was trained with other settings ({', '.join(changed)}): use a new "
                                    "run directory (hydra.run.dir=...) or the same settings to resume")
        else:
            init = load_policy(previous)[0] if previous else None
            net, summary = train_policy(data, config, settings, init)
            summary = {**summary, "real_steps": data.steps, "decisions": len(data)}
            save_policy(folder, net, names, {"summary": summary, "distill": asdict(cfg)})
        row = {"round": r, **summary}
        if cfg.eval_episodes:
            row["evaluate"] = evaluate_agent(cfg.scenario, "policy", cfg.eval_episodes, cfg.eval_seed, cfg.workers,
                                             "", run_dir / "eval" / f"round_{r}", options=policy_options(folder))
        unsafe = summary.get("val_unsafe_rate")
        print(f"round {r}: {summary['decisions']} labels from {summary['real_steps']} real steps, val accuracy "
              f"{summary['val_accuracy']:.2f}" + (f", unsafe greedy actions {unsafe:.2%}" if unsafe is not None else "")
              + (f", return {row['evaluate']['return_mean']:.2f}, crashes {row['evaluate']['crash_rate']:.0%}"
                 if cfg.eval_episodes else ""))
        rounds.append(row)
        previous = folder
    out = Path(cfg.out) if cfg.out else run_dir / "policy"
    if out.resolve() != previous.resolve():
        atomic_folder(out, lambda tmp: shutil.copytree(previous, tmp, dirs_exist_ok=True))
    print(f"policy: {out}")
    return {"rounds": rounds, "policy": str(out), "real_steps": rounds[-1]["real_steps"]}


def run_rl(cfg: C.RLConfig, run_dir: Path) -> dict[str, Any]:
    """PPO on the policy network, in imagination (dyna) or on the real env only (model_free); see RLConfig."""
    from tqdm import tqdm

    from drive_mbrl.forecaster import native_precision
    from drive_mbrl.policy import PolicyConfig, load_policy
    from drive_mbrl.raycluster import start_ray
    from drive_mbrl.rllib import PPOSettings, train_ppo
    from drive_mbrl.scenarios import action_names, load_scenario, make_env

    scenario = load_scenario(cfg.scenario)
    env = make_env(scenario)
    names = action_names(env)
    env.close()
    if cfg.init:
        policy = load_policy(cfg.init)[0].config
        if policy.num_actions != len(names):
            raise C.ConfigError(f"init policy has {policy.num_actions} actions, scenario {scenario.name} "
                                f"{len(names)}")
        if policy.route_ahead:
            raise C.ConfigError(f"init policy {cfg.init} observes its route (route_ahead={list(policy.route_ahead)}),"
                                " which rl's real and imagined envs do not build yet: distill one without route_ahead")
    else:
        policy = PolicyConfig(agents=cfg.agents, num_actions=len(names), hidden=cfg.hidden, layers=cfg.layers)
    imagined = cfg.imagined if cfg.mode == "dyna" else 0
    env_config: dict[str, Any] = {"scenario": cfg.scenario, "agents": policy.agents, "history_dt": policy.history_dt,
                                  "set_points": policy.set_points}
    if imagined:
        if not cfg.checkpoint or not cfg.dataset:
            raise C.ConfigError("mode=dyna needs checkpoint=<forecaster folder> and dataset=[recorded episodes] "
                                "(the start states); or mode=model_free")
        from drive_mbrl.fit import load_forecaster

        model, _ = load_forecaster(cfg.checkpoint)  # a bad checkpoint fails here, before Ray starts
        if model.config.agents < policy.agents:
            raise C.ConfigError(f"the policy observes {policy.agents} slots, the forecaster only predicts "
                                f"{model.config.agents}: use agents<={model.config.agents} or another forecaster")
        from drive_mbrl.imagination import dataset_reward, ego_road

        lanes = ego_road(cfg.dataset)[0]
        if cfg.imagined_ego == "kinematic" and lanes is None:
            raise C.ConfigError(f"imagined_ego=kinematic needs a straight multi-lane road (lanes_count in the "
                                f"scenario's env config) and {cfg.dataset[0]}'s scenario has none: use "
                                f"imagined_ego=auto or learned")
        if cfg.imagined_reward == "kinematic" and (lanes is None or cfg.imagined_ego == "learned"
                                                   or dataset_reward(cfg.dataset) is None):
            raise C.ConfigError(f"imagined_reward=kinematic needs the kinematic imagined ego on a highway-v0 / "
                                f"highway-fast-v0 scenario with meta-actions ({cfg.dataset[0]}'s scenario, "
                                f"imagined_ego={cfg.imagined_ego}): use imagined_reward=learned")
        if len(cfg.imagined_crash_margin) != 2:
            raise C.ConfigError(f"imagined_crash_margin takes two margins [m] (longitudinal, lateral), got "
                                f"{list(cfg.imagined_crash_margin)}")
        env_config["imagination"] = {"checkpoint": str(Path(cfg.checkpoint).resolve()),
                                     "datasets": [str(Path(d).resolve()) for d in cfg.dataset],
                                     "horizon": cfg.imagined_horizon, "uncertainty_level": cfg.uncertainty_level,
                                     "uncertainty_penalty": cfg.uncertainty_penalty, "agents": policy.agents,
                                     "crash_head": cfg.crash_head, "ego_model": cfg.imagined_ego,
                                     "reward": cfg.imagined_reward,
                                     "crash_margin": tuple(float(m) for m in cfg.imagined_crash_margin),
                                     "precision": native_precision(cfg.imagined_precision, "cpu"),
                                     "set_points": policy.set_points,
                                     "policy_history_dt": policy.history_dt}
    if cfg.real + imagined == 0:
        raise C.ConfigError("no envs: set real >= 1 or (mode=dyna) imagined >= 1")
    settings = PPOSettings(iterations=cfg.iterations, batch_size=cfg.batch_size, minibatch_size=cfg.minibatch_size,
                           epochs=cfg.epochs, lr=cfg.lr, gamma=cfg.gamma, entropy=cfg.entropy, real=cfg.real,
                           imagined=imagined, max_real_steps=cfg.max_real_steps, seed=cfg.seed + 7_000_000)
    out = Path(cfg.out) if cfg.out else run_dir / "rl"
    norm, norm_steps = None, 0
    resuming = (out / "history.json").is_file()  # the saved module holds its statistics already
    if not cfg.init and not resuming:  # a fresh network needs input statistics: start states or random real steps
        from drive_mbrl.imagination import random_steps
        from drive_mbrl.policy import PolicyNet, dataset_observations

        if imagined:
            stats = dataset_observations(policy, cfg.dataset)
        else:
            norm_steps = cfg.norm_steps
            stats, _ = random_steps(cfg.scenario, norm_steps, cfg.seed + 8_000_000, policy.agents,
                                    policy.history_dt, policy.set_points)
        net = PolicyNet(policy)
        net.set_normalisation(stats)
        norm = [net.obs_mean.tolist(), net.obs_std.tolist()]
    start_ray(cfg.ray_address, cfg.env_runners + 1)
    bar = tqdm(total=cfg.iterations, desc=f"rl {cfg.mode}", unit="it", dynamic_ncols=True)

    def on_iteration(row: dict[str, Any]) -> None:
        bar.set_postfix(real=row["real_steps"], imagined=row["imagined_steps"],
                        ret=f"{row['episode_return_mean']:.2f}")
        bar.update(1)

    try:
        result = train_ppo(env_config, policy, names, str(Path(cfg.init).resolve()) if cfg.init else "", settings,
                           out, cfg.env_runners, on_iteration, norm, norm_steps)
    finally:
        bar.close()
    if cfg.eval_episodes:
        last = result["history"][-1]["iteration"] if result["history"] else 0
        result["evaluate"] = evaluate_agent(cfg.scenario, "policy", cfg.eval_episodes, cfg.eval_seed, 1, "",
                                            out / f"eval_iter{last}", options=policy_options(result["policy"]))
        from drive_mbrl.evaluate import format_table

        print(format_table({f"policy ({cfg.mode})": result["evaluate"]}))
    # Real steps behind the policy besides RL's own (which `max_real_steps` caps): the forecaster's training data
    # and the imagination's start states (dyna), and the labels of a distilled `init` policy.
    data_steps = _model_data_steps(cfg.checkpoint, cfg.dataset) if imagined else 0
    if cfg.init:
        data_steps += int(load_policy(cfg.init)[1].get("summary", {}).get("real_steps", 0))
    last = result["history"][-1]["real_steps"] if result["history"] else norm_steps
    result = {**result, "data_real_steps": data_steps, "total_real_steps": data_steps + last}
    print(f"policy: {result['policy']} (real env steps behind it: {data_steps:,} of data + {last:,} sampled by RL "
          f"= {data_steps + last:,})")
    return result


def _model_data_steps(checkpoint: str, datasets: list[str]) -> int:
    """Real env steps of a forecaster's training data (its meta.json's sources) plus those of `datasets` that are
    not among them (a dataset is known by its agent, seed and steps)."""
    from drive_mbrl.data import read_manifest
    from drive_mbrl.fit import META

    sources = json.loads((Path(checkpoint) / META).read_text()).get("data", {}).get("sources", [])
    seen = {(s.get("agent"), s.get("seed"), s.get("steps")) for s in sources}
    total = sum(int(s.get("steps", 0)) for s in sources)
    for folder in datasets:
        manifest, steps = read_manifest(Path(folder)), _dataset_steps(Path(folder))
        if (manifest.get("agent"), manifest.get("seed"), steps) not in seen:
            seen.add((manifest.get("agent"), manifest.get("seed"), steps))
            total += steps
    return total


def _dataset_steps(root: Path) -> int:
    from drive_mbrl.data import load_dataset

    return sum(ep.steps for ep in load_dataset(root)[1])


def run_bench_collect(cfg: C.BenchCollectConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_collect

    metrics = bench_collect(cfg.scenario, cfg.agent, cfg.episodes, cfg.workers, cfg.repeats, cfg.seed)
    for row in metrics["rows"]:
        print(f"workers={row['workers']}: median {row['steps_per_s_median']:.1f} steps/s "
              f"(runs {', '.join(f'{v:.1f}' for v in row['steps_per_s'])}), "
              f"x{row['speedup_vs_baseline']:.2f} vs workers={metrics['rows'][0]['workers']}; "
              f"x{row['speedup_with_ray_start']:.2f} charging Ray's start-up ({metrics['ray_start_s']:.1f} s)")
    print(f"identical data across worker counts: {metrics['identical_data']}")
    return metrics


def _forecaster_report(figures: dict[str, Any], run_dir: Path, title: str) -> None:
    from drive_mbrl.data import atomic_write
    from drive_mbrl.plots import forecaster_report_png
    from drive_mbrl.report import forecaster_markdown

    png = forecaster_report_png(figures, run_dir / "report.png", title)
    markdown = forecaster_markdown(figures, title, png.name)
    atomic_write(run_dir / "report.md", lambda f: f.write(markdown), "w")
    print(forecaster_markdown(figures, title, png.name, summary_only=True))
    print(f"report:   {run_dir / 'report.md'}")


def run_fit(cfg: C.FitConfig, run_dir: Path) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from drive_mbrl.fit import (
        TrainSettings,
        dataset_rates,
        env_seeds,
        fit,
        load_forecaster,
        load_scenes,
        resolve_device,
        split_by_episode,
    )
    from drive_mbrl.forecaster import ForecasterConfig
    from drive_mbrl.validation import validate

    if not cfg.dataset:
        raise DriveMbrlError("fit needs dataset=[FOLDER,...]: collect one with `drive-mbrl collect out=FOLDER`")
    if cfg.width % cfg.heads:
        raise C.ConfigError(f"heads={cfg.heads} must divide width={cfg.width}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy_dt, actions, action_dim = dataset_rates(cfg.dataset[0])
    if cfg.init:
        model_cfg = load_forecaster(cfg.init)[0].config
    else:
        model_cfg = ForecasterConfig(agents=cfg.agents, history_len=cfg.history_len, horizon=cfg.horizon,
                                     num_actions=actions, action_dim=action_dim, members=cfg.members,
                                     modes=cfg.modes, width=cfg.width,
                                     heads=cfg.heads, blocks=cfg.blocks, plan_fusion=cfg.plan_fusion,
                                     decoder_width=cfg.decoder_width, policy_dt=policy_dt,
                                     neighbours=cfg.neighbours, pad_history=cfg.pad_history,
                                     mask_absent=cfg.mask_absent,
                                     residual=cfg.residual)
    scenes, sources = load_scenes(cfg.dataset, model_cfg, cfg.history_dt)
    calibration, cal_sources = (load_scenes(cfg.calibration, model_cfg, cfg.history_dt) if cfg.calibration
                                else (None, None))
    held = load_scenes(cfg.holdout, model_cfg, cfg.history_dt)[0] if cfg.holdout else None  # bad folders fail now
    # By env seed, not by episode: an idm and an explore episode of one seed start from the same traffic.
    train_mask, val_mask = split_by_episode(env_seeds(scenes.episode, sources["sources"]), cfg.val_fraction,
                                            cfg.seed)
    train, val = scenes.subset(np.flatnonzero(train_mask)), scenes.subset(np.flatnonzero(val_mask))
    device = resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else run_dir / "checkpoint"
    settings = TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                             seed=cfg.seed, ema=cfg.ema, mode_weight=cfg.mode_weight,
                             precision=cfg.precision)
    bar = tqdm(total=cfg.epochs, desc=f"fit {len(train)} scenes", unit="epoch", dynamic_ncols=True)

    def on_epoch(record: dict[str, float]) -> None:
        bar.n = record["epoch"]
        bar.set_postfix(train=f"{record['train_loss']:.3f}", val_nll=f"{record['val_nll']:.3f}")
        bar.refresh()

    start = time.perf_counter()
    try:
        history = fit(train, val, model_cfg, settings, out,
                      {"data": sources, "history_dt": cfg.history_dt, "train_scenes": len(train),
                       "val_scenes": len(val), "val_episodes": sorted(set(val.episode.tolist())),
                       **({"calibration": cal_sources} if cal_sources else {})}, device, on_epoch,
                      Path(cfg.init) if cfg.init else None, calibration)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - start
    model, _ = load_forecaster(out, device)
    figures = validate(model, held if held is not None else val, device, policy_dt, seed=cfg.seed)
    # Without holdout= the val split chose the best epoch and, without calibration=, fitted the calibration: its
    # coverage and NLL are then in-sample, and the title says so.
    title = ("held-out data" if cfg.holdout else "the val split" if cfg.calibration
             else "the val split (also its calibration data: coverage in-sample)")
    _forecaster_report(figures, run_dir, f"forecaster on {title}")
    print(f"calibration: mode temperature {history['mode_temperature']:.2f}; per horizon step spread power "
          f"{', '.join(f'{b:.2f}' for b in history['std_power'])}, factor "
          f"{', '.join(f'{a:.2f}' for a in history['std_scale'])}")
    print(f"checkpoint: {out}")
    return {"checkpoint": str(out), "train_seconds": train_seconds,
            "fit": {k: v for k, v in history.items() if k != "history"},
            "learning_curve": history["history"], "validation": figures,
            "train_scenes": len(train), "val_scenes": len(val)}


def run_validate(cfg: C.ValidateConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.fit import load_forecaster, load_scenes, resolve_device
    from drive_mbrl.validation import validate

    if not cfg.checkpoint or not cfg.dataset:
        raise DriveMbrlError("validate needs checkpoint=FOLDER and dataset=[FOLDER,...]")
    device = resolve_device(cfg.device)
    model, meta = load_forecaster(cfg.checkpoint, device)
    scenes, sources = load_scenes(cfg.dataset, model.config, meta["history_dt"])
    figures = validate(model, scenes, device, model.config.policy_dt, seed=cfg.seed, hdr_samples=cfg.hdr_samples)
    _forecaster_report(figures, run_dir, f"forecaster {cfg.checkpoint} on {', '.join(cfg.dataset)}")
    return {"checkpoint": cfg.checkpoint, "data": sources, **figures}


def run_calibrate(cfg: C.CalibrateConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.fit import load_forecaster, load_scenes, recalibrate, resolve_device

    if not cfg.checkpoint or not cfg.dataset or not cfg.out:
        raise DriveMbrlError("calibrate needs checkpoint=FOLDER dataset=[FOLDER,...] out=NEW_FOLDER")
    device = resolve_device(cfg.device)
    model, meta = load_forecaster(cfg.checkpoint, device)
    scenes, sources = load_scenes(cfg.dataset, model.config, meta["history_dt"])
    before = {"std_scale": model.std_scale.tolist(), "std_power": model.std_power.tolist(),
              "mode_temperature": model.mode_temperature.item()}
    spread = recalibrate(cfg.checkpoint, model, meta, scenes, sources, cfg.out, device, seed=cfg.seed)
    for key, name in (("std_scale", "factor"), ("std_power", "power")):
        change = ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(before[key], spread[key], strict=True))
        print(f"spread {name} per horizon step: {change}")
    print(f"mode temperature: {before['mode_temperature']:.3f} -> {spread['mode_temperature']:.3f}")
    print(f"recalibrated checkpoint: {cfg.out}")
    return {"checkpoint": cfg.checkpoint, "out": cfg.out, "data": sources, "before": before, **spread}


def run_bench_plan(cfg: C.BenchPlanConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_plan

    if not cfg.checkpoint:
        raise C.ConfigError("bench plan needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
    metrics = bench_plan(cfg.checkpoint, cfg.scenario, cfg.budgets, cfg.members, cfg.decisions,
                         cfg.oracle_decisions, cfg.planner, cfg.seed)
    print(f"device {metrics['device']}, {metrics['threads']} threads, network in {metrics['precision']}, "
          f"{metrics['samples']} samples per member, matmul peak {metrics['matmul_peak_gflops']:.0f} GFLOP/s")
    for row in metrics["rows"]:
        print(f"budget {row['budget']:>5} ({row['plans_scored']} scored), members {row['members']}: "
              f"p50 {row['ms_p50']:.1f} ms, p99 {row['ms_p99']:.1f} ms; {row['gflop']:.2f} GFLOP per decision, "
              f"at least {row['compute_bound_ms']:.1f} ms at the matmul peak ({row['achieved_gflops']:.0f} "
              "GFLOP/s reached)")
    if metrics["oracle"]:
        o = metrics["oracle"]
        print(f"oracle (depth {o['depth']}): p50 {o['ms_p50']:.1f} ms, p99 {o['ms_p99']:.1f} ms")
    return metrics


def run_bench_forecaster(cfg: C.BenchForecasterConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_forecaster

    metrics = bench_forecaster(cfg.checkpoint, cfg.candidates, cfg.repeats, cfg.device, cfg.threads)
    print(f"device {metrics['device']} ({metrics['threads']} threads), {metrics['members']} members x "
          f"{metrics['modes']} modes, {metrics['parameters']:,} parameters ({metrics['parameter_mb']:.1f} MB), "
          f"peak RSS {metrics['peak_rss_mb']:.0f} MB")
    for row in metrics["rows"]:
        print(f"N={row['candidates']:>5}: {row['ms_median']:8.2f} ms/call, "
              f"{row['scene_rollouts_per_s']:10.0f} scene-rollouts/s")
    return metrics


def run_export(cfg: C.ExportConfig, run_dir: Path) -> dict[str, Any]:
    import torch

    from drive_mbrl.export import export_bundle

    if not cfg.checkpoint:
        raise C.ConfigError("export needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
    out = Path(cfg.out) if cfg.out else Path("export/bundles") / Path(cfg.checkpoint).resolve().name
    if cfg.planner.threads:
        torch.set_num_threads(cfg.planner.threads)
    result = export_bundle(cfg.checkpoint, out, cfg.dataset, cfg.samples, cfg.seed,
                           cfg.planner if cfg.planner_scenes else None, cfg.planner_scenes, cfg.policy)
    if "planner" in result["parity"]:
        p = result["parity"]["planner"]
        c, n = p["counts"], p["scenes"]
        print(f"planner parity, {n} recorded scenes: same action with the same noise {c['same_noise']}/{n} and "
              f"{c['same_noise_b']}/{n} (two draws); with independent noise ONNX vs torch {c['independent']}/{n}, "
              f"torch vs torch {c['torch_self']}/{n} (the planner's own randomness; scenes where the export changed "
              f"the agreement: {p['export_changed_agreement']})")
    for graph, figures in result["parity"].items():
        for kind, row in figures.items() if graph != "planner" else ():
            print(f"{graph} parity, {row['inputs']} {kind} inputs: max |onnx - torch| " + ", ".join(
                f"{k} {v:.2g}" for k, v in row["max_abs_error"].items()))
    print(f"bundle: {out} ({', '.join(result['contract']['graphs'])})")
    return {"bundle": str(out.resolve()), "graphs": list(result["contract"]["graphs"]), "parity": result["parity"]}


def run_bench_policy(cfg: C.BenchPolicyConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_policy

    if not (cfg.policy and cfg.checkpoint and cfg.dataset):
        raise C.ConfigError("bench policy needs policy=<folder>, checkpoint=<forecaster> and dataset=[episodes]")
    m = bench_policy(cfg.policy, cfg.checkpoint, cfg.dataset, cfg.scenario, cfg.envs, cfg.steps, cfg.real_steps,
                     cfg.repeats, cfg.decisions, cfg.planner, cfg.seed, cfg.imagination, cfg.imagined_precision)
    print(f"real env ({m['scenario']}, with perception): {m['real_steps_per_s']:.1f} steps/s (median); imagination "
          f"network in {m['imagined_precision']}, planner's in {m['planner_precision']}")
    for row in m["rows"]:
        print(f"imagination, {row['envs']:>5} envs: {row['imagined_per_s']:9.0f} transitions/s = "
              f"{row['ratio_to_real']:.0f}x real; {row['mflop_per_transition']:.1f} MFLOP each, at most "
              f"{row['compute_bound_per_s']:.0f}/s = {row['compute_bound_ratio']:.0f}x real at the matmul peak "
              f"({m['matmul_peak_gflops']:.0f} GFLOP/s)")
    print(f"policy decision p50 {m['policy_us_p50']:.0f} us (p99 {m['policy_us_p99']:.0f}); planner (budget "
          f"{m['planner_budget']}) p50 {m['planner_ms_p50']:.0f} ms (p99 {m['planner_ms_p99']:.0f}): "
          f"{m['planner_over_policy']:.0f}x")
    return m


def run_bench_export(cfg: C.BenchExportConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_export

    if not cfg.bundle:
        raise C.ConfigError("bench export needs bundle=<folder> (write one with `drive-mbrl export`)")
    metrics = bench_export(cfg.bundle, cfg.repeats, cfg.decisions, cfg.threads, cfg.dataset)
    print(f"{metrics['threads']} thread(s), batch 1, p50 / p99")
    for name, row in metrics["rows"].items():
        t, o = row["torch"], row["onnxruntime"]
        print(f"{name:>10}: torch {t['us_p50']:,.1f} / {t['us_p99']:,.1f} us, onnxruntime {o['us_p50']:,.1f} / "
              f"{o['us_p99']:,.1f} us, x{row['speedup_p50']:.2f}")
    return metrics


def run_replay(cfg: C.ReplayConfig, run_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from drive_mbrl.replay import load_replay, render_frames, write_replay

    if not cfg.run:
        raise C.ConfigError("replay needs run=<evaluate or collect run folder, or dataset folder>")
    replay = load_replay(Path(cfg.run), cfg.episode)
    if not replay.planned:
        print(f"episode {cfg.episode} of {replay.source} has no planning log (agent {replay.manifest['agent']}, "
              "or recorded before step logs existed): replaying vehicles only")
    total = len(render_frames(replay.episode, float(replay.manifest["dt"]), cfg.hz))
    bar = tqdm(total=total, desc=f"replay episode {cfg.episode}", unit="frame", dynamic_ncols=True)
    try:
        metrics = write_replay(replay, Path(cfg.out) if cfg.out else run_dir, cfg.hz, cfg.key_frames, cfg.view,
                               cfg.dpi, cfg.mp4, lambda _: bar.update(1))
    finally:
        bar.close()
    print(f"gif: {metrics['gif']} ({metrics['frames']} frames, rendered at {metrics['render_fps']:.1f} frames/s)")
    if "mp4" in metrics:
        print(f"mp4: {metrics['mp4']}")
    elif cfg.mp4:
        print("mp4: skipped (ffmpeg is not installed)")
    for png in metrics["png"]:
        print(f"png: {png}")
    return {"run": str(replay.source), **metrics}


def run_plot(cfg: C.PlotConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.plots import plot_metrics

    if not cfg.inputs:
        raise C.ConfigError("plot needs inputs=[metrics.json or run folder,...]")
    if cfg.labels and len(cfg.labels) != len(cfg.inputs):
        raise C.ConfigError(f"labels has {len(cfg.labels)} entries for {len(cfg.inputs)} inputs: give one per "
                            "input or none")
    out = Path(cfg.out) if cfg.out else run_dir / f"{cfg.kind}.png"
    path = plot_metrics(cfg.kind, [Path(p) for p in cfg.inputs], cfg.labels, out, cfg.title)
    print(f"plot: {path}")
    return {"kind": cfg.kind, "inputs": cfg.inputs, "plot": str(path)}


def run_bench_replay(cfg: C.BenchReplayConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_replay

    if not cfg.run:
        raise C.ConfigError("bench replay needs run=<evaluate or collect run folder, or dataset folder>")
    m = bench_replay(cfg.run, cfg.episode, cfg.steps, cfg.repeats, cfg.dpi)
    print(f"{m['frames']} frames of {m['frame_pixels'][0]}x{m['frame_pixels'][1]} px "
          f"({'with' if m['planning_log'] else 'without'} planning log): drawing {m['draw_fps']:.1f} frames/s, "
          f"drawing + GIF encoding {m['gif_fps']:.1f} frames/s (medians of {cfg.repeats}, {m['cpus']} CPUs)")
    return m


COMMANDS: dict[str, Command] = {
    "collect": Command(C.CollectConfig, run_collect, "collect tracked episodes of an agent into a dataset"),
    "evaluate": Command(C.EvaluateConfig, run_evaluate, "closed-loop evaluation with safety metrics"),
    "fit": Command(C.FitConfig, run_fit, "train the forecaster ensemble on datasets (validates at the end)"),
    "validate": Command(C.ValidateConfig, run_validate, "forecaster figures per horizon vs physics baselines"),
    "calibrate": Command(C.CalibrateConfig, run_calibrate,
                         "copy of a forecaster with its spread refitted on a calibration dataset"),
    "distill": Command(C.DistillConfig, run_distill, "the reactive policy learns the planner (BC + DAgger)"),
    "bench_policy": Command(C.BenchPolicyConfig, run_bench_policy,
                            "imagination vs real env throughput; policy vs planner latency"),
    "rl": Command(C.RLConfig, run_rl, "PPO (RLlib) on the policy: in imagination (dyna) or model-free"),
    "pipeline": Command(C.PipelineConfig, run_pipeline, "the main job: every stage on the default scenario"),
    "bench_collect": Command(C.BenchCollectConfig, run_bench_collect, "collection steps/s vs worker count"),
    "train": Command(C.TrainConfig, run_train, "the model-based RL loop: fit -> plan -> collect, learning curve"),
    "export": Command(C.ExportConfig, run_export, "ONNX bundle of the models with contract and parity check"),
    "bench_export": Command(C.BenchExportConfig, run_bench_export,
                            "batch-1 latency of a bundle's graphs, onnxruntime vs torch"),
    "bench_plan": Command(C.BenchPlanConfig, run_bench_plan, "MPC decision latency vs budget and members"),
    "bench_forecaster": Command(C.BenchForecasterConfig, run_bench_forecaster,
                                "forecaster scene-rollouts/s vs number of candidate plans"),
    "replay": Command(C.ReplayConfig, run_replay, "render an episode (GIF/MP4/PNG) with plans and predicted futures"),
    "plot": Command(C.PlotConfig, run_plot, "learning curves, forecaster error, calibration, agent comparison"),
    "bench_replay": Command(C.BenchReplayConfig, run_bench_replay, "replay rendering speed [frames/s]"),
}


def usage() -> str:
    lines = ["usage: drive-mbrl <command> [key=value ...] [hydra flags: --cfg job, -m, hydra.run.dir=PATH]", "",
             "commands:"]
    for name, command in COMMANDS.items():
        lines.append(f"  {name.replace('_', ' '):<16} {command.help}")
    lines += ["", "`drive-mbrl <command> --cfg job` prints a command's config with its defaults;",
              "every command writes metrics.json into its run directory."]
    return "\n".join(lines)


def _empty_dataset(path: Path) -> bool:
    """A dataset folder with its manifest and no episode yet (what an episode loop that failed at once leaves)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {"manifest.json", "episodes"} and \
        not any((path / "episodes").iterdir() if (path / "episodes").is_dir() else ())


def _remove_if_only_hydra_files(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start-up, and at most a dataset folder
    without episodes (a failed run leaves no dir)."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" or _empty_dataset(p)
                                for p in run_dir.iterdir()):
        import shutil

        shutil.rmtree(run_dir)


def _with_checkpoint_scenario(cfg: Any) -> Any:
    """`export`'s empty scenario becomes the shipped scenario whose env id the checkpoint was trained on (so its
    planning step takes that scenario's planner settings); other configs are returned unchanged."""
    if not isinstance(cfg, C.ExportConfig) or cfg.scenario or not (Path(cfg.checkpoint) / "meta.json").is_file():
        return cfg
    from dataclasses import replace

    from drive_mbrl.scenarios import available_scenarios, load_scenario

    meta = json.loads((Path(cfg.checkpoint) / "meta.json").read_text())
    env_id, continuous = meta.get("data", {}).get("scenario"), bool(meta.get("model", {}).get("action_dim", 0))
    names = [n for n in available_scenarios()
             if load_scenario(n).env_id == env_id and load_scenario(n).continuous_actions == continuous]
    return replace(cfg, scenario=names[0]) if len(names) == 1 else cfg


def _lock_run_dir(run_dir: Path, name: str) -> None:
    """Hold an exclusive lock on the directory `run_dir` itself (flock on its descriptor; no lock file is left
    behind) for the life of this process, so that two commands never write one run directory at once (two resumes
    of the same `hydra.run.dir=`, say); exits with a usage error naming the directory when another live process
    holds it. The default run directories carry the process id (`${pid:}` in configs/*.yaml), so commands started
    in the same second get different ones. The descriptor is never closed: the lock goes with the process."""
    import fcntl
    import os

    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        print(f"drive-mbrl {name.replace('_', ' ')}: error: run directory {run_dir} is in use by another drive-mbrl "
              "process; wait for it, or pass another hydra.run.dir=PATH", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _run_hydra(name: str) -> None:
    import os

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from drive_mbrl.data import write_json
    from drive_mbrl.resources import data_dir

    command = COMMANDS[name]
    ConfigStore.instance().store(name=f"{name}_schema", node=command.schema)
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True)

    entered = False

    @hydra.main(version_base="1.3", config_path=str(data_dir("configs")), config_name=name)
    def task(cfg: Any) -> None:
        nonlocal entered
        entered = True
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        _lock_run_dir(run_dir, name)
        typed = None
        try:
            typed = C.validate(OmegaConf.to_object(cfg))
            explicit = frozenset(o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task)
            typed, taken = C.with_scenario_planner(_with_checkpoint_scenario(typed), explicit)
            if taken and getattr(typed, "agent", "mpc") in ("mpc", "dagger"):
                print(f"drive-mbrl {name.replace('_', ' ')}: scenario {typed.scenario} sets "
                      f"{', '.join(f'planner.{k}={v}' for k, v in taken.items())} (pass planner.KEY=VALUE to "
                      "override)", file=sys.stderr)
            metrics = command.run(typed, run_dir)
            if taken:
                metrics = {"scenario_planner": taken, **metrics}
            write_json(run_dir / "metrics.json", {"command": name, **metrics})
        except DriveMbrlError as exc:
            _remove_if_only_hydra_files(run_dir)
            print(f"drive-mbrl {name.replace('_', ' ')}: error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            out = getattr(typed, "out", "")  # the command's own output folder, where it has one
            where = f"{out} (run folder {run_dir})" if out else str(run_dir)
            # A default run folder is new for every run (date, time, process id): resuming means naming this one.
            again = "the same command" if out else f"the same command with hydra.run.dir={run_dir}"
            print(f"\ndrive-mbrl {name.replace('_', ' ')}: interrupted; everything finished so far is on disk in "
                  f"{where} — rerun {again} to resume", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    try:
        task()
    except SystemExit as exc:
        if exc.code == 1 and not entered:  # Hydra's own usage errors (an unknown key, a value of the wrong type),
            sys.exit(EXIT_USAGE)           # which it has printed: usage errors exit 2 like every other here
        raise


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `drive-mbrl` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name = args.pop(0)
    if name == "bench":
        if not args or "=" in args[0] or args[0].startswith("-"):
            print("drive-mbrl bench: error: name what to benchmark, e.g. `drive-mbrl bench collect`",
                  file=sys.stderr)
            sys.exit(EXIT_USAGE)
        name = f"bench_{args.pop(0)}"
    if name not in COMMANDS:
        print(f"drive-mbrl: error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.argv = [f"drive-mbrl {name.replace('_', ' ')}", *args]
    keep_freed_memory()
    _run_hydra(name)


if __name__ == "__main__":
    main()
