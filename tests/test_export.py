"""ONNX export: the bundle's files and contract, onnxruntime against torch on fresh inputs, the planning step's
graph against the torch planner with the same noise, failing parity leaves no bundle, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from drive_mbrl.export import (
    PARITY_TOLERANCE,
    ExportError,
    ForecasterGraph,
    check_parity,
    export_bundle,
    forecaster_contract,
    parity,
    random_scene_inputs,
    write_bundle,
)
from drive_mbrl.features import HIST_FEATURES
from drive_mbrl.fit import BEST, load_forecaster, load_scenes
from drive_mbrl.forecaster import rollout
from drive_mbrl.onboard import make_session, sha256_file
from tests.conftest import run_cli


def test_bundle_holds_single_file_graphs_a_contract_and_passed_parity(tiny_bundle: Path, tiny_checkpoint: Path):
    assert sorted(p.name for p in tiny_bundle.iterdir()) == ["contract.json", "forecaster.onnx", "parity.json",
                                                             "planner.onnx", "policy.onnx"]
    contract = json.loads((tiny_bundle / "contract.json").read_text())
    assert contract["schema_version"] == 1 and contract["package"] == "drive_mbrl"
    assert contract["source"]["weights_sha256"] == sha256_file(tiny_checkpoint / BEST)
    assert contract["scene"]["hist_features"] == list(HIST_FEATURES)
    assert contract["actions"] == ["LANE_LEFT", "IDLE", "LANE_RIGHT", "FASTER", "SLOWER"]
    graph = contract["graphs"]["forecaster"]
    assert graph["sha256"] == sha256_file(tiny_bundle / "forecaster.onnx")
    assert [t["name"] for t in graph["inputs"]] == ["history", "agent_mask", "plans"]
    assert graph["inputs"][0]["shape"] == ["B", 4, 3, len(HIST_FEATURES)]  # tiny: 4 agents, 3 history frames
    assert graph["outputs"][0]["shape"] == [2, "B", "N", 4, 2, 3, 4]  # 2 members, 2 modes, horizon 3
    proto = onnx.load(str(tiny_bundle / "forecaster.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    figures = json.loads((tiny_bundle / "parity.json").read_text())["forecaster"]
    model, meta = load_forecaster(tiny_checkpoint, "cpu")
    scenes = load_scenes([s["path"] for s in meta["data"]["sources"]], model.config, meta["history_dt"])[0]
    assert figures["random"]["inputs"] == 40 and figures["recorded"]["inputs"] == min(40, len(scenes))
    for row in figures.values():
        assert max(row["max_scaled_error"].values()) <= PARITY_TOLERANCE


def test_onnxruntime_matches_rollout_on_new_batch_sizes(tiny_bundle: Path, tiny_checkpoint: Path):
    model, _ = load_forecaster(tiny_checkpoint, "cpu")
    inputs = random_scene_inputs(model, 5, 9, torch.Generator().manual_seed(3))  # B = 5, N = 9: not exported sizes
    session = make_session(tiny_bundle / "forecaster.onnx")
    got = dict(zip(["mean", "log_std", "logits", "reward", "crash_logit"],
                   session.run(None, {k: v.numpy() for k, v in inputs.items()}), strict=True))
    with torch.no_grad():
        expected = rollout(model, inputs["history"], inputs["agent_mask"], inputs["plans"])
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_graph_that_differs_from_torch_fails_parity(tiny_bundle: Path, tiny_checkpoint: Path):
    model, _ = load_forecaster(tiny_checkpoint, "cpu")
    with torch.no_grad():
        model.reward_mean += 1e-3  # the torch side drifts by 1e-3 on `reward` only
    inputs = random_scene_inputs(model, 6, 2, torch.Generator().manual_seed(1))
    figures = parity(make_session(tiny_bundle / "forecaster.onnx"), ForecasterGraph(model), forecaster_contract(model),
                     inputs, [4])
    assert figures["max_abs_error"]["reward"] == pytest.approx(1e-3, rel=1e-2)
    assert figures["max_abs_error"]["mean"] <= PARITY_TOLERANCE * figures["max_abs_value"]["mean"]
    with pytest.raises(ExportError, match="output reward differs from torch"):
        check_parity("forecaster", {"random": figures})


def test_a_failing_build_leaves_the_old_bundle_and_no_temp_folder(tmp_path: Path):
    out = tmp_path / "b"
    write_bundle(out, lambda folder: (folder / "x.onnx").write_bytes(b"old") and {"schema_version": 1})

    def failing(folder: Path) -> dict:
        (folder / "x.onnx").write_bytes(b"new")
        raise ExportError("parity failed")

    with pytest.raises(ExportError):
        write_bundle(out, failing)
    assert (out / "x.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_export_command_writes_a_bundle_and_names_a_missing_checkpoint(tiny_checkpoint: Path, tmp_path: Path):
    done = run_cli("export", f"checkpoint={tiny_checkpoint}", f"out={tmp_path / 'b'}", "samples=8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "forecaster parity, 8 random inputs" in done.stdout
    assert (tmp_path / "b" / "contract.json").is_file()
    missing = run_cli("export", f"checkpoint={tmp_path / 'nope'}", cwd=tmp_path)
    assert missing.returncode == 2 and "nope" in missing.stderr
    route = run_cli("export", f"checkpoint={tiny_checkpoint}", f"out={tmp_path / 'r'}", "planner.ego_model=route",
                    cwd=tmp_path)
    assert route.returncode == 2 and "planner.ego_model=route" in route.stderr and "planner_scenes=0" in route.stderr
    assert not (tmp_path / "r").exists()


def test_export_refuses_what_the_bundle_would_silently_drop(tiny_checkpoint: Path, tmp_path: Path):
    """A planner graph cannot hold a reactive policy, and parity data of another scenario would bake that
    scenario's rates into it: both stop before anything is written."""
    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.errors import ConfigError
    from drive_mbrl.scenarios import load_scenario

    with pytest.raises(ConfigError, match="takes no reactive policy"):
        export_bundle(tiny_checkpoint, tmp_path / "p", planner=PlannerConfig(fallback="policy"))
    collect(RunSpec(load_scenario("highway_dense"), "idm", 1, 0, max_steps=2), tmp_path / "dense")
    with pytest.raises(ConfigError, match="another scenario.*env_id highway-v0 against highway-fast-v0"):
        export_bundle(tiny_checkpoint, tmp_path / "d", datasets=[str(tmp_path / "dense")], planner=PlannerConfig())
    assert not (tmp_path / "p").exists() and not (tmp_path / "d").exists()


