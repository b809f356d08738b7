"""Run an exported bundle (export.py) with onnxruntime alone: what an onboard computer runs instead of torch.

A bundle is a folder: `contract.json` (the inputs and outputs of every graph with names, shapes, dtypes and units,
the feature order, the action meanings and where the weights came from) beside one `.onnx` file per graph and
`parity.json` (the export's own check against torch). `load_bundle` checks the contract against every graph when it
loads it, and `Graph.run` checks every input against the contract before it runs, so a mismatch is a clear
`BundleError`, never an onnxruntime traceback deep inside a kernel.

Provider choice: CUDA only where onnxruntime lists its CUDA provider, an NVIDIA GPU is present and the CUDA
libraries load (asking for CUDA without them prints loud errors), else quietly the CPU. One intra-op thread with
spinning off by default: spinning threads slow torch code in the same process many times over (onnxruntime
#13808).

This module imports numpy and onnxruntime only; importing it must never import torch (a test holds that).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl.errors import DriveMbrlError

BUNDLE_SCHEMA_VERSION = 1
"""Version of the bundle layout and contract.json; bumped on any incompatible change."""
CONTRACT, PARITY = "contract.json", "parity.json"
DEVICES = ("auto", "cpu", "cuda")

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bool)": "bool"}


class BundleError(DriveMbrlError):
    """A bundle is missing, damaged, of another schema version, or was given inputs its contract does not allow."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How onnxruntime runs a bundle."""

    device: str = "auto"
    """auto (CUDA when onnxruntime, the GPU and the CUDA libraries are all there, else CPU), cpu, cuda."""
    threads: int = 1
    """Intra-op threads (1: batch-1 inference gains nothing from more, and leaves the cores to the simulator)."""
    spinning: bool = False
    """Let idle onnxruntime threads spin (faster hand-offs, but they burn the CPU that torch or the env need)."""


def tensor_spec(name: str, shape: list[int | str], dtype: str, units: str, meaning: str) -> dict[str, Any]:
    """One input or output of a graph in the contract: `shape` holds ints for fixed axes and letters for dynamic
    ones (the same letter is the same size across a graph's inputs); dtype is a numpy name."""
    return {"name": name, "shape": list(shape), "dtype": dtype, "units": units, "meaning": meaning}


