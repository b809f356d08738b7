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
from drive_mbrl.scenarios import load_scenario


def bench_collect(scenario: str, agent: str, episodes: int, workers: list[int], repeats: int,
                  seed: int) -> dict[str, Any]:
    """Collection throughput [env steps/s] for each worker count, same seeds, alternating repeats.

    Each measurement collects `episodes` fresh episodes into a temp folder, Ray start-up included for Ray runs
    (`seconds`), and also reports the steps/s of the episode phase alone. Also checks that every worker count
    produced identical data (episode digests).
    """
    spec = RunSpec(load_scenario(scenario), agent, episodes, seed)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
    digests: dict[int, list[str]] = {}
    for _ in range(repeats):
        for w in workers:
            with tempfile.TemporaryDirectory(prefix="drive_mbrl_bench_") as tmp:
                start = time.perf_counter()
                result = collect(spec, Path(tmp) / "ds", workers=w)
                seconds = time.perf_counter() - start
                runs[w].append({"seconds": seconds, "steps": result["steps_new"],
                                "steps_per_s": result["steps_new"] / seconds})
                digests.setdefault(w, [episode_digest(ep) for ep in load_dataset(Path(tmp) / "ds")[1]])
    base = median(r["steps_per_s"] for r in runs[workers[0]])
    rows = []
    for w in workers:
        rates = [r["steps_per_s"] for r in runs[w]]
        rows.append({"workers": w, "steps_per_s": rates, "steps_per_s_median": median(rates),
                     "seconds_median": median(r["seconds"] for r in runs[w]),
                     "steps": runs[w][0]["steps"], "speedup_vs_baseline": median(rates) / base})
    identical = all(d == digests[workers[0]] for d in digests.values())
    return {"scenario": spec.scenario.name, "agent": agent, "episodes": episodes, "repeats": repeats,
            "rows": rows, "identical_data": identical}
