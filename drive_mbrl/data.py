"""Collection and crash-safe storage of episodes: one compressed .npz per episode plus a JSON manifest.

Layout of a dataset folder:

    manifest.json          schema version, scenario (file content and the env's resolved config), agent, seeds,
                           rates, frame, feature names and units, action names, package version
    episodes/ep_000042.npz one `Episode` (see types.py), numpy-readable: np.load(path)

Every write goes to a temp file in the same folder, is fsync'ed, then renamed, so a crash or kill leaves either the
whole file or none. An interrupted collection keeps every finished episode; running it again skips them (episode
i always has seed `seed + i`, so the result does not depend on the worker count or on interruptions).

Episodes run serially in-process for `workers=1`, on Ray actors otherwise. This module knows nothing of models.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl import SCHEMA_VERSION, __version__
from drive_mbrl.errors import DataError
from drive_mbrl.rollout import EpisodeJob, EpisodeRunner, recording_stride
from drive_mbrl.scenarios import Scenario, action_names, env_timing, is_continuous, make_env, reset_env
from drive_mbrl.types import EPISODE_FIELDS, NONDETERMINISTIC_FIELDS, STATE_FIELDS, STATE_UNITS, Episode

MANIFEST = "manifest.json"
EPISODES = "episodes"
# Manifest fields that must match for a rerun to resume into an existing folder.
_IDENTITY = ("schema_version", "scenario", "agent", "agent_options", "seed", "record_hz", "max_steps")
_IDENTITY_DEFAULTS = {"agent_options": {}}  # manifests written before the field existed


def episode_seed(seed: int, index: int) -> int:
    """Seed of episode `index` of a run with base `seed`."""
    return seed + index


def episode_digest(episode: Episode) -> str:
    """SHA-256 over every deterministic field of `episode` (timings excluded): equal digests, equal data."""
    digest = hashlib.sha256()
    for name, array in sorted(episode.to_arrays().items()):
        if name not in NONDETERMINISTIC_FIELDS:
            digest.update(name.encode())
            digest.update(str(array.dtype).encode() + str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def episode_path(root: Path, index: int) -> Path:
    return root / EPISODES / f"ep_{index:06d}.npz"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp's default is 0600)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write `path` through `write(file)` into a temp file in the same folder, fsync it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(out: Path, build: Callable[[Path], Any]) -> Any:
    """Run `build(tmp)` on a fresh temp folder beside `out`, then swap it into place: an older `out` is replaced only
    once `build` has returned, and nothing is left behind when it raises. Returns what `build` returned."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's default is 0700
        result = build(tmp)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return result
    except BaseException:
        old = out.with_name(f".{out.name}.old")
        if old.exists() and not out.exists():  # interrupted between the two renames: the previous version back
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically write `payload` as indented JSON."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=True, default=_json_default), "w")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_episode(root: Path, episode: Episode) -> Path:
    """Atomically write one episode file; returns its path."""
    path = episode_path(root, episode.index)
    arrays = episode.to_arrays()
    arrays["schema_version"] = np.asarray(SCHEMA_VERSION)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def load_episode(path: Path) -> Episode:
    """Load one episode file; raises DataError naming the file if it is truncated, corrupt or of another schema."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError as exc:
        raise DataError(f"episode file {path} does not exist") from exc
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        raise DataError(f"episode file {path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it "
                        "and run the same collect command again to re-create it") from exc
    version = int(arrays.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise DataError(f"episode file {path} has schema version {version}, this drive_mbrl reads "
                        f"{SCHEMA_VERSION}: re-collect it or use a matching drive_mbrl version")
    missing = [name for name in EPISODE_FIELDS if name not in arrays]
    if missing:
        raise DataError(f"episode file {path} lacks field(s) {', '.join(missing)}: it was not written by "
                        "drive_mbrl's collect; re-collect it")
    episode = Episode.from_arrays(arrays)
    frames, steps = episode.state.shape[0], episode.action.shape[0]
    if episode.present.shape != episode.state.shape[:2] or episode.frame_time.shape != (frames,) \
            or any(getattr(episode, f).shape[:1] != (steps,) for f in ("reward", "crashed", "decision_frame")):
        raise DataError(f"episode file {path} has inconsistent array shapes (state {episode.state.shape}, "
                        f"present {episode.present.shape}, action {episode.action.shape}): re-collect it")
    bad_log = [name for name, value in episode.step_log.items() if value.shape[:1] != (steps,)]
    if bad_log:
        raise DataError(f"episode file {path} has step log entries {', '.join(bad_log)} whose first axis is not the "
                        f"{steps} policy steps: re-collect it")
    return episode


def build_manifest(scenario: Scenario, agent: str, seed: int, record_hz: int, max_steps: int,
                   agent_options: str = "") -> dict[str, Any]:
    """The manifest of a new dataset (builds the env once to read its rates, action names and full config)."""
    env = make_env(scenario)
    try:
        reset_env(env, seed)
        sim_hz, policy_hz = env_timing(env)
        stride = recording_stride(sim_hz, policy_hz, record_hz)
        resolved = json.loads(json.dumps(env.unwrapped.config, default=str))
        names = action_names(env)
        continuous = is_continuous(env)
    finally:
        env.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario": scenario.to_dict(),
        "env_config_resolved": resolved,
        "agent": agent,
        "agent_options": json.loads(agent_options) if agent_options else {},
        "action_inferred": agent == "idm",
        "action_names": names,
        "action_space": "continuous" if continuous else "discrete",
        "seed": seed,
        "seed_rule": "episode i is reset with seed + i",
        "record_hz": record_hz,
        "max_steps": max_steps,
        "dt": stride / sim_hz,
        "policy_dt": 1.0 / policy_hz,
        "simulation_hz": sim_hz,
        "frame": "highway-env world frame: x, y [m] in the road network's coordinates (y grows to the driver's "
                 "right on straight highways), heading [rad] from +x towards +y",
        "state_fields": list(STATE_FIELDS),
        "state_units": list(STATE_UNITS),
        "episode_fields": list(EPISODE_FIELDS),
    }


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and check a dataset's manifest; raises DataError naming the file and the problem."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a drive_mbrl dataset: {path} is missing (collect one with "
                        "`drive-mbrl collect out=...`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest {path} is not valid JSON ({exc}): restore it or re-collect the dataset") from exc
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise DataError(f"manifest {path} has schema version {version!r}, this drive_mbrl reads {SCHEMA_VERSION}: "
                        "re-collect the dataset or use a matching drive_mbrl version")
    return manifest


def open_dataset(root: Path, manifest: dict[str, Any]) -> list[int]:
    """Create `root` with `manifest`, or check that an existing one matches; returns the finished episode indices.

    Leftover temp files of an interrupted write are removed.
    """
    root = Path(root)
    if (root / MANIFEST).exists():
        old = read_manifest(root)
        for key in _IDENTITY:
            if old.get(key, _IDENTITY_DEFAULTS.get(key)) != manifest.get(key):
                raise DataError(f"{root} already holds a dataset with a different {key} ({old.get(key)!r} there, "
                                f"{manifest.get(key)!r} now): choose another out= folder, or delete it to start over")
    else:
        write_json(root / MANIFEST, manifest)
    episodes = root / EPISODES
    episodes.mkdir(parents=True, exist_ok=True)
    for stale in episodes.glob(".*.tmp"):
        stale.unlink()
    return finished_indices(root)


def finished_indices(root: Path) -> list[int]:
    """Indices of the episode files present in dataset folder `root` (empty if it does not exist)."""
    return sorted(int(p.stem.split("_")[1]) for p in (Path(root) / EPISODES).glob("ep_*.npz"))


def load_dataset(root: Path | str) -> tuple[dict[str, Any], list[Episode]]:
    """Load a dataset's manifest and all its episodes, sorted by index."""
    root = Path(root)
    manifest = read_manifest(root)
    paths = sorted((root / EPISODES).glob("ep_*.npz"))
    return manifest, [load_episode(p) for p in paths]