def _ort() -> Any:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: no warnings on stderr for the onboard loop
    return onnxruntime


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (its device node or the driver's GPU list)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return Path("/dev/nvidia0").exists() or (gpus.is_dir() and any(gpus.iterdir()))


def cuda_libraries() -> tuple[str, ...]:
    """The CUDA runtime, cuBLAS and cuDNN libraries that the installed onnxruntime-gpu's CUDA provider loads: of
    the CUDA major version it was built for (its build info; 13 for onnxruntime-gpu 1.31, 12 before), cuDNN 9."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:  # a CPU build
        return ()
    major = str(cuda_version).split(".")[0]
    return (f"libcudart.so.{major}", f"libcublas.so.{major}", "libcudnn.so.9")


def cuda_libraries_load() -> bool:
    """The CUDA runtime, cuBLAS and cuDNN that onnxruntime's CUDA provider needs can be loaded."""
    names = cuda_libraries()
    if not names:
        return False
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            return False
    return True


def choose_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for `device` (see RuntimeSettings.device), CPU always last."""
    if device not in DEVICES:
        raise BundleError(f"device={device!r} is not known: choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    usable = ("CUDAExecutionProvider" in _ort().get_available_providers() and gpu_present()
              and cuda_libraries_load())
    if device == "cuda" and not usable:
        raise BundleError("device=cuda, but CUDA is not usable here (it needs onnxruntime-gpu, an NVIDIA GPU and "
                          f"the libraries {', '.join(cuda_libraries()) or 'of CUDA'}): use device=auto or cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if usable else ["CPUExecutionProvider"]


def make_session(path: Path, settings: RuntimeSettings = RuntimeSettings()) -> Any:
    """An onnxruntime InferenceSession of the graph file `path` with `settings`."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.spinning else "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=choose_providers(settings.device))
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise BundleError(f"onnxruntime cannot load {path} ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                          "the file is damaged or not an ONNX graph; export the bundle again") from exc
    if settings.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BundleError(f"device=cuda, but onnxruntime could not start its CUDA provider for {path} (it fell back "
                          "to the CPU): check the CUDA and cuDNN versions it needs, or use device=auto or cpu")
    return session


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Graph:
    """One graph of a bundle: its session and contract entry; `run` checks inputs and returns named outputs."""

    def __init__(self, name: str, spec: dict[str, Any], session: Any):
        self.name, self.spec, self.session = name, spec, session
        self.inputs = {t["name"]: t for t in spec["inputs"]}
        self.output_names = [t["name"] for t in spec["outputs"]]

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds as arrays of the contract's dtypes; raises BundleError naming the input on any mismatch."""
        missing, extra = set(self.inputs) - set(feeds), set(feeds) - set(self.inputs)
        if missing or extra:
            raise BundleError(f"graph {self.name} takes inputs {sorted(self.inputs)}, got {sorted(feeds)}")
        out, sizes = {}, {}
        for name, value in feeds.items():
            spec, array = self.inputs[name], np.asarray(value)
            if array.dtype != np.dtype(spec["dtype"]):
                if not np.can_cast(array.dtype, spec["dtype"], casting="same_kind"):
                    raise BundleError(f"{self.name} input {name} has dtype {array.dtype}, the contract says "
                                      f"{spec['dtype']}")
                array = array.astype(spec["dtype"])
            if array.dtype.kind == "f" and not np.isfinite(array).all():  # onnxruntime's ArgMax reads NaN as a max
                raise BundleError(f"{self.name} input {name} holds NaN or inf at {np.argwhere(~np.isfinite(array))[0]}"
                                  ": the graphs take finite inputs only")
            if array.ndim != len(spec["shape"]):
                raise BundleError(f"{self.name} input {name} has shape {array.shape}, the contract says "
                                  f"{_shape_text(spec['shape'])}")
            for size, want in zip(array.shape, spec["shape"], strict=True):
                if isinstance(want, str):
                    if sizes.setdefault(want, size) != size:
                        raise BundleError(f"{self.name} input {name} has shape {array.shape}: axis {want} is "
                                          f"{sizes[want]} in another input")
                elif size != want:
                    raise BundleError(f"{self.name} input {name} has shape {array.shape}, the contract says "
                                      f"{_shape_text(spec['shape'])}")
            out[name] = np.ascontiguousarray(array)
        return out

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on named inputs (see the contract); returns outputs by name."""
        values = self.session.run(self.output_names, self.check_inputs(feeds))
        return dict(zip(self.output_names, values, strict=True))


def _shape_text(shape: list[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass
class Bundle:
    """A loaded bundle: its folder, contract and graphs by name."""

    folder: Path
    contract: dict[str, Any]
    graphs: dict[str, Graph]
    providers: list[str]

    def graph(self, name: str) -> Graph:
        if name not in self.graphs:
            raise BundleError(f"bundle {self.folder} holds no {name} graph (it has {', '.join(self.graphs)}); "
                              f"export one with `drive-mbrl export`")
        return self.graphs[name]


def read_contract(folder: Path) -> dict[str, Any]:
    """contract.json of a bundle folder, checked for its schema version."""
    path = Path(folder) / CONTRACT
    if not Path(folder).is_dir():
        raise BundleError(f"bundle folder {folder} does not exist: export one with `drive-mbrl export`")
    if not path.is_file():
        raise BundleError(f"{folder} is not a bundle: {CONTRACT} is missing (export it with `drive-mbrl export`)")
    try:
        contract = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): export the bundle again") from exc
    version = contract.get("schema_version") if isinstance(contract, dict) else None
    if version != BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"bundle {folder} has schema version {version!r}, this drive_mbrl reads "
                          f"{BUNDLE_SCHEMA_VERSION}: export it again with this version")
    return contract


def check_graph_against_contract(name: str, spec: dict[str, Any], session: Any) -> None:
    """Names, ranks, fixed sizes and dtypes of the graph's inputs and outputs must be the contract's."""
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = spec[kind]
        if [t["name"] for t in want] != [a.name for a in actual]:
            raise BundleError(f"graph {name}'s {kind} are {[a.name for a in actual]}, its contract says "
                              f"{[t['name'] for t in want]}: the contract does not belong to this graph")
        for t, a in zip(want, actual, strict=True):
            dtype = _ORT_DTYPES.get(a.type, a.type)
            if dtype != t["dtype"]:
                raise BundleError(f"graph {name} {kind[:-1]} {a.name} is {dtype}, its contract says {t['dtype']}")
            fixed_mismatch = any(isinstance(w, int) and isinstance(g, int) and w != g
                                 for w, g in zip(t["shape"], a.shape, strict=False))
            if len(a.shape) != len(t["shape"]) or fixed_mismatch:
                raise BundleError(f"graph {name} {kind[:-1]} {a.name} has shape {_shape_text(a.shape)}, its "
                                  f"contract says {_shape_text(t['shape'])}")


def load_bundle(folder: Path | str, settings: RuntimeSettings = RuntimeSettings(),
                only: tuple[str, ...] | None = None) -> Bundle:
    """Load a bundle folder's graphs (all, or those named in `only`) with every check described above."""
    folder = Path(folder)
    contract = read_contract(folder)
    graphs = {}
    for name, spec in contract["graphs"].items():
        if only is not None and name not in only:
            continue
        path = folder / spec["file"]
        if not path.is_file():
            raise BundleError(f"bundle {folder} lacks {spec['file']} (graph {name}): export the bundle again")
        if sha256_file(path) != spec["sha256"]:
            raise BundleError(f"{path} does not match the sha256 in {CONTRACT}: the file was changed or damaged; "
                              "export the bundle again")
        session = make_session(path, settings)
        check_graph_against_contract(name, spec, session)
        graphs[name] = Graph(name, spec, session)
    # What the sessions run on (onnxruntime falls back to the CPU by itself when its CUDA provider fails to start).
    providers = next(iter(graphs.values())).session.get_providers() if graphs else choose_providers(settings.device)
    return Bundle(folder, contract, graphs, list(providers))


# ---------------------------------------------------------------------------------------------------------------
# The onboard agent: drives highway-env from a bundle


class OnnxAgent:
    """`agent=onnx bundle=<folder>`: drives with a bundle's graph through onnxruntime alone, perceiving the scene
    from the episode's own track recording with the numpy feature code (features.py), as the torch agents do.

    graph `policy` (default when the bundle has one): the reactive policy's greedy action on
    `features.policy_observation`, as `policy.PolicyAgent`. graph `planner`: the whole planning step, as
    `mpc.MPCAgent`: the ego's set-points from the simulator, the step's noise drawn with numpy (seeded per episode),
    the graph's action executed, its plan shifted by one step warm-starting the next decision.
    """

    drives_itself = False

    def __init__(self, bundle: str = "", graph: str = "auto", device: str = "auto", threads: int = 1, seed: int = 0):
        from drive_mbrl.errors import ConfigError

        if not bundle:
            raise ConfigError("agent=onnx needs bundle=<folder> (write one with `drive-mbrl export`)")
        names = read_contract(Path(bundle))["graphs"]
        if graph == "auto":
            graph = "policy" if "policy" in names else "planner"
        if graph not in ("policy", "planner"):
            raise ConfigError(f"agent=onnx graph={graph!r} is not known: choose auto, policy or planner")
        self.bundle = load_bundle(bundle, RuntimeSettings(device, threads), only=(graph,))
        self.graph = self.bundle.graph(graph)
        self.spec = self.graph.spec
        self.seed = seed
        self.last_fallback = ""
        self.last_inputs: dict[str, np.ndarray] = {}
        """The graph's inputs at the last decision (for inspection and tests)."""
        self._recorder: Any = None
        self._ahead = tuple(self.spec.get("route_ahead", ())) if self.graph.name == "policy" else ()
        """[m] the route distances a route-observing policy graph takes (`features.route_ahead`); () for others."""
        self._route: np.ndarray | None = None

    def reset(self, env: Any, seed: int) -> None:
        from drive_mbrl.errors import ConfigError
        from drive_mbrl.scenarios import action_names, env_timing

        names = action_names(env)
        if names != self.bundle.contract["actions"]:
            raise ConfigError(f"bundle {self.bundle.folder} was exported for actions {self.bundle.contract['actions']}"
                              f", this scenario has {names}: export a bundle of a model trained on this scenario")
        sim_hz, policy_hz = env_timing(env)
        if self.graph.name == "planner" and (sim_hz // policy_hz, 1.0 / sim_hz) != (
                self.spec["frames_per_step"], self.spec["sim_dt"]):
            raise ConfigError(f"bundle {self.bundle.folder} plans at {self.spec['frames_per_step']} frames of "
                              f"{self.spec['sim_dt']} s per step, this scenario runs {sim_hz} Hz / {policy_hz} Hz")
        self._rng = np.random.default_rng(self.seed * 1_000_003 + seed)
        if self._ahead:
            from drive_mbrl.features import route_polyline

            self._route = route_polyline(env)
        if self.graph.name == "planner":  # no previous plan: `plan_scene`'s default warm start, the plan of 0s
            self._warm = self._no_warm = np.zeros(self.bundle.contract["scene"]["horizon"], np.int64)
        self.last_fallback = ""

    def attach_tracks(self, recorder: Any) -> None:
        """Called by the episode loop after each reset with its track recorder (the agent's perception)."""
        from drive_mbrl.features import SceneSpec, history_stride

        shape = self.spec if self.graph.name == "policy" else self.bundle.contract["scene"]
        self._spec = SceneSpec(agents=shape["agents"], history_len=shape["history_len"],
                               history_stride=history_stride(shape["history_dt"], recorder.frame_dt),
                               horizon=self.bundle.contract["scene"]["horizon"],
                               pad_dt=shape["history_dt"] if shape.get("pad_history") else 0.0)
        self._recorder = recorder

    def act(self, obs: Any, env: Any) -> int:
        from drive_mbrl.features import live_history, live_policy_observation, live_target_speed

        if self._recorder is None:
            raise RuntimeError("OnnxAgent.act before attach_tracks: run it through rollout.EpisodeRunner")
        if self.graph.name == "policy":
            target = live_target_speed(env, bool(self.spec.get("set_points")))
            obs = live_policy_observation(self._recorder, self._spec, target, self._route, self._ahead)
            self.last_inputs = {"obs": obs[None]}
            return int(self.graph.run(**self.last_inputs)["action"][0])
        history, track, _, _ = live_history(self._recorder, self._spec)
        return self._plan(history, track >= 0, env)

    def _plan(self, history: np.ndarray, mask: np.ndarray, env: Any) -> int:
        """One planning step through the planner graph (see the class docstring)."""
        from drive_mbrl.mpc import ego_values

        feeds: dict[str, np.ndarray] = {"history": history, "agent_mask": mask}
        for t in self.spec["inputs"]:
            if t["name"] in ("candidates", "modes"):
                feeds[t["name"]] = self._rng.random(t["shape"], dtype=np.float32)
            elif t["name"] == "gauss":
                feeds[t["name"]] = self._rng.standard_normal(t["shape"], dtype=np.float32)
        if "warm_start" in self.graph.inputs:
            feeds["warm_start"] = self._warm
        if "ego" in self.graph.inputs:
            values = ego_values(env)
            feeds["ego"] = np.array([values[f] for f in self.spec["ego_fields"]], np.float64)
            feeds["target_speeds"] = np.array(values["target_speeds"], np.float64)
        self.last_inputs = feeds
        out = self.graph.run(**feeds)
        reason = self.spec["fallback_reasons"][int(out["reason"])]
        self.last_fallback = reason
        plan = None
        if reason == "":
            plan = out["plan"]
        elif reason == "no_plan_within_collision_limit" and self.spec["settings"]["fallback"] == "least_risk":
            plan = out["least_risk"]
        # As `MPCAgent`: the executed plan shifted, or after a fallback to braking no warm start.
        self._warm = self._no_warm if plan is None else np.concatenate([plan[1:], [self.spec["idle_action"]]]).astype(
            np.int64)
        return int(out["action"])