def test_the_planner_graph_picks_the_torch_planners_action_given_the_same_noise(tiny_bundle: Path,
                                                                                 tiny_checkpoint: Path):
    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.egomotion import HighwayReward, highway_reward, rollout_ego
    from drive_mbrl.export_planner import executed_action, planner_inputs, scene_ego_state, step_noise
    from drive_mbrl.onboard import load_bundle
    from drive_mbrl.planning import StepNoise, plan_step

    model, meta = load_forecaster(tiny_checkpoint, "cpu")
    scenes = load_scenes([s["path"] for s in meta["data"]["sources"]], model.config, meta["history_dt"])[0]
    bundle = load_bundle(tiny_bundle)
    spec = bundle.contract["graphs"]["planner"]
    settings = PlannerConfig(**spec["settings"])
    assert settings.budget == 64 and [t["shape"] for t in spec["inputs"] if t["name"] == "candidates"] == [[2, 32, 3]]
    # planner.reward=auto on highway: the graph scores the ego with highway-env's reward formula, as torch does.
    reward = HighwayReward(**{**spec["ego_reward"], "speed_range": tuple(spec["ego_reward"]["speed_range"])})
    graph, gen = bundle.graph("planner"), torch.Generator().manual_seed(7)
    for i, warm in zip([0, len(scenes) // 2, len(scenes) - 1], [[1, 1, 1], [3, 0, 1], [4, 4, 1]], strict=True):
        noise = step_noise(model, settings, gen)
        ego = scene_ego_state(scenes.history[i], lanes=3)
        feeds = planner_inputs(model, settings, scenes.history[i], scenes.agent_mask[i], np.array(warm), ego, noise)
        got = graph.run(**{k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            step = plan_step(model, feeds["history"], feeds["agent_mask"], settings,
                             StepNoise(noise.candidates, noise.modes, noise.gauss), feeds["warm_start"],
                             lambda plans, ego=ego: rollout_ego(ego, plans, bundle.contract["actions"], 5, 0.2),
                             ego_reward=lambda path: highway_reward(path[..., 4], path[..., 5], reward, 3))
        assert int(got["action"]) == int(executed_action(step, settings.fallback, 4))
        assert got["plan"].tolist() == step["plan"].tolist() and int(got["evaluated"]) == int(step["evaluated"])
        assert got["cost"] == pytest.approx(float(step["cost"]), abs=1e-4)
    parity_figures = json.loads((tiny_bundle / "parity.json").read_text())["planner"]
    assert parity_figures["scenes"] == 8 and parity_figures["same_action_same_noise"] == 1.0
    assert parity_figures["counts"]["same_noise_b"] == 8 and parity_figures["export_changed_agreement"] == 0
    assert parity_figures["same_action_independent_noise"] == parity_figures["torch_self_agreement_independent_noise"]


def test_the_policy_graph_gives_the_torch_policys_logits_and_greedy_action(tiny_bundle: Path, tiny_policy: Path):
    from drive_mbrl.onboard import load_bundle
    from drive_mbrl.policy import load_policy

    net, _ = load_policy(tiny_policy)
    graph = load_bundle(tiny_bundle, only=("policy",)).graph("policy")
    assert graph.spec["inputs"][0]["shape"] == ["B", 4 * 14 + 2] and graph.spec["history_dt"] == 1.0
    assert graph.spec["set_points"] and graph.spec["ego_features"] == ["lane", "target_speed"]
    obs = (net.obs_mean + net.obs_std * torch.randn(50, net.config.obs_dim, generator=torch.Generator().manual_seed(2)))
    got = graph.run(obs=obs.numpy())
    with torch.no_grad():
        logits = net(obs)
    np.testing.assert_allclose(got["logits"], logits.numpy(), atol=1e-5)
    assert got["action"].tolist() == logits.argmax(-1).tolist() and len(set(got["action"].tolist())) > 1
    figures = json.loads((tiny_bundle / "parity.json").read_text())["policy"]
    assert figures["random"]["inputs"] == 40 and figures["random"]["max_abs_error"]["action"] == 0.0


def test_bench_export_and_evaluate_agent_onnx_commands(tiny_bundle: Path, tmp_path: Path):
    done = run_cli("bench", "export", f"bundle={tiny_bundle}", "repeats=20", "decisions=2",
                   f"hydra.run.dir={tmp_path / 'bench'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "bench" / "metrics.json").read_text())["rows"]
    assert sorted(rows) == ["forecaster", "planner", "policy"]
    assert rows["policy"]["onnxruntime"]["calls"] == 20 and rows["planner"]["torch"]["calls"] == 2
    assert all(row["torch"]["us_p50"] > 0 and row["onnxruntime"]["us_p50"] > 0 for row in rows.values())
    done = run_cli("evaluate", "agent=onnx", f"bundle={tiny_bundle}", "onnx_graph=planner", "episodes=1",
                   "max_steps=2", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["steps"] in (1, 2)
    missing = run_cli("evaluate", "agent=onnx", f"bundle={tmp_path / 'none'}", "episodes=1", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_action_agreement_counts_each_comparison_and_the_scenes_where_the_export_changed_agreement():
    from drive_mbrl.export_planner import action_agreement

    torch_a = np.array([0, 1, 2, 3, 4, 1])
    onnx_a = np.array([0, 1, 2, 3, 4, 1])  # parity on every scene
    torch_b = np.array([0, 1, 4, 3, 0, 2])  # torch agrees with itself on scenes 0, 1, 3: 3 of 6
    onnx_b = np.array([0, 1, 4, 0, 0, 1])  # differs from torch_b on 3 (loses an agreement) and 5 (gains one)
    got = action_agreement(torch_a, onnx_a, torch_b, onnx_b)
    assert got["scenes"] == 6 and got["same_noise"] == 6 and got["same_noise_b"] == 4
    assert got["torch_self"] == 3 and got["independent"] == 3 and got["export_changed"] == 2
    assert got["torch_self_rate"] == 0.5 and got["same_noise_b_rate"] == pytest.approx(4 / 6)
    exact = action_agreement(torch_a, onnx_a, torch_b, torch_b)  # an exact export: ONNX vs torch = torch vs torch
    assert exact["independent"] == exact["torch_self"] and exact["export_changed"] == 0
