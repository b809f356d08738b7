"""Benchmarks as commands: medians over repeated, alternating measurements and ratios against a baseline measured
in the same run (these machines are shared and noisy, so absolute figures from another run are not comparable).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from drive_mbrl.data import RunSpec, collect, episode_digest, load_dataset
from drive_mbrl.raycluster import start_ray
from drive_mbrl.scenarios import load_scenario


def bench_collect(scenario: str, agent: str, episodes: int, workers: list[int], repeats: int,
                  seed: int) -> dict[str, Any]:
    """Collection throughput [env steps/s] for each worker count, same seeds, alternating repeats.

    Each measurement collects `episodes` fresh episodes into a temp folder: actor start-up (a fresh worker process
    importing highway-env) is inside the timing, Ray's own start-up is not — Ray is started once before the first
    measurement, timed separately (`ray_start_s`), and `steps_per_s_with_ray_start` charges it to every Ray run as a
    one-off collection would pay it. Also checks that every worker count produced identical data (episode digests).
    """
    spec = RunSpec(load_scenario(scenario), agent, episodes, seed)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
    digests: dict[int, list[str]] = {}
    ray_start_s, ray = 0.0, None
    if max(workers) > 1:
        start = time.perf_counter()
        ray, _ = start_ray("", max(workers))
        ray_start_s = time.perf_counter() - start
    try:
        for _ in range(repeats):
            for w in workers:
                with tempfile.TemporaryDirectory(prefix="drive_mbrl_bench_") as tmp:
                    start = time.perf_counter()
                    result = collect(spec, Path(tmp) / "ds", workers=w)
                    seconds = time.perf_counter() - start
                    runs[w].append({"seconds": seconds, "steps": result["steps_new"]})
                    digests.setdefault(w, [episode_digest(ep) for ep in load_dataset(Path(tmp) / "ds")[1]])
    finally:
        if ray is not None:
            ray.shutdown()
    rows = []
    for w in workers:
        rates = [r["steps"] / r["seconds"] for r in runs[w]]
        charged = [r["steps"] / (r["seconds"] + (ray_start_s if w > 1 else 0.0)) for r in runs[w]]
        rows.append({"workers": w, "steps": runs[w][0]["steps"], "steps_per_s": rates,
                     "steps_per_s_median": median(rates), "steps_per_s_with_ray_start": median(charged),
                     "seconds_median": median(r["seconds"] for r in runs[w])})
    for row in rows:
        row["speedup_vs_baseline"] = row["steps_per_s_median"] / rows[0]["steps_per_s_median"]
        row["speedup_with_ray_start"] = row["steps_per_s_with_ray_start"] / rows[0]["steps_per_s_with_ray_start"]
    identical = all(d == digests[workers[0]] for d in digests.values())
    return {"scenario": spec.scenario.name, "agent": agent, "episodes": episodes, "repeats": repeats,
            "ray_start_s": ray_start_s, "rows": rows, "identical_data": identical}


def bench_forecaster(checkpoint: str, candidates: list[int], repeats: int, device: str,
                     threads: int) -> dict[str, Any]:
    """Scene-rollouts per second of `forecaster.rollout` for one scene and N candidate plans, N in `candidates`.

    Uses the checkpoint's model, or a freshly initialised default-size model when `checkpoint` is empty (speed does
    not depend on the weights). Reports the median wall time over `repeats` calls after one warm-up call, the
    parameter count and size, and the process's peak resident memory.
    """
    import resource

    import torch

    from drive_mbrl.features import HIST_FEATURES
    from drive_mbrl.fit import load_forecaster, resolve_device
    from drive_mbrl.forecaster import Forecaster, ForecasterConfig, rollout

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    model = load_forecaster(checkpoint, dev)[0] if checkpoint else Forecaster(ForecasterConfig()).to(dev).eval()
    c = model.config
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(c.agents, c.history_len, len(HIST_FEATURES), generator=gen).to(dev)
    mask = torch.ones(c.agents, dtype=torch.bool, device=dev)
    rows = []
    with torch.inference_mode():
        for n in candidates:
            plans = torch.randint(0, c.num_actions, (n, c.horizon), generator=gen).to(dev)
            rollout(model, history, mask, plans)
            times = []
            for _ in range(repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                rollout(model, history, mask, plans)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            t = median(times)
            rows.append({"candidates": n, "ms_median": t * 1e3, "scene_rollouts_per_s": n / t})
    params = sum(p.numel() for p in model.parameters())
    return {"device": str(dev), "threads": torch.get_num_threads(), "members": c.members, "modes": c.modes,
            "horizon": c.horizon, "agents": c.agents, "parameters": params, "parameter_mb": params * 4 / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}


def count_flops(call: Any) -> int:
    """Floating-point operations of `call()` in matmuls, batched matmuls and attention (torch's FlopCounterMode:
    2 per multiply-add; elementwise work is not counted, so the figure is a lower bound on the work)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def matmul_peak_gflops(device: Any = "cpu", repeats: int = 5, precision: str = "fp32") -> float:
    """The best matmul throughput [GFLOP/s] in `precision` (fp32 or bf16) this device reaches with the current
    torch threads, over a square 1,024 x 1,024 product and the forecaster's typical batched one (5 members x 4,096
    rows x 128 -> 384): the yardstick for `compute_bound_ms` (no model with that many FLOPs can be faster on this
    device)."""
    import torch

    from drive_mbrl.forecaster import PRECISION_DTYPES

    dtype = PRECISION_DTYPES[precision]

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = 0.0
    for a_shape, b_shape in (((1024, 1024), (1024, 1024)), ((5, 4096, 128), (5, 128, 384))):
        a, b = torch.randn(a_shape, device=device, dtype=dtype), torch.randn(b_shape, device=device, dtype=dtype)
        flops = 2 * a.numel() * b_shape[-1]
        torch.matmul(a, b)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def warmup_scenes(planner: Any) -> int:
    """Scenes planned before a planner's latency is timed: one, or with `planner.compile` three, so that the
    compilation (and its recompile once the second CEM iteration's shapes appear) stays out of the timings."""
    return 3 if planner.compile else 1


