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
