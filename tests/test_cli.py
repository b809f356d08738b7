"""The command line end to end on tiny budgets: help, Hydra flags, metrics.json, bad input, kill and resume."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from drive_mbrl.data import load_dataset
from drive_mbrl.distill import EXPERT_ACTION
from drive_mbrl.policy import PolicyAgent, episode_observations
from tests.conftest import cli_command, cli_env, run_cli

TINY = ["episodes=2", "max_steps=2"]


def test_help_lists_the_commands(tmp_path: Path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("collect", "evaluate", "pipeline", "bench collect"):
        assert command in result.stdout


def test_cfg_job_prints_the_typed_defaults(tmp_path: Path):
    result = run_cli("collect", "--cfg", "job", "episodes=7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "episodes: 7" in result.stdout and "scenario: highway" in result.stdout


def test_evaluate_writes_metrics_json_in_its_run_dir(tmp_path: Path):
    result = run_cli("evaluate", "agent=slower", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["episodes"] == 2 and metrics["crash_rate"] == 0.0 and metrics["seed"] == 1_000_000
    for key in ("return_mean", "return_std", "speed_mean", "ttc_min_p5", "decision_ms_p50", "decision_ms_p99"):
        assert key in metrics
    assert "return_mean" in result.stdout, "the figures are printed as a table too"
    assert len(list((tmp_path / "run" / "episodes" / "episodes").glob("ep_*.npz"))) == 2


def test_two_commands_in_the_same_second_get_their_own_run_dirs(tmp_path: Path):
    """The default run directory carries the process id: two commands started together never share one."""
    procs = [subprocess.Popen([*cli_command(), "evaluate", "agent=slower", "episodes=1", "max_steps=2"], cwd=tmp_path,
                              env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=240) == 0, proc.stderr.read()
    runs = sorted((tmp_path / "runs" / "evaluate").iterdir())
    assert len(runs) == 2
    assert {r.name.rsplit("_", 1)[1] for r in runs} == {str(p.pid) for p in procs}
    assert all((r / "metrics.json").is_file() for r in runs)


def test_a_run_dir_in_use_is_refused(tmp_path: Path):
    """While one process holds a run directory, a second command aimed at it stops with a usage error and
    writes no results there (Hydra has rewritten its own .hydra files by then)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    held = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (run / "mine.txt").write_text("kept")
        result = run_cli("evaluate", "agent=slower", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    finally:
        os.close(held)
    assert result.returncode == 2, result.stderr
    assert "is in use by another drive-mbrl process" in result.stderr
    assert (run / "mine.txt").read_text() == "kept" and not (run / "metrics.json").exists()


def test_multirun_sweeps_agents(tmp_path: Path):
    result = run_cli("evaluate", "-m", "agent=slower,idm", "episodes=1", "max_steps=2", "hydra.sweep.dir=sweep",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    agents = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["agent"] for i in (0, 1)]
    assert agents == ["slower", "idm"]


def _write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["scenario=nowhere"], "unknown scenario 'nowhere'"),
    (["scenario={tmp}/bad.yaml"], "unknown key(s) 'lanes'"),
    (["episodes=-1"], "episodes=-1 is out of range"),
    (["workers=0"], "workers=0 is out of range"),
])
def test_bad_input_gives_a_short_error_and_leaves_no_files(tmp_path: Path, args, message):
    _write_yaml(tmp_path / "bad.yaml", "name: bad\nenv_id: highway-fast-v0\nlanes: 3\n")
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("collect", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_truncated_episode_and_foreign_manifest_are_reported(tmp_path: Path):
    assert run_cli("collect", "agent=slower", *TINY, "out=ds", cwd=tmp_path).returncode == 0
    path = tmp_path / "ds" / "episodes" / "ep_000001.npz"
    path.write_bytes(path.read_bytes()[:100])
    result = run_cli("evaluate", "agent=slower", *TINY, "seed=0", "out=ds", cwd=tmp_path)
    assert result.returncode == 2 and "ep_000001.npz is truncated or corrupt" in result.stderr

    manifest = tmp_path / "ds" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version": 1', '"schema_version": 0'))
    result = run_cli("collect", "agent=slower", *TINY, "out=ds", cwd=tmp_path)
    assert result.returncode == 2 and "has schema version 0" in result.stderr


def test_sigkill_mid_collect_loses_and_duplicates_nothing(tmp_path: Path):
    args = ["collect", "agent=slower", "episodes=8", "out=ds", "hydra.run.dir=run"]
    proc = subprocess.Popen([*cli_command(), *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    episodes = tmp_path / "ds" / "episodes"
    deadline = time.monotonic() + 120
    while len(list(episodes.glob("ep_*.npz"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: p.read_bytes() for p in episodes.glob("ep_*.npz")}
    assert 2 <= len(survivors) < 8, "the kill landed mid-run"

    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["episodes_resumed"] == len(survivors) and metrics["episodes_new"] == 8 - len(survivors)
    _, loaded = load_dataset(tmp_path / "ds")
    assert [ep.index for ep in loaded] == list(range(8))
    assert {p.name: p.read_bytes() for p in episodes.glob("ep_*.npz") if p.name in survivors} == survivors
    assert not list(episodes.glob(".*"))



def test_ctrl_c_mid_collect_exits_130_and_names_the_dataset_folder(tmp_path: Path):
    args = ["collect", "agent=slower", "episodes=8", "out=ds", "hydra.run.dir=run"]
    # a shell starts background jobs with SIGINT ignored, and a child inherits that: restore Ctrl-C's default
    proc = subprocess.Popen([*cli_command(), *args], cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    episodes = tmp_path / "ds" / "episodes"
    deadline = time.monotonic() + 120
    while not list(episodes.glob("ep_*.npz")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"interrupted; everything finished so far is on disk in ds (run folder {tmp_path / 'run'})" in stderr
    _, kept = load_dataset(tmp_path / "ds")
    assert 1 <= len(kept) < 8, "the interrupt landed mid-run"
    assert not list(episodes.glob(".*"))


def test_fit_then_validate_on_a_tiny_dataset(tmp_path: Path):
    assert run_cli("collect", "agent=explore", "episodes=3", "max_steps=6", "out=ds", cwd=tmp_path).returncode == 0
    fit = run_cli("fit", "dataset=[ds]", "calibration=[ds]", "epochs=2", "members=2", "modes=2", "width=16",
                  "heads=2", "blocks=1", "horizon=3", "hydra.run.dir=fit", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["fit"]["epochs"] == 2 and len(metrics["learning_curve"]) == 2
    meta = json.loads((tmp_path / "fit" / "checkpoint" / "meta.json").read_text())
    assert meta["calibration"]["sources"][0]["episodes"] == 3, "the calibration data are recorded"
    assert len(metrics["fit"]["std_power"]) == 3 and all(0.5 <= b <= 2.0 for b in metrics["fit"]["std_power"])
    assert 0.25 <= metrics["fit"]["mode_temperature"] <= 8.0
    assert [r["horizon_s"] for r in metrics["validation"]["per_horizon"]] == [1.0, 2.0, 3.0]
    assert (tmp_path / "fit" / "report.png").stat().st_size > 10_000
    val = run_cli("validate", "checkpoint=fit/checkpoint", "dataset=[ds]", "hdr_samples=32", "hydra.run.dir=val",
                  cwd=tmp_path)
    assert val.returncode == 0, val.stderr
    figures = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert set(figures["per_horizon"][0]["baselines"]) == {"constant_velocity", "cv_lane_keeping",
                                                            "highway_env_constant_speed"}
    missing = run_cli("validate", "checkpoint=nowhere", "dataset=[ds]", cwd=tmp_path)
    assert missing.returncode == 2 and "nowhere is not a forecaster checkpoint" in missing.stderr


def test_calibrate_writes_a_copy_with_only_the_calibration_refitted(tmp_path: Path, tiny_checkpoint: Path):
    """`calibrate` refits the spread map, mode temperature and uncertainty limits on the given data, exactly as
    `validation.calibrate` does on a freshly loaded model, into a new folder; the weights and the original checkpoint
    stay as they were."""
    from drive_mbrl.fit import BEST, load_forecaster, load_scenes
    from drive_mbrl.validation import calibrate

    data = tiny_checkpoint.parent / "data"
    original = (tiny_checkpoint / BEST).read_bytes()
    result = run_cli("calibrate", f"checkpoint={tiny_checkpoint}", f"dataset=[{data}]", "out=recal",
                     "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tiny_checkpoint / BEST).read_bytes() == original
    before, _ = load_forecaster(tiny_checkpoint)
    after, meta = load_forecaster(tmp_path / "recal")
    reference, ref_meta = load_forecaster(tiny_checkpoint)
    scenes = load_scenes([str(data)], reference.config, ref_meta["history_dt"])[0]
    torch.manual_seed(0)
    calibrate(reference, scenes, torch.device("cpu"), seed=0)
    for name in ("std_scale", "std_power", "mode_temperature"):
        assert torch.equal(getattr(after, name), getattr(reference, name)), name
    assert torch.equal(after.uncertainty_quantiles, reference.uncertainty_quantiles)
    assert not torch.equal(after.std_scale, before.std_scale), "calibrated on other scenes than the val split"
    for name, value in before.state_dict().items():
        if name not in ("std_scale", "std_power", "mode_temperature", "uncertainty_quantiles"):
            assert torch.equal(value, after.state_dict()[name]), name
    assert meta["calibration"]["from"] == str(tiny_checkpoint) and meta["calibration"]["sources"][0]["episodes"] == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["std_scale"] == pytest.approx(after.std_scale.tolist())
    assert metrics["std_power"] == pytest.approx(after.std_power.tolist())
    assert metrics["mode_temperature"] == pytest.approx(after.mode_temperature.item())
    onto_itself = run_cli("calibrate", f"checkpoint={tiny_checkpoint}", f"dataset=[{data}]",
                          f"out={tiny_checkpoint}", "hydra.run.dir=run2", cwd=tmp_path)
    assert onto_itself.returncode == 2 and "is the checkpoint itself" in onto_itself.stderr
    assert (tiny_checkpoint / BEST).read_bytes() == original


@pytest.mark.parametrize(("command", "args", "message"), [
    ("calibrate", ["checkpoint=nowhere"], "calibrate needs checkpoint=FOLDER dataset=[FOLDER,...] out=NEW_FOLDER"),
    ("evaluate", ["agent=mpc"], "agent=mpc needs checkpoint="),
    ("evaluate", ["agent=mpc", "checkpoint=nowhere"], "nowhere is not a forecaster checkpoint"),
    ("evaluate", ["agent=planner"], "agent='planner' is not allowed"),
    ("evaluate", ["planner.risk=var"], "planner.risk='var' is not allowed"),
    ("bench", ["plan"], "bench plan needs checkpoint="),
    ("evaluate", ["agent=mpc", "checkpoint=nowhere", "planner.device=gpu"], "planner.device='gpu' is not allowed"),
    ("fit", ["lr=nan"], "lr=nan is out of range"),
    ("collect", ["agent=idm", "noise=0.5"], "noise= perturbs the executed actions of DAgger labelling"),
    ("train", ["iterations=120"], "would overlap each other or the held-out evaluation seeds"),
    ("bench", ["collect", "workers=[]"], "workers=[] is empty"),
    ("evaluate", ["nokey=1"], "nokey"),
    ("evaluate", ["episodes=abc"], "episodes"),
])
def test_planner_bad_input_gives_a_short_error(tmp_path: Path, command, args, message):
    result = run_cli(command, *args, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_holdout_fails_before_training(tmp_path: Path, tiny_checkpoint: Path):
    result = run_cli("fit", f"dataset=[{tiny_checkpoint.parent / 'data'}]", f"holdout=[{tmp_path / 'nope'}]",
                     "epochs=1000", "hydra.run.dir=run", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "nope" in result.stderr and "fit " not in result.stderr  # no progress bar
    assert not (tmp_path / "run").exists()


def test_the_real_steps_behind_a_dyna_policy_count_each_dataset_once(tiny_checkpoint: Path, tmp_path: Path):
    """The forecaster's training data (its meta.json) and the start-state datasets are one count: the same dataset
    passed again adds nothing, another one adds its steps."""
    from drive_mbrl.cli import _dataset_steps, _model_data_steps
    from drive_mbrl.data import RunSpec, collect
    from drive_mbrl.scenarios import load_scenario

    data = tiny_checkpoint.parent / "data"
    own = json.loads((tiny_checkpoint / "meta.json").read_text())["data"]["sources"]
    assert _model_data_steps(str(tiny_checkpoint), [str(data)]) == sum(s["steps"] for s in own) == _dataset_steps(data)
    collect(RunSpec(load_scenario("highway"), "idm", 1, 77, max_steps=3), tmp_path / "more")
    assert _model_data_steps(str(tiny_checkpoint), [str(data), str(tmp_path / "more")]) == _dataset_steps(data) + 3


def test_train_loop_smoke_then_resume(tmp_path: Path):
    """Smoke test of the MBRL loop on a tiny budget: every stage runs, the curve counts real steps, the budget
    caps collection, and a rerun resumes (reuses every stage) with the same curve."""
    args = ["train", "iterations=2", "seed_episodes=2", "episodes_per_iteration=2", "eval_episodes=1",
            "max_real_steps=70", "fit.epochs=1", "finetune_epochs=1", "fit.width=16", "fit.heads=2",
            "fit.members=2", "fit.blocks=1", "fit.decoder_width=16", "planner.budget=32", "planner.threads=1",
            "hydra.run.dir=run"]
    first = run_cli(*args, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    curve = metrics["learning_curve"]
    assert [row["iteration"] for row in curve] == [0, 1]
    seed_steps = sum(ep.steps for ep in load_dataset(tmp_path / "run" / "data" / "seed")[1])
    assert curve[0]["real_steps"] == seed_steps < curve[1]["real_steps"] <= 70
    assert metrics["real_steps"] == curve[1]["real_steps"]
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 10_000
    again = run_cli(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["learning_curve"] == curve


def test_pipeline_main_job_smoke_on_a_tiny_budget(tmp_path: Path):
    """Smoke test of the README's main job, every stage on a tiny budget: collect, evaluate, fit + validate, plan,
    planner labels, distill, Dyna PPO, ONNX export + an onboard episode, plots and a replay; it ends by printing
    where everything is."""
    args = ["pipeline", "collect_episodes=2", "eval_episodes=2", "plan_episodes=1", "expert_episodes=2",
            "distill.episodes_per_round=1", "distill.eval_episodes=1", "distill.epochs=2", "rl_iterations=1",
            "fit.epochs=1", "fit.width=16", "fit.heads=2", "fit.members=2", "fit.blocks=1", "fit.decoder_width=16",
            "planner.budget=32", "planner.threads=1", "export_samples=20", "export_planner_scenes=2",
            "hydra.run.dir=run"]
    done = run_cli(*args, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["evaluate"]) == {"slower", "idm", "mpc", "policy", "policy_dyna", "onnx"}
    assert set(metrics["export"]["graphs"]) == {"forecaster", "planner", "policy"}
    assert metrics["outputs"]["bundle"] in done.stdout
    for name in ("plot", "replay"):
        assert Path(metrics["outputs"][name]).stat().st_size > 10_000
        assert metrics["outputs"][name] in done.stdout
    assert (run / "policy" / "best.pt").is_file() and (run / "rl" / "policy" / "best.pt").is_file()


def test_scenario_planner_defaults_reach_the_agent_and_the_command_line_wins(tmp_path: Path, tiny_checkpoint: Path):
    result = run_cli("evaluate", "scenario=roundabout", "agent=mpc", f"checkpoint={tiny_checkpoint}", "episodes=1",
                     "max_steps=1", "planner.lookahead=2", "planner.budget=16", "planner.threads=1",
                     "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scenario roundabout sets planner.ego_model=learned (pass" in result.stderr
    manifest = json.loads((tmp_path / "run" / "episodes" / "manifest.json").read_text())
    planner = manifest["agent_options"]["planner"]
    assert (planner["ego_model"], planner["lookahead"], planner["budget"]) == ("learned", 2, 16)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["scenario_planner"] == {"ego_model": "learned"}


def test_kinematic_reward_off_the_highway_is_refused_and_leaves_no_files(tmp_path: Path, tiny_checkpoint: Path):
    result = run_cli("evaluate", "scenario=merge", "agent=mpc", f"checkpoint={tiny_checkpoint}", "episodes=1",
                     "planner.reward=kinematic", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "planner.reward=kinematic scores highway-env's HighwayEnv reward" in result.stderr
    assert "runs merge-v0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_export_takes_the_scenario_of_the_checkpoints_env_id(tiny_checkpoint: Path):
    from drive_mbrl.cli import _with_checkpoint_scenario
    from drive_mbrl.config import ExportConfig

    assert _with_checkpoint_scenario(ExportConfig(checkpoint=str(tiny_checkpoint))).scenario == "highway"
    chosen = ExportConfig(checkpoint=str(tiny_checkpoint), scenario="roundabout")
    assert _with_checkpoint_scenario(chosen).scenario == "roundabout"


def test_collect_dagger_with_a_learner_records_who_drove(tmp_path: Path, tiny_checkpoint: Path, tiny_policy: Path):
    wrong = run_cli("collect", "agent=idm", f"learner={tiny_policy}", "hydra.run.dir=run", cwd=tmp_path)
    assert wrong.returncode == 2 and "learner= drives DAgger rounds: it needs agent=dagger" in wrong.stderr
    wrong = run_cli("collect", "agent=mpc", f"checkpoint={tiny_checkpoint}", "replans=3", "hydra.run.dir=run",
                    cwd=tmp_path)
    assert wrong.returncode == 2 and "replans= averages the planner's labels: it needs agent=dagger" in wrong.stderr
    assert not (tmp_path / "run").exists()
    result = run_cli("collect", "agent=dagger", f"checkpoint={tiny_checkpoint}", f"learner={tiny_policy}", "beta=0",
                     "replans=2", "episodes=1", "max_steps=4", "planner.budget=16", "out=ds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest, (episode,) = load_dataset(tmp_path / "ds")
    assert manifest["agent_options"]["policy"] == str(tiny_policy.resolve())
    assert manifest["agent_options"]["beta"] == 0.0 and manifest["agent_options"]["replans"] == 2
    # beta 0: the learner drove every step, so its greedy actions are the executed ones
    learner = PolicyAgent(str(tiny_policy))
    with torch.no_grad():
        greedy = learner.net(torch.as_tensor(episode_observations(learner.net.config, episode, manifest))).argmax(-1)
    assert episode.action.tolist() == greedy.tolist()
    assert (episode.step_log[EXPERT_ACTION] >= 0).all()  # and the planner labelled each of them
