"""`drive-mbrl <command> key=value ...`: the command line, and the only module that imports Hydra.

Each command is a short function from its typed config (config.py) and its run directory to a metrics dict; the
wrapper composes the config with Hydra (so `--cfg job`, `-m` multirun and `hydra.run.dir=PATH` work), validates it,
owns the progress bars, writes metrics.json into the run directory and turns user errors into a one-line message
and exit status 2.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl import config as C
from drive_mbrl.errors import DriveMbrlError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
    """The agent's options as canonical JSON: a planner's checkpoint (absolute) and settings; '' for rule agents."""
    from dataclasses import asdict

    from drive_mbrl.data import agent_options_json

    if cfg.agent == "mpc":
        if not cfg.checkpoint:
            raise C.ConfigError("agent=mpc needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
        return mpc_options(cfg.checkpoint, cfg.planner)
    if cfg.agent == "oracle":
        return agent_options_json({"planner": asdict(cfg.planner)})
    return ""


def mpc_options(checkpoint: Path | str, planner: C.PlannerConfig) -> str:
    """agent=mpc's options as canonical JSON (absolute checkpoint path); a bad checkpoint fails here, before any
    episode or file is written."""
    from dataclasses import asdict

    from drive_mbrl.data import agent_options_json
    from drive_mbrl.fit import load_forecaster

    load_forecaster(checkpoint)
    return agent_options_json({"checkpoint": str(Path(checkpoint).resolve()), "planner": asdict(planner)})


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
    print(f"dataset:    {run_dir / 'data'}\nforecaster: {run_dir / 'forecaster'}\n"
          f"report:     {run_dir / 'report.md'}\nmetrics:    {run_dir / 'metrics.json'}")
    return {"collect": collected, "evaluate": evaluations, "forecaster": fitted}


def run_train(cfg: C.TrainConfig, run_dir: Path) -> dict[str, Any]:
    """The MBRL loop (see TrainConfig). Every stage resumes (episodes by index, fits by folder), so a rerun of the
    same command after an interrupt continues where it stopped; the learning curve is rebuilt from the stages."""
    from dataclasses import replace

    from drive_mbrl.data import RunSpec, read_manifest
    from drive_mbrl.plots import learning_curve_png
    from drive_mbrl.scenarios import load_scenario

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
        spec = RunSpec(scenario, "mpc", episodes, cfg.seed + 10_000 * (it + 1),
                       agent_options=mpc_options(ck, explore))
        _collect_into(spec, out, cfg.workers, "", f"collect {scenario.name}/mpc iteration {it}")
        data.append(out)
    return {"learning_curve": curve, "real_steps": sum(_dataset_steps(d) for d in data),
            "checkpoint": str(previous), "plot": str(run_dir / "learning_curve.png")}


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
    from drive_mbrl.plots import forecaster_report_png
    from drive_mbrl.report import forecaster_markdown

    png = forecaster_report_png(figures, run_dir / "report.png", title)
    (run_dir / "report.md").write_text(forecaster_markdown(figures, title, png.name))
    print(forecaster_markdown(figures, title, png.name, summary_only=True))
    print(f"report:   {run_dir / 'report.md'}")


def run_fit(cfg: C.FitConfig, run_dir: Path) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from drive_mbrl.fit import (
        TrainSettings,
        dataset_rates,
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
    policy_dt, actions = dataset_rates(cfg.dataset[0])
    if cfg.init:
        model_cfg = load_forecaster(cfg.init)[0].config
    else:
        model_cfg = ForecasterConfig(agents=cfg.agents, history_len=cfg.history_len, horizon=cfg.horizon,
                                     num_actions=actions, members=cfg.members, modes=cfg.modes, width=cfg.width,
                                     heads=cfg.heads, blocks=cfg.blocks, plan_fusion=cfg.plan_fusion,
                                     decoder_width=cfg.decoder_width, policy_dt=policy_dt)
    scenes, sources = load_scenes(cfg.dataset, model_cfg, cfg.history_dt)
    train_mask, val_mask = split_by_episode(scenes.episode, cfg.val_fraction, cfg.seed)
    train, val = scenes.subset(np.flatnonzero(train_mask)), scenes.subset(np.flatnonzero(val_mask))
    device = resolve_device(cfg.device)
    out = Path(cfg.out) if cfg.out else run_dir / "checkpoint"
    settings = TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                             seed=cfg.seed)
    bar = tqdm(total=cfg.epochs, desc=f"fit {len(train)} scenes", unit="epoch", dynamic_ncols=True)

    def on_epoch(record: dict[str, float]) -> None:
        bar.n = record["epoch"]
        bar.set_postfix(train=f"{record['train_loss']:.3f}", val_nll=f"{record['val_nll']:.3f}")
        bar.refresh()

    start = time.perf_counter()
    try:
        history = fit(train, val, model_cfg, settings, out,
                      {"data": sources, "history_dt": cfg.history_dt, "train_scenes": len(train),
                       "val_scenes": len(val), "val_episodes": sorted(set(val.episode.tolist()))}, device, on_epoch,
                      Path(cfg.init) if cfg.init else None)
    finally:
        bar.close()
    train_seconds = time.perf_counter() - start
    model, _ = load_forecaster(out, device)
    held = load_scenes(cfg.holdout, model_cfg, cfg.history_dt)[0] if cfg.holdout else val
    figures = validate(model, held, device, policy_dt, seed=cfg.seed)
    _forecaster_report(figures, run_dir, f"forecaster on {'held-out data' if cfg.holdout else 'the val split'}")
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


def run_bench_plan(cfg: C.BenchPlanConfig, run_dir: Path) -> dict[str, Any]:
    from drive_mbrl.bench import bench_plan

    if not cfg.checkpoint:
        raise C.ConfigError("bench plan needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
    metrics = bench_plan(cfg.checkpoint, cfg.scenario, cfg.budgets, cfg.members, cfg.decisions,
                         cfg.oracle_decisions, cfg.planner, cfg.seed)
    print(f"device {metrics['device']}, {metrics['threads']} threads, {metrics['samples']} samples per member")
    for row in metrics["rows"]:
        print(f"budget {row['budget']:>5} ({row['plans_scored']} scored), members {row['members']}: "
              f"p50 {row['ms_p50']:.1f} ms, p99 {row['ms_p99']:.1f} ms")
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
    from drive_mbrl.export import export_bundle

    if not cfg.checkpoint:
        raise C.ConfigError("export needs checkpoint=<forecaster folder> (train one with `drive-mbrl fit`)")
    out = Path(cfg.out) if cfg.out else Path("export/bundles") / Path(cfg.checkpoint).resolve().name
    result = export_bundle(cfg.checkpoint, out, cfg.dataset, cfg.samples, cfg.seed,
                           cfg.planner if cfg.planner_scenes else None, cfg.planner_scenes)
    if "planner" in result["parity"]:
        p = result["parity"]["planner"]
        print(f"planner parity, {p['scenes']} recorded scenes: same action with the same noise "
              f"{p['same_action_same_noise']:.1%}, with independent noise {p['same_action_independent_noise']:.1%}")
    for graph, figures in result["parity"].items():
        for kind, row in figures.items() if graph != "planner" else ():
            print(f"{graph} parity, {row['inputs']} {kind} inputs: max |onnx - torch| " + ", ".join(
                f"{k} {v:.2g}" for k, v in row["max_abs_error"].items()))
    print(f"bundle: {out} ({', '.join(result['contract']['graphs'])})")
    return {"bundle": str(out.resolve()), "graphs": list(result["contract"]["graphs"]), "parity": result["parity"]}


COMMANDS: dict[str, Command] = {
    "collect": Command(C.CollectConfig, run_collect, "collect tracked episodes of an agent into a dataset"),
    "evaluate": Command(C.EvaluateConfig, run_evaluate, "closed-loop evaluation with safety metrics"),
    "fit": Command(C.FitConfig, run_fit, "train the forecaster ensemble on datasets (validates at the end)"),
    "validate": Command(C.ValidateConfig, run_validate, "forecaster figures per horizon vs physics baselines"),
    "pipeline": Command(C.PipelineConfig, run_pipeline, "the main job: every stage on the default scenario"),
    "bench_collect": Command(C.BenchCollectConfig, run_bench_collect, "collection steps/s vs worker count"),
    "train": Command(C.TrainConfig, run_train, "the model-based RL loop: fit -> plan -> collect, learning curve"),
    "export": Command(C.ExportConfig, run_export, "ONNX bundle of the models with contract and parity check"),
    "bench_plan": Command(C.BenchPlanConfig, run_bench_plan, "MPC decision latency vs budget and members"),
    "bench_forecaster": Command(C.BenchForecasterConfig, run_bench_forecaster,
                                "forecaster scene-rollouts/s vs number of candidate plans"),
}


def usage() -> str:
    lines = ["usage: drive-mbrl <command> [key=value ...] [hydra flags: --cfg job, -m, hydra.run.dir=PATH]", "",
             "commands:"]
    for name, command in COMMANDS.items():
        lines.append(f"  {name.replace('_', ' '):<16} {command.help}")
    lines += ["", "`drive-mbrl <command> --cfg job` prints a command's config with its defaults;",
              "every command writes metrics.json into its run directory."]
    return "\n".join(lines)


def _remove_if_only_hydra_files(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start-up (a failed run leaves no dir)."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        import shutil

        shutil.rmtree(run_dir)


def _run_hydra(name: str) -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from drive_mbrl.data import write_json
    from drive_mbrl.resources import data_dir

    command = COMMANDS[name]
    ConfigStore.instance().store(name=f"{name}_schema", node=command.schema)

    @hydra.main(version_base="1.3", config_path=str(data_dir("configs")), config_name=name)
    def task(cfg: Any) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            typed = C.validate(OmegaConf.to_object(cfg))
            metrics = command.run(typed, run_dir)
            write_json(run_dir / "metrics.json", {"command": name, **metrics})
        except DriveMbrlError as exc:
            _remove_if_only_hydra_files(run_dir)
            print(f"drive-mbrl {name.replace('_', ' ')}: error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            print(f"\ndrive-mbrl {name.replace('_', ' ')}: interrupted; everything finished so far is on disk in "
                  f"{run_dir} — rerun the same command to resume", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    task()


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
    _run_hydra(name)


if __name__ == "__main__":
    main()
