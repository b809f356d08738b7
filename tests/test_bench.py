"""Benchmark helpers: work counts derivable by hand, and the invariants of `bench plan`'s compute bound."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drive_mbrl.bench import count_flops
from drive_mbrl.forecaster import EnsembleLinear
from tests.conftest import run_cli


def test_count_flops_by_hand():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    layer = EnsembleLinear(5, 8, 3)  # one baddbmm over the members: 2 x E x N x I x O
    x = torch.randn(5, 10, 8)
    with torch.no_grad():
        assert count_flops(lambda: layer(x)) == 2 * 5 * 10 * 8 * 3
    assert count_flops(lambda: torch.relu(a)) == 0  # elementwise work is not counted


def test_bench_plan_work_scales_with_members_and_bounds_the_latency(tiny_checkpoint: Path, tmp_path: Path):
    done = run_cli("bench", "plan", f"checkpoint={tiny_checkpoint}", "budgets=[125]", "members=[1,2]",
                   "decisions=3", "oracle_decisions=0", "planner.threads=1", f"hydra.run.dir={tmp_path / 'b'}",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    rows = {row["members"]: row for row in metrics["rows"]}
    # All 5^3 plans of the tiny model's horizon fit the budget (exhaustive: the same plans for both ensembles), and
    # every layer of the forecaster runs once per member, so the counted work is exactly proportional to members.
    assert rows[1]["plans_scored"] == rows[2]["plans_scored"] == 125
    assert rows[2]["gflop"] == 2 * rows[1]["gflop"] > 0
    for row in rows.values():
        assert row["compute_bound_ms"] == row["gflop"] / metrics["matmul_peak_gflops"] * 1e3
        assert row["compute_bound_ms"] < row["ms_p50"]  # nothing runs faster than the matmul peak
