"""Plots: interval arithmetic by hand, and each plot kind from metrics.json files through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from drive_mbrl.errors import DataError
from drive_mbrl.plots import mean_interval, plot_metrics, summary_intervals, wilson_interval
from tests.conftest import run_cli


def test_wilson_interval_by_hand():
    # 0 of 20: upper bound z^2 / (n + z^2) = 3.8415 / 23.8415.
    p, lo, hi = wilson_interval(0, 20)
    assert (p, lo) == (0.0, 0.0) and hi == pytest.approx(3.841459 / 23.841459, rel=1e-5)
    p, lo, hi = wilson_interval(10, 20)
    assert p == 0.5 and (lo + hi) / 2 == pytest.approx(0.5)


def test_mean_interval_by_hand():
    # sample sd sqrt(4 / 3), n 4, t(3) = 3.182: half width 3.182 x sqrt(4 / 3) / 2
    mean, lo, hi = mean_interval(np.array([1.0, 3.0, 1.0, 3.0]))
    assert mean == 2.0 and hi - mean == pytest.approx(3.182 * math.sqrt(4 / 3) / 2, rel=1e-6)
    assert mean - lo == pytest.approx(hi - mean)
    from drive_mbrl.plots import t95

    assert t95(100) == pytest.approx(1.984, abs=1e-3) and t95(30) == 2.042
    assert summary_intervals({"episodes": 4, "return_mean": 2.0, "return_std": 1.0, "crash_rate": 0.25,
                              "speed_mean": 20.0})["return_mean"][2] == pytest.approx(hi)


def per_horizon(error: float) -> list[dict]:
    return [{"horizon_s": h, "ml_l2_mean": error * h, "baselines": {"constant_velocity": {"l2_mean": 2.0 * h}},
             "coverage": {f"{a:.1f}": a for a in np.arange(1, 10) / 10}} for h in (1.0, 2.0)]


def write(folder: Path, metrics: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_every_plot_kind_writes_a_png(tmp_path: Path):
    evals = [write(tmp_path / name, {"command": "evaluate", "episodes": 10, "return_mean": r, "return_std": 1.0,
                                     "crash_rate": c, "speed_mean": 25.0}) for name, r, c in
             (("idm", 20.0, 0.0), ("mpc", 26.0, 0.1))]
    val = write(tmp_path / "val", {"command": "validate", "per_horizon": per_horizon(1.0)})
    fit = write(tmp_path / "fit", {"command": "fit", "validation": {"per_horizon": per_horizon(0.5)}})
    train = write(tmp_path / "train", {"command": "train", "learning_curve": [
        {"iteration": i, "real_steps": 500 * (i + 1), "return_mean": 20.0 + i, "crash_rate": 0.1, "speed_mean": 25.0}
        for i in range(3)]})
    for kind, inputs in (("evaluation", evals), ("forecaster", [val, fit]), ("reliability", [val, fit]),
                         ("learning", [train])):
        path = plot_metrics(kind, inputs, [], tmp_path / f"{kind}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(DataError, match="comes from `validate`, this plot needs metrics of evaluate"):
        plot_metrics("evaluation", [val], [], tmp_path / "x.png")
    with pytest.raises(DataError, match="does not exist"):
        plot_metrics("evaluation", [tmp_path / "nowhere"], [], tmp_path / "x.png")


def test_plot_cli(tmp_path: Path):
    write(tmp_path / "a", {"command": "evaluate", "episodes": 4, "return_mean": 1.0, "return_std": 0.5,
                           "crash_rate": 0.0, "speed_mean": 20.0})
    result = run_cli("plot", "kind=evaluation", "inputs=[a,a]", "labels=[one,two]", "hydra.run.dir=out",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "evaluation.png").is_file()
    bad = run_cli("plot", "kind=evaluation", "inputs=[a]", "labels=[one,two]", "hydra.run.dir=bad", cwd=tmp_path)
    assert bad.returncode == 2 and "labels has 2 entries for 1 inputs" in bad.stderr


def test_episode_intervals_read_a_dataset_folder_as_collect_writes_it(tmp_path: Path):
    """The pipeline's agents plot passes dataset folders (manifest.json + episodes/), not evaluate run folders."""
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.plots import episode_intervals
    from drive_mbrl.scenarios import load_scenario

    collect(RunSpec(load_scenario("highway"), "idm", 2, 0, max_steps=3), tmp_path / "d")
    figures = episode_intervals(tmp_path / "d")
    assert figures is not None and figures["speed_mean"][1] < figures["speed_mean"][2]