def _latency(times_ms: list[float]) -> dict[str, float]:
    ordered = sorted(times_ms)
    return {"ms_p50": median(ordered), "ms_p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "decisions": len(ordered)}


def bench_plan(checkpoint: str, scenario: str, budgets: list[int], members: list[int], decisions: int,
               oracle_decisions: int, planner: Any, seed: int) -> dict[str, Any]:
    """Decision latency of the MPC planner (p50, p99 [ms]) for each candidate budget x ensemble size, on scenes of
    real episodes, with the oracle's latency in the same run.

    Scenes: `decisions` policy steps of fresh idm episodes on `scenario` (seeds from `seed`), cut exactly as the
    planner cuts them. Every setting plans the same scenes, settings alternating per scene so that machine noise
    hits them alike. Ensembles smaller than the checkpoint's use its first members (`forecaster.member_subset`).
    The oracle drives `oracle_decisions` steps of an episode of the same scenario; its decision times are the
    episode loop's own.
    """
    import copy
    from dataclasses import asdict, replace

    import numpy as np
    import torch

    from drive_mbrl.data import agent_options_json
    from drive_mbrl.fit import load_forecaster, load_scenes, resolve_device
    from drive_mbrl.forecaster import compiled, low_precision, member_subset, planning_precision
    from drive_mbrl.planning import plan_scene
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner

    if planner.threads:
        torch.set_num_threads(planner.threads)
    dev = resolve_device(planner.device)
    model, meta = load_forecaster(checkpoint, dev)
    if max(members) > model.config.members:
        raise ValueError(f"members={members} asks for more than the checkpoint's {model.config.members} members")
    precision = planning_precision(planner.precision, meta, dev)
    eager = {m: low_precision(member_subset(model, m), precision) for m in members}
    models = {m: compiled(copy.deepcopy(net)) for m, net in eager.items()} if planner.compile else eager
    with tempfile.TemporaryDirectory(prefix="drive_mbrl_bench_") as tmp:
        episodes = max(1, -(-decisions // 25))
        collect(RunSpec(load_scenario(scenario), "idm", episodes, seed), Path(tmp) / "ds")
        scenes, _ = load_scenes([str(Path(tmp) / "ds")], model.config, meta["history_dt"])
    pick = np.linspace(0, len(scenes) - 1, min(decisions, len(scenes))).round().astype(int)
    inputs = [(torch.as_tensor(scenes.history[i], device=dev), torch.as_tensor(scenes.agent_mask[i], device=dev))
              for i in pick]
    times: dict[tuple[int, int], list[float]] = {(b, m): [] for b in budgets for m in members}
    evaluated: dict[tuple[int, int], int] = {}
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.inference_mode():
        for (b, m) in times:  # warm-up (compiling: on a few scenes, so that shapes of both CEM iterations are seen)
            for history, mask in inputs[: warmup_scenes(planner)]:
                plan_scene(models[m], history, mask, replace(planner, budget=b), gen)
        for history, mask in inputs:
            for (b, m), row in times.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                decision = plan_scene(models[m], history, mask, replace(planner, budget=b), gen)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row.append((time.perf_counter() - start) * 1e3)
                evaluated[(b, m)] = decision.evaluated
    # Work per decision against this device's matmul peak: the latency no implementation of this forecaster and
    # budget can beat here. Counted on the first scene only (the work follows its number of present agents and
    # distinct plans), so `achieved_gflops` (that work over the median time) is an estimate.
    peak = matmul_peak_gflops(dev, precision=precision)
    with torch.inference_mode():
        gflop = {key: count_flops(lambda k=key: plan_scene(eager[k[1]], *inputs[0], replace(planner, budget=k[0]),
                                                           gen)) / 1e9 for key in times}
    oracle = None
    if oracle_decisions:
        runner = EpisodeRunner()
        try:
            episode = runner.run(EpisodeJob(load_scenario(scenario), "oracle", 0, seed, max_steps=oracle_decisions,
                                            agent_options=agent_options_json({"planner": asdict(planner)})))
        finally:
            runner.close()
        oracle = {"depth": planner.oracle_depth, **_latency(list(episode.decision_ms))}
    return {"device": str(dev), "threads": torch.get_num_threads(), "precision": precision,
            "checkpoint": str(checkpoint), "scenario": scenario, "samples": planner.samples, "compile": planner.compile,
            "iterations": planner.iterations, "matmul_peak_gflops": peak,
            "rows": [{"budget": b, "members": m, "plans_scored": evaluated[(b, m)], **_latency(row),
                      "gflop": gflop[(b, m)], "compute_bound_ms": gflop[(b, m)] / peak * 1e3,
                      "achieved_gflops": gflop[(b, m)] / (median(row) / 1e3)}
                     for (b, m), row in times.items()],
            "oracle": oracle}


def bench_policy(policy: str, checkpoint: str, dataset: list[str], scenario: str, envs: list[int], steps: int,
                 real_steps: int, repeats: int, decisions: int, planner: Any, seed: int,
                 imagination: str = "", imagined_precision: str = "auto") -> dict[str, Any]:
    """Issue-5 speed figures on the same cores, one torch thread: imagined transitions/s of the imagination env
    (per batch size; its forecaster is `imagination`, default `checkpoint`) against real env steps/s of
    `imagination.PolicyEnv` (highway-env plus perception, random actions), alternating repeats; and the decision
    latency of the reactive policy (batch 1, torch eager) against the MPC planner's (on `checkpoint`) on the same
    recorded scenes. The imagination's network runs in `imagined_precision`, the planner's in `planner.precision`
    (`forecaster.low_precision`)."""
    import numpy as np
    import torch

    from drive_mbrl.fit import load_forecaster, load_scenes
    from drive_mbrl.forecaster import compiled, low_precision, planning_precision
    from drive_mbrl.imagination import (
        ImaginationConfig,
        ImaginationEnv,
        imagination_throughput,
        real_throughput,
    )
    from drive_mbrl.planning import plan_scene
    from drive_mbrl.policy import dataset_observations, load_policy

    torch.set_num_threads(1)
    net, _ = load_policy(policy)
    imagination = imagination or checkpoint
    config = ImaginationConfig(imagination, tuple(dataset), agents=net.config.agents, seed=seed,
                               precision=imagined_precision)
    probe = ImaginationEnv(config, 1)
    starts = (probe.starts_hist.numpy(), probe.starts_lane.numpy(), probe.starts_target)
    imagined: dict[int, list[float]] = {n: [] for n in envs}
    real: list[float] = []
    for r in range(repeats):
        real.append(real_throughput(scenario, real_steps, seed + r))
        for n in envs:
            imagined[n].append(imagination_throughput(ImaginationEnv(config, n, starts), steps, seed + r))
    real_median = median(real)
    # Work per imagined transition against this core's matmul peak: the most transitions/s any implementation of
    # this forecaster could step here, and that bound's ratio to the real env. Every env runs the same batched
    # layers, so the work per transition is the same at any batch size: counted once, on the one-env probe.
    imagined_precision = probe.precision  # `auto` resolved
    peak = matmul_peak_gflops(precision=imagined_precision)
    probe.reset(seed=seed)
    flop = count_flops(lambda: probe.step(np.full(1, probe.idle)))
    rows = [{"envs": n, "imagined_per_s": median(v), "ratio_to_real": median(v) / real_median,
             "mflop_per_transition": flop / 1e6, "compute_bound_per_s": peak * 1e9 / flop,
             "compute_bound_ratio": peak * 1e9 / flop / real_median}
            for n, v in imagined.items()]
    # Latency on recorded scenes: the policy's observation and the planner's scene of the same decisions.
    obs = dataset_observations(net.config, dataset[:1])[:decisions]
    model, meta = load_forecaster(checkpoint)
    scenes, _ = load_scenes([dataset[0]], model.config, meta["history_dt"])
    planner_precision = planning_precision(planner.precision, meta, "cpu")
    model = low_precision(model, planner_precision)
    if planner.compile:
        model = compiled(model)
    policy_us, planner_ms = [], []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for _ in range(3):
            net(torch.as_tensor(obs[:1]))
        for i in range(len(obs)):
            x = torch.as_tensor(obs[i:i + 1])
            for _ in range(20):
                start = time.perf_counter()
                net(x).argmax(-1)
                policy_us.append((time.perf_counter() - start) * 1e6)
        for i in range(min(warmup_scenes(planner), len(scenes))):  # warm-up
            plan_scene(model, torch.as_tensor(scenes.history[i]), torch.as_tensor(scenes.agent_mask[i]), planner,
                       gen)
        for i in range(min(decisions, len(scenes))):
            start = time.perf_counter()
            plan_scene(model, torch.as_tensor(scenes.history[i]), torch.as_tensor(scenes.agent_mask[i]), planner,
                       gen)
            planner_ms.append((time.perf_counter() - start) * 1e3)
    p50 = float(np.percentile(policy_us, 50))
    return {"scenario": scenario, "real_steps_per_s": real_median, "real_runs": real, "rows": rows,
            "matmul_peak_gflops": peak,
            "policy_us_p50": p50, "policy_us_p99": float(np.percentile(policy_us, 99)),
            "planner_ms_p50": float(np.percentile(planner_ms, 50)),
            "planner_ms_p99": float(np.percentile(planner_ms, 99)),
            "planner_over_policy": float(np.percentile(planner_ms, 50)) * 1e3 / p50,
            "planner_budget": planner.budget, "threads": 1, "imagination_checkpoint": imagination,
            "imagined_precision": imagined_precision, "planner_precision": planner_precision}


def bench_replay(run: str, episode: int, steps: int, repeats: int, dpi: int) -> dict[str, Any]:
    """Replay rendering speed [frames/s] over the first `steps` policy steps of an episode, one frame per step:
    drawing alone (`SceneView.render`) and drawing + GIF encoding (PillowWriter, as `write_replay` does), medians
    over `repeats`. The first frame, which draws the static background, is inside the timing."""
    import os

    from drive_mbrl.replay import SceneView, _gif_writer, load_replay

    replay = load_replay(Path(run), episode)
    frames = replay.episode.decision_frame[:steps]
    draw, encode = [], []
    for _ in range(repeats):
        view = SceneView(replay, dpi=dpi)
        try:
            start = time.perf_counter()
            images = [view.render(int(f)).copy() for f in frames]
            draw.append(time.perf_counter() - start)
            with tempfile.TemporaryDirectory(prefix="drive_mbrl_bench_") as tmp:
                writer = _gif_writer(1.0)
                start = time.perf_counter()
                with writer.saving(view.fig, str(Path(tmp) / "bench.gif"), dpi):
                    for image in images:
                        writer.add(image)
                encode.append(time.perf_counter() - start)
        finally:
            view.close()
    height, width = images[0].shape[:2]
    total = [d + e for d, e in zip(draw, encode, strict=True)]
    return {"run": run, "episode": episode, "frames": len(frames), "planning_log": replay.planned,
            "frame_pixels": [int(width), int(height)], "draw_fps": len(frames) / median(draw),
            "gif_fps": len(frames) / median(total), "draw_s": draw, "encode_s": encode, "cpus": os.cpu_count()}


def _alternate(calls: dict[str, Any], rounds: int, block: int = 1) -> dict[str, list[float]]:
    """Wall times [µs] of `rounds` calls of each (called with the round index), after `block` warm-up calls each,
    alternating between them every `block` calls (machine noise hits all alike; a block keeps a small model's
    caches warm, as an onboard loop that calls one model does)."""
    for call in calls.values():
        for i in range(block):
            call(i)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for first in range(0, rounds, block):
        for name, call in calls.items():
            for i in range(first, min(rounds, first + block)):
                start = time.perf_counter()
                call(i)
                times[name].append((time.perf_counter() - start) * 1e6)
    return times


def _percentiles(times_us: list[float]) -> dict[str, float]:
    ordered = sorted(times_us)
    return {"us_p50": median(ordered), "us_p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "calls": len(ordered)}


def bench_export(bundle: str, repeats: int, decisions: int, threads: int, datasets: list[str]) -> dict[str, Any]:
    """Batch-1 latency (p50, p99 [µs]) of each graph of a bundle in onnxruntime against the same model in torch
    eager, in this process, both on `threads` CPU threads (onnxruntime: intra-op threads, spinning off), alternating
    (in blocks of 100 / 50 calls for the policy / forecaster, call by call for the planner) so that machine noise
    hits both alike. The forecaster: one random scene, one plan, `repeats` calls;
    the policy: one observation, `repeats` calls of the greedy action (its source checkpoint must be unchanged).
    The planning step: `decisions` recorded scenes of `datasets` (default: those of the bundle's parity check), torch
    `planning.plan_scene` against the planner graph, each drawing its own noise (torch / numpy) inside the timing.
    """
    import json

    import torch

    from drive_mbrl.export import ForecasterGraph, random_scene_inputs
    from drive_mbrl.fit import BEST, load_forecaster
    from drive_mbrl.onboard import PARITY, RuntimeSettings, load_bundle, sha256_file

    torch.set_num_threads(threads)
    loaded = load_bundle(bundle, RuntimeSettings(device="cpu", threads=threads))
    source = loaded.contract["source"]
    checkpoint = Path(source["checkpoint"])
    if sha256_file(checkpoint / BEST) != source["weights_sha256"]:
        raise ValueError(f"{checkpoint / BEST} is not the checkpoint bundle {bundle} was exported from (sha256)")
    model, meta = load_forecaster(checkpoint, "cpu")
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        scene = random_scene_inputs(model, 1, 1, torch.Generator().manual_seed(0))
        feeds = {k: v.numpy() for k, v in scene.items()}
        torch_graph, graph = ForecasterGraph(model).eval(), loaded.graph("forecaster")
        times = _alternate({"torch": lambda i: torch_graph(*scene.values()),
                            "onnxruntime": lambda i: graph.session.run(None, feeds)}, repeats, block=50)
        rows["forecaster"] = {k: _percentiles(v) for k, v in times.items()}
        if "policy" in loaded.graphs:
            rows["policy"] = _bench_policy_graph(loaded, repeats)
        if "planner" in loaded.graphs:
            rows["planner"] = _bench_planner(loaded, model, meta, decisions, datasets or json.loads(
                (Path(bundle) / PARITY).read_text())["datasets"])
    for row in rows.values():
        row["speedup_p50"] = row["torch"]["us_p50"] / row["onnxruntime"]["us_p50"]
    return {"bundle": str(bundle), "threads": threads, "torch_threads": torch.get_num_threads(), "rows": rows}


def _bench_policy_graph(loaded: Any, repeats: int) -> dict[str, Any]:
    """Batch-1 latency of the bundle's policy graph against its source PolicyNet (greedy action, torch eager)."""
    import torch

    from drive_mbrl.onboard import sha256_file
    from drive_mbrl.policy import BEST, load_policy

    graph = loaded.graph("policy")
    source = Path(graph.spec["source"]["checkpoint"])
    if sha256_file(source / BEST) != graph.spec["source"]["weights_sha256"]:
        raise ValueError(f"{source / BEST} is not the policy the bundle was exported from (sha256)")
    net, _ = load_policy(source)
    obs = (net.obs_mean + net.obs_std * torch.randn(1, net.config.obs_dim, generator=torch.Generator().manual_seed(0)))
    feeds = {"obs": obs.numpy()}
    times = _alternate({"torch": lambda i: int(net(obs).argmax(-1)),
                        "onnxruntime": lambda i: int(graph.session.run(["action"], feeds)[0][0])}, repeats, block=100)
    return {k: _percentiles(v) for k, v in times.items()}


def _bench_planner(loaded: Any, model: Any, meta: dict[str, Any], decisions: int,
                   datasets: list[str]) -> dict[str, Any]:
    """Planning-step latency on recorded scenes: torch `plan_scene` against the bundle's planner graph. Not quite
    like for like: `plan_scene` sends only the scene's present agents through the forecaster, the graph (fixed
    shapes) every slot, so on scenes with empty slots torch does less work."""
    import numpy as np
    import torch

    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.data import read_manifest
    from drive_mbrl.egomotion import rollout_ego
    from drive_mbrl.export_planner import planner_inputs, scene_ego_state, step_noise
    from drive_mbrl.fit import load_scenes
    from drive_mbrl.planning import plan_scene

    spec, graph = loaded.graph("planner").spec, loaded.graph("planner")
    settings = PlannerConfig(**spec["settings"])
    scenes = load_scenes(datasets, model.config, meta["history_dt"])[0]
    pick = np.linspace(0, len(scenes) - 1, min(decisions, len(scenes))).round().astype(np.int64)
    names, rng, gen = loaded.contract["actions"], np.random.default_rng(0), torch.Generator().manual_seed(0)
    warm = np.full(model.config.horizon, spec["idle_action"])
    lanes = int(read_manifest(Path(datasets[0]))["env_config_resolved"].get("lanes_count", 3))
    inputs = []
    for i in pick:
        ego = scene_ego_state(scenes.history[i], lanes)
        feeds = {k: v.numpy() for k, v in planner_inputs(model, settings, scenes.history[i], scenes.agent_mask[i],
                                                         warm, ego, step_noise(model, settings, gen)).items()}
        inputs.append((torch.as_tensor(scenes.history[i]), torch.as_tensor(scenes.agent_mask[i]), ego, feeds))
    noisy = {t["name"]: t["shape"] for t in spec["inputs"] if t["name"] in ("candidates", "modes", "gauss")}

    def run_torch(i: int) -> Any:
        history, mask, ego, _ = inputs[i % len(inputs)]
        path = (lambda plans: rollout_ego(ego, plans, names, spec["frames_per_step"], spec["sim_dt"])) \
            if settings.ego_model == "kinematic" else None
        return plan_scene(model, history, mask, settings, gen, torch.as_tensor(warm), None, path)

    def run_onnx(i: int) -> Any:
        feeds = dict(inputs[i % len(inputs)][3])
        for name, shape in noisy.items():
            feeds[name] = rng.standard_normal(shape, dtype=np.float32) if name == "gauss" else rng.random(
                shape, dtype=np.float32)
        return graph.session.run(["action"], feeds)

    with torch.inference_mode():
        times = _alternate({"torch": run_torch, "onnxruntime": run_onnx}, len(inputs))
    return {"decisions": len(inputs), "budget": settings.budget, **{k: _percentiles(v) for k, v in times.items()}}
