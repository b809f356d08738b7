"""Episode files and manifests: round trip, atomic writes, resume, corrupt input, same data for any worker count."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from drive_mbrl import SCHEMA_VERSION
from drive_mbrl.data import (
    RunSpec,
    collect,
    episode_digest,
    episode_path,
    load_dataset,
    load_episode,
    read_manifest,
    save_episode,
)
from drive_mbrl.errors import DataError
from drive_mbrl.scenarios import load_scenario
from tests.conftest import make_episode, straight_state


def small_spec(episodes: int, agent: str = "slower", seed: int = 0) -> RunSpec:
    return RunSpec(load_scenario("highway"), agent, episodes, seed, record_hz=0, max_steps=3)


def test_episode_round_trip_is_exact(tmp_path: Path):
    episode = make_episode(straight_state([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]], speeds=[1.0, 1.0]), index=4)
    path = save_episode(tmp_path, episode)
    assert path == episode_path(tmp_path, 4) and not list(path.parent.glob(".*.tmp"))
    loaded = load_episode(path)
    assert episode_digest(loaded) == episode_digest(episode)
    assert np.load(path)["state"].shape == (3, 2, 7), "files are plain numpy archives"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "written with the usual permissions, not mkstemp's 0600"


def test_truncated_episode_file_names_the_file(tmp_path: Path):
    episode = make_episode(straight_state([[0.0]] * 3, speeds=[1.0]))
    path = save_episode(tmp_path, episode)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{path.name}.*truncated or corrupt"):
        load_episode(path)


def test_episode_of_another_schema_version_is_rejected(tmp_path: Path):
    arrays = make_episode(straight_state([[0.0]] * 3, speeds=[1.0])).to_arrays()
    path = tmp_path / "ep_000000.npz"
    np.savez_compressed(path, **arrays, schema_version=np.asarray(SCHEMA_VERSION + 1))
    with pytest.raises(DataError, match="schema version"):
        load_episode(path)


def test_an_interrupt_between_the_swaps_renames_keeps_the_previous_folder(tmp_path: Path, monkeypatch):
    """atomic_folder moves the old folder aside, then the new one in: an interrupt between the two puts the old
    one back instead of leaving no folder at all."""
    from drive_mbrl.data import atomic_folder

    out = tmp_path / "bundle"
    atomic_folder(out, lambda tmp: (tmp / "v").write_text("1"))
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name.startswith(".bundle.") and self.name != ".bundle.old" and Path(target) == out:  # the new one
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_folder(out, lambda tmp: (tmp / "v").write_text("2"))
    assert (out / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_collect_writes_manifest_and_resumes_without_duplicates(tmp_path: Path):
    out = tmp_path / "ds"
    first = collect(small_spec(2), out)
    assert first["episodes_new"] == 2
    before = {p.name: p.read_bytes() for p in (out / "episodes").glob("*.npz")}
    (out / "episodes" / ".ep_000002.npz.leftover.tmp").write_bytes(b"half")  # a write killed mid-way
    second = collect(small_spec(4), out)
    assert (second["episodes_new"], second["episodes_resumed"], second["episodes_total"]) == (2, 2, 4)
    assert {p.name: p.read_bytes() for p in (out / "episodes").glob("*.npz") if p.name in before} == before
    assert not list((out / "episodes").glob(".*.tmp"))
    manifest, episodes = load_dataset(out)
    assert [ep.index for ep in episodes] == [0, 1, 2, 3]
    assert [ep.seed for ep in episodes] == [0, 1, 2, 3]
    assert manifest["dt"] == pytest.approx(0.2) and manifest["policy_dt"] == pytest.approx(1.0)
    assert manifest["scenario"]["env_id"] == "highway-fast-v0"
    assert manifest["state_fields"][:2] == ["x", "y"] and manifest["state_units"][2] == "m/s"
    assert manifest["action_names"][4] == "SLOWER"


def test_collect_into_a_folder_of_another_config_is_refused(tmp_path: Path):
    collect(small_spec(1), tmp_path / "ds")
    with pytest.raises(DataError, match="different agent"):
        collect(small_spec(1, agent="random"), tmp_path / "ds")


def test_manifest_of_another_schema_version_is_rejected(tmp_path: Path):
    collect(small_spec(1), tmp_path / "ds")
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(DataError, match="manifest.json has schema version 99"):
        read_manifest(tmp_path / "ds")


def test_record_hz_sets_the_frame_rate(tmp_path: Path):
    spec = RunSpec(load_scenario("highway"), "slower", 1, 0, record_hz=1, max_steps=3)
    collect(spec, tmp_path / "ds")
    manifest, [episode] = load_dataset(tmp_path / "ds")
    assert manifest["dt"] == 1.0 and episode.state.shape[0] == 4
    assert episode.decision_frame.tolist() == [0, 1, 2]


def test_two_ray_workers_give_the_same_data_as_one(tmp_path: Path):
    spec = RunSpec(load_scenario("highway"), "random", 3, 5, max_steps=3)
    collect(spec, tmp_path / "one", workers=1)
    collect(spec, tmp_path / "two", workers=2)
    one = [episode_digest(ep) for ep in load_dataset(tmp_path / "one")[1]]
    two = [episode_digest(ep) for ep in load_dataset(tmp_path / "two")[1]]
    assert one == two and len(set(one)) == 3


def test_step_log_round_trips_as_log_keys(tmp_path: Path):
    episode = make_episode(straight_state([[0.0]] * 3, speeds=[1.0]))
    plan = np.arange(10, dtype=np.int64).reshape(2, 5)
    futures = np.random.default_rng(0).normal(size=(2, 3, 2, 4, 2)).astype(np.float16)
    episode.step_log = {"plan": plan, "futures": futures}
    path = save_episode(tmp_path, episode)
    with np.load(path) as raw:
        assert {"log__plan", "log__futures"} <= set(raw.files)
    loaded = load_episode(path)
    assert set(loaded.step_log) == {"plan", "futures"}
    np.testing.assert_array_equal(loaded.step_log["plan"], plan)
    assert loaded.step_log["futures"].dtype == np.float16
    np.testing.assert_array_equal(loaded.step_log["futures"], futures)
    assert episode_digest(loaded) == episode_digest(episode)


def test_files_without_step_log_or_fallback_still_load(tmp_path: Path):
    arrays = make_episode(straight_state([[0.0]] * 3, speeds=[1.0])).to_arrays()
    del arrays["fallback"]  # as written before either field existed
    path = tmp_path / "ep_000000.npz"
    np.savez_compressed(path, **arrays, schema_version=np.asarray(SCHEMA_VERSION))
    loaded = load_episode(path)
    assert loaded.step_log == {} and loaded.fallback.tolist() == ["", ""]


def test_step_log_with_a_wrong_step_count_is_rejected(tmp_path: Path):
    episode = make_episode(straight_state([[0.0]] * 3, speeds=[1.0]))
    episode.step_log = {"risk": np.zeros(5, np.float32)}  # 2 steps, 5 rows
    with pytest.raises(DataError, match="step log entries risk"):
        load_episode(save_episode(tmp_path, episode))


def test_episode_actors_share_the_gpus_only_when_a_planner_may_use_cuda():
    """Ray hides GPUs from actors that ask for none: planner agents not pinned to the CPU get an equal share."""
    from drive_mbrl.data import gpu_share
    from drive_mbrl.rollout import EpisodeJob

    scenario = load_scenario("highway")

    def job(options: str) -> EpisodeJob:
        return EpisodeJob(scenario, "mpc", 0, 0, agent_options=options)

    auto, cpu = job('{"planner": {"device": "auto"}}'), job('{"planner": {"device": "cpu"}}')
    assert gpu_share([auto], gpus=1.0, actors=16) == 1 / 16
    assert gpu_share([auto], gpus=2.0, actors=1) == 1.0  # at most one GPU per actor
    assert gpu_share([cpu], gpus=1.0, actors=4) == 0.0
    assert gpu_share([job("")], gpus=1.0, actors=4) == 0.0  # rule agents
    assert gpu_share([auto], gpus=0.0, actors=4) == 0.0  # no GPU in the cluster
