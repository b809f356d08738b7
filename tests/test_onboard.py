"""The onboard runner: provider choice, session settings, clear errors for bad bundles and bad inputs, and no torch
anywhere in its import graph."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drive_mbrl.onboard import (
    BundleError,
    RuntimeSettings,
    choose_providers,
    cuda_libraries_load,
    gpu_present,
    load_bundle,
    make_session,
)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def _feeds(rng: np.random.Generator, batch: int = 2, plans: int = 3) -> dict[str, np.ndarray]:
    """Inputs of the tiny forecaster graph (4 agents, 3 history frames, horizon 3)."""
    return {"history": rng.normal(size=(batch, 4, 3, 12)).astype(np.float32),
            "agent_mask": np.ones((batch, 4), bool),
            "plans": rng.integers(0, 5, (batch, plans, 3))}


def test_cpu_is_chosen_quietly_unless_cuda_is_really_usable():
    usable = gpu_present() and cuda_libraries_load()
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in choose_providers("auto")) == (
        usable and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers())
    if not usable:
        with pytest.raises(BundleError, match="device=cuda, but CUDA is not usable"):
            choose_providers("cuda")
    with pytest.raises(BundleError, match="device='tpu' is not known"):
        choose_providers("tpu")


def test_sessions_use_one_thread_without_spinning_by_default(tiny_bundle: Path):
    session = make_session(tiny_bundle / "forecaster.onnx")
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    busy = make_session(tiny_bundle / "forecaster.onnx", RuntimeSettings(threads=2, spinning=True))
    assert busy.get_session_options().intra_op_num_threads == 2
    assert busy.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_a_loaded_bundle_runs_and_checks_input_shapes(tiny_bundle: Path):
    bundle = load_bundle(tiny_bundle, only=("forecaster",))
    graph = bundle.graph("forecaster")
    assert bundle.providers == graph.session.get_providers()  # what runs, not what was asked for
    nan = _feeds(np.random.default_rng(0))
    nan["history"][1, 2, 0, 3] = np.nan
    with pytest.raises(BundleError, match=r"input history holds NaN or inf at \[1 2 0 3\]"):
        graph.run(**nan)
    out = graph.run(**_feeds(np.random.default_rng(0), batch=2, plans=3))
    assert out["mean"].shape == (2, 2, 3, 4, 2, 3, 4) and np.isfinite(out["mean"]).all()
    bad = _feeds(np.random.default_rng(0))
    bad["history"] = bad["history"][:, :3]  # 3 agent slots, the contract says 4
    with pytest.raises(BundleError, match=r"history has shape \(2, 3, 3, 12\), the contract says \(B, 4, 3, 12\)"):
        graph.run(**bad)
    mixed = _feeds(np.random.default_rng(0))
    mixed["agent_mask"] = np.ones((5, 4), bool)
    with pytest.raises(BundleError, match="axis B is 2 in another input"):
        graph.run(**mixed)
    with pytest.raises(BundleError, match=r"takes inputs \['agent_mask', 'history', 'plans'\]"):
        graph.run(history=bad["history"])
    wrong_type = _feeds(np.random.default_rng(0))
    wrong_type["plans"] = wrong_type["plans"].astype(np.float32)
    with pytest.raises(BundleError, match="input plans has dtype float32, the contract says int64"):
        graph.run(**wrong_type)


def test_missing_bundle_and_missing_graph_file_are_named(tiny_bundle: Path, tmp_path: Path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    copy = _copy(tiny_bundle, tmp_path)
    (copy / "forecaster.onnx").unlink()
    with pytest.raises(BundleError, match="lacks forecaster.onnx"):
        load_bundle(copy)
    (copy / "contract.json").unlink()
    with pytest.raises(BundleError, match="contract.json is missing"):
        load_bundle(copy)


def test_another_schema_version_is_refused(tiny_bundle: Path, tmp_path: Path):
    copy = _copy(tiny_bundle, tmp_path)
    contract = json.loads((copy / "contract.json").read_text())
    contract["schema_version"] = 99
    (copy / "contract.json").write_text(json.dumps(contract))
    with pytest.raises(BundleError, match="schema version 99, this drive_mbrl reads 1"):
        load_bundle(copy)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda g: g["inputs"][0].update(name="scene"), r"inputs are \['history', 'agent_mask', 'plans'\]"),
    (lambda g: g["inputs"][0].update(shape=["B", 5, 3, 12]), r"input history has shape \(B, 4, 3, 12\)"),
    (lambda g: g["outputs"][2].update(dtype="float64"), "output logits is float32, its contract says float64"),
])
def test_a_contract_that_does_not_match_its_graph_is_refused(tiny_bundle: Path, tmp_path: Path, edit, message):
    copy = _copy(tiny_bundle, tmp_path)
    contract = json.loads((copy / "contract.json").read_text())
    edit(contract["graphs"]["forecaster"])
    (copy / "contract.json").write_text(json.dumps(contract))
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_a_changed_or_damaged_graph_file_is_refused(tiny_bundle: Path, tmp_path: Path):
    copy = _copy(tiny_bundle, tmp_path)
    data = bytearray((copy / "forecaster.onnx").read_bytes())
    (copy / "forecaster.onnx").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(BundleError, match="does not match the sha256"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        make_session(copy / "forecaster.onnx")


def test_the_onboard_runner_never_imports_torch(tiny_bundle: Path):
    code = ("import sys, numpy as np; from drive_mbrl.onboard import load_bundle; "
            f"g = load_bundle({str(tiny_bundle)!r}, only=('forecaster',)).graph('forecaster'); "
            "out = g.run(history=np.zeros((1, 4, 3, 12), np.float32), agent_mask=np.ones((1, 4), bool), "
            "plans=np.zeros((1, 2, 3), np.int64)); "
            "print(out['reward'].shape, sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "(2, 1, 2, 3) []"


@pytest.mark.parametrize("graph", ["policy", "planner"])
def test_agent_onnx_drives_a_real_episode_without_torch(tiny_bundle: Path, graph: str):
    code = ("import json, sys; from drive_mbrl.rollout import EpisodeJob, EpisodeRunner; "
            "from drive_mbrl.scenarios import load_scenario; "
            f"options = json.dumps({{'bundle': {str(tiny_bundle)!r}, 'graph': {graph!r}}}); "
            "ep = EpisodeRunner().run(EpisodeJob(load_scenario('highway'), 'onnx', 0, 11, max_steps=4, "
            "agent_options=options)); "
            "print(json.dumps({'steps': ep.steps, 'crashed': bool(ep.crashed.any()), 'actions': ep.action.tolist(), "
            "'torch': sorted(m for m in sys.modules if m.split('.')[0] == 'torch')}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch"] == []
    assert result["steps"] == 4 or result["crashed"]
    assert all(0 <= a < 5 for a in result["actions"])


def test_agent_onnx_acts_as_the_torch_planner_given_its_inputs(tiny_bundle: Path, tiny_checkpoint: Path):
    import torch

    from drive_mbrl.config import PlannerConfig
    from drive_mbrl.egomotion import HighwayReward
    from drive_mbrl.export_planner import PLANNER_OUTPUTS, PlannerGraph
    from drive_mbrl.fit import load_forecaster
    from drive_mbrl.onboard import OnnxAgent
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
    from drive_mbrl.scenarios import load_scenario

    agent = OnnxAgent(str(tiny_bundle), graph="planner")
    spec = agent.graph.spec
    model, _ = load_forecaster(tiny_checkpoint, "cpu")
    reward = spec["ego_reward"] and HighwayReward(**{**spec["ego_reward"],
                                                     "speed_range": tuple(spec["ego_reward"]["speed_range"])})
    torch_graph = PlannerGraph(model, PlannerConfig(**spec["settings"]), agent.bundle.contract["actions"],
                               spec["frames_per_step"], spec["sim_dt"], reward)
    names = [t["name"] for t in spec["inputs"]]
    steps: list[tuple[int, int]] = []
    act = agent.act

    def checked(obs, env):
        action = act(obs, env)
        with torch.no_grad():
            out = torch_graph(*(torch.as_tensor(agent.last_inputs[n]) for n in names))
        steps.append((action, int(dict(zip(PLANNER_OUTPUTS, out, strict=True))["action"])))
        return action

    agent.act = checked
    runner = EpisodeRunner()
    try:
        episode = runner.run(EpisodeJob(load_scenario("highway"), "onnx", 0, 3, max_steps=5), agent)
    finally:
        runner.close()
    assert len(steps) == episode.steps >= 1
    assert [a for a, _ in steps] == [t for _, t in steps]
    assert episode.action.tolist() == [a for a, _ in steps]


def test_agent_onnx_drives_exactly_as_the_torch_policy_on_the_same_seed(tiny_bundle: Path, tiny_policy: Path):
    from drive_mbrl.onboard import OnnxAgent
    from drive_mbrl.policy import PolicyAgent
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
    from drive_mbrl.scenarios import load_scenario

    runner = EpisodeRunner()
    try:
        episodes = [runner.run(EpisodeJob(load_scenario("highway"), name, 0, 21, max_steps=8), agent)
                    for name, agent in (("policy", PolicyAgent(str(tiny_policy))),
                                        ("onnx", OnnxAgent(str(tiny_bundle), graph="policy")))]
    finally:
        runner.close()
    torch_episode, onnx_episode = episodes
    assert onnx_episode.action.tolist() == torch_episode.action.tolist()
    assert len(set(torch_episode.action.tolist())) > 1  # the random policy does not just repeat one action
    np.testing.assert_array_equal(onnx_episode.state, torch_episode.state)


def test_agent_onnx_drives_a_route_policy_exactly_as_torch(tiny_checkpoint: Path, tmp_path: Path):
    """A policy that observes its route (`route_ahead`): the bundle carries the distances, the onboard agent builds
    the same route points from its env, and both drive the same episode."""
    import torch

    from drive_mbrl.data import read_manifest
    from drive_mbrl.export import export_bundle
    from drive_mbrl.onboard import OnnxAgent
    from drive_mbrl.policy import PolicyAgent, PolicyConfig, PolicyNet, dataset_observations, save_policy
    from drive_mbrl.rollout import EpisodeJob, EpisodeRunner
    from drive_mbrl.scenarios import load_scenario

    data = str(tiny_checkpoint.parent / "data")
    torch.manual_seed(1)
    net = PolicyNet(PolicyConfig(agents=4, hidden=16, route_ahead=(10.0, 40.0)))
    net.set_normalisation(dataset_observations(net.config, [data]))
    with torch.no_grad():
        net.head.weight.mul_(30.0)
    save_policy(tmp_path / "policy", net, read_manifest(Path(data))["action_names"], {})
    bundle = tmp_path / "bundle"
    export_bundle(tiny_checkpoint, bundle, samples=8, policy=tmp_path / "policy")
    runner = EpisodeRunner()
    try:
        torch_episode, onnx_episode = [
            runner.run(EpisodeJob(load_scenario("highway"), name, 0, 23, max_steps=8), agent)
            for name, agent in (("policy", PolicyAgent(str(tmp_path / "policy"))),
                                ("onnx", OnnxAgent(str(bundle), graph="policy")))]
    finally:
        runner.close()
    assert onnx_episode.action.tolist() == torch_episode.action.tolist()
    np.testing.assert_array_equal(onnx_episode.state, torch_episode.state)