@dataclass(frozen=True)
class RunSpec:
    """What to run: `episodes` episodes of `agent` on `scenario`, episode i seeded with `seed + i`."""

    scenario: Scenario
    agent: str
    episodes: int
    seed: int
    record_hz: int = 0
    max_steps: int = 0
    agent_options: str = ""
    """JSON of the agent's options (`agent_options_json`); part of the dataset's identity."""

    def jobs(self, skip: Iterable[int] = ()) -> list[EpisodeJob]:
        done = set(skip)
        return [EpisodeJob(self.scenario, self.agent, i, episode_seed(self.seed, i), self.record_hz, self.max_steps,
                           self.agent_options)
                for i in range(self.episodes) if i not in done]


def agent_options_json(options: dict[str, Any]) -> str:
    """Canonical JSON of an agent's options (sorted keys), so equal options give equal dataset identities."""
    return json.dumps(options, sort_keys=True, default=str) if options else ""


def gpu_share(jobs: list[EpisodeJob], gpus: float, actors: int) -> float:
    """GPUs each episode actor asks Ray for: an equal share of the cluster's `gpus` when an agent's planner may use
    CUDA (`planner.device` other than cpu), else 0. Ray hides the GPUs from actors that ask for none
    (CUDA_VISIBLE_DEVICES=''), so a CUDA planner in an actor without a share would silently run on the CPU."""
    def wants(options: str) -> bool:
        planner = (json.loads(options) if options else {}).get("planner") or {}
        return bool(planner) and str(planner.get("device", "auto")) != "cpu"

    if gpus <= 0 or actors <= 0 or not any(wants(job.agent_options) for job in jobs):
        return 0.0
    return min(1.0, gpus / actors)


def run_episodes(jobs: list[EpisodeJob], workers: int = 1, ray_address: str = "") -> Iterator[Episode]:
    """Run `jobs` and yield episodes as they finish (in order for one worker, unordered on Ray)."""
    if not jobs:
        return
    if workers == 1 and not ray_address:
        runner = EpisodeRunner()
        try:
            for job in jobs:
                yield runner.run(job)
        finally:
            runner.close()
        return
    from drive_mbrl.raycluster import start_ray

    ray, started = start_ray(ray_address, workers)
    try:
        count = min(workers, len(jobs))
        share = gpu_share(jobs, float(ray.cluster_resources().get("GPU", 0.0)), count)
        actor_cls = ray.remote(num_cpus=1, num_gpus=share)(EpisodeRunner)
        actors = [actor_cls.remote() for _ in range(count)]
        pending: dict[Any, Any] = {}
        queue = list(reversed(jobs))
        for actor in actors:  # two jobs in flight per actor hides the round trip
            for _ in range(2):
                if queue:
                    pending[actor.run.remote(queue.pop())] = actor
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            if queue:
                pending[actor.run.remote(queue.pop())] = actor
            yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def collect(spec: RunSpec, out: Path, workers: int = 1, ray_address: str = "",
            on_episode: Callable[[Episode], None] | None = None) -> dict[str, Any]:
    """Collect `spec` into the dataset folder `out`, resuming if it already holds some of the episodes.

    Returns figures for metrics.json: episodes on disk, newly collected, steps and wall time of this call.
    """
    out = Path(out)
    manifest = build_manifest(spec.scenario, spec.agent, spec.seed, spec.record_hz, spec.max_steps,
                              spec.agent_options)
    done = open_dataset(out, manifest)
    jobs = spec.jobs(skip=done)
    started = time.perf_counter()
    steps = 0
    for episode in run_episodes(jobs, workers, ray_address):
        save_episode(out, episode)
        steps += episode.steps
        if on_episode:
            on_episode(episode)
    seconds = time.perf_counter() - started
    return {"dataset": str(out), "episodes_total": len(done) + len(jobs), "episodes_new": len(jobs),
            "episodes_resumed": len(set(done) & set(range(spec.episodes))), "steps_new": steps,
            "seconds": seconds, "steps_per_s": steps / seconds if seconds > 0 and steps else 0.0}
