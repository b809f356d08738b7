"""Replay of a recorded episode in road coordinates: GIF (matplotlib's PillowWriter), MP4 when ffmpeg exists, and
PNG key frames. With plots.py, the only matplotlib importer (imported lazily, Agg backend, no display).

What a frame shows, in highway-env's world frame (x right, y down as highway-env draws it): the scenario's lanes
(rebuilt with `scenarios.road_geometry` from the episode's scenario and seed), every tracked vehicle as an oriented
box with its track id, the ego's executed path, and, when the episode has a planning step log (`mpc.decision_log`,
read at the latest decision at or before the frame): the ego's planned trajectory, and each scene agent's predicted
future per mode (line opacity by mode probability) with 1-sigma uncertainty ellipses (predicted std and member
disagreement combined). A panel below plots the ego's speed and the chosen plan's collision probability with
fallback steps shaded. An episode without a planning log replays with vehicles only, and the title says so.

This module reads episodes and draws them; it knows nothing of models or planners (the step log is plain arrays).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from drive_mbrl.data import (
    EPISODES,
    MANIFEST,
    atomic_write,
    episode_path,
    finished_indices,
    load_episode,
    read_manifest,
)
from drive_mbrl.errors import DataError
from drive_mbrl.scenarios import LaneGeometry, road_geometry, scenario_from_dict
from drive_mbrl.types import EGO_TRACK, Episode

X, Y, VX, VY, HEADING, LENGTH, WIDTH = range(7)
PLAN_KEYS = ("future_mean", "future_std", "future_prob", "track", "ego_pose")
"""Step-log entries a replay needs to draw plans and predictions."""
EGO_COLOUR, PLAN_COLOUR = "tab:blue", "tab:green"
AGENT_COLOURS = ("tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


@dataclass
class Replay:
    """An episode with what is needed to draw it."""

    manifest: dict[str, Any]
    episode: Episode
    road: list[LaneGeometry]
    source: Path
    """The dataset folder."""

    @property
    def planned(self) -> bool:
        """The episode has a planning step log (plans and predicted futures)."""
        return all(k in self.episode.step_log for k in PLAN_KEYS)


def find_dataset(run: Path) -> Path:
    """The dataset folder of `run`: the folder itself when it holds a manifest, else its `episodes/` (evaluate) or
    `dataset/` (collect). Raises DataError naming what was looked for."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist: pass run=<an evaluate or collect run folder, or a "
                        "dataset folder>")
    for candidate in (run, run / "episodes", run / "dataset"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise DataError(f"{run} holds no dataset: looked for {MANIFEST} in it, in {run / 'episodes'} and in "
                    f"{run / 'dataset'}")


def load_replay(run: Path, index: int) -> Replay:
    """Episode `index` of the run or dataset folder `run`, with its road geometry."""
    root = find_dataset(run)
    manifest = read_manifest(root)
    if not episode_path(root, index).is_file():
        have = finished_indices(root)
        span = f"{have[0]}..{have[-1]} ({len(have)} files)" if have else "none"
        raise DataError(f"episode {index} is not in {root / EPISODES}: episodes there: {span}")
    episode = load_episode(episode_path(root, index))
    road = road_geometry(scenario_from_dict(manifest["scenario"]), episode.seed)
    return Replay(manifest, episode, road, root)


def box_corners(state: np.ndarray) -> np.ndarray:
    """Corners of oriented vehicle boxes: state (..., F) in `STATE_FIELDS` order -> (..., 4, 2) world [m], in the
    order front-left, front-right, rear-right, rear-left (left = -y side of the vehicle)."""
    c, s = np.cos(state[..., HEADING]), np.sin(state[..., HEADING])
    forward = np.stack([c, s], -1)[..., None, :] * (state[..., LENGTH, None, None] / 2)
    right = np.stack([-s, c], -1)[..., None, :] * (state[..., WIDTH, None, None] / 2)
    signs = np.array([[1, -1], [1, 1], [-1, 1], [-1, -1]], dtype=float)  # (4, 2): forward, right multipliers
    return state[..., None, [X, Y]] + signs[:, :1] * forward + signs[:, 1:] * right


def ego_to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Ego-frame points (..., 2) (x forward, y right, [m]) to the world frame, given the ego pose (3,) x, y [m],
    heading [rad] (the inverse of `features.to_ego_frame`)."""
    c, s = np.cos(pose[2]), np.sin(pose[2])
    return np.stack([pose[0] + c * points[..., 0] - s * points[..., 1],
                     pose[1] + s * points[..., 0] + c * points[..., 1]], -1)


def frame_steps(episode: Episode) -> np.ndarray:
    """(T,) index of the latest policy step decided at or before each recorded frame."""
    return np.searchsorted(episode.decision_frame, np.arange(episode.state.shape[0]), side="right") - 1


def render_frames(episode: Episode, dt: float, hz: float) -> np.ndarray:
    """Recorded frame indices to render: every `stride`-th frame for about `hz` frames per second of episode time
    (0: every recorded frame), the last frame included."""
    frames = episode.state.shape[0]
    stride = 1 if hz <= 0 else max(1, int(round(1.0 / (hz * dt))))
    return np.union1d(np.arange(0, frames, stride), [frames - 1])


class SceneView:
    """A figure with the road view above and the speed/risk panel below; `draw(frame)` updates it in place (artists
    are created once and reused, so rendering is fast)."""

    def __init__(self, replay: Replay, view: float = 0.0, dpi: int = 80):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Ellipse, Polygon

        self.replay, self.dpi = replay, dpi
        ep, log = replay.episode, replay.episode.step_log
        self.steps = frame_steps(ep)
        points = np.concatenate([lane.centre for lane in replay.road]) if replay.road else np.zeros((1, 2))
        extent = np.ptp(points, axis=0)
        self.strip = extent[1] < 0.25 * extent[0]  # long, narrow roads (highway, merge): a wide figure
        self.view = view if view > 0 else (160.0 if self.strip else 90.0)
        self.fig = plt.figure(figsize=(12, 5.2) if self.strip else (9, 10), dpi=dpi)
        road_h = 0.52 if self.strip else 0.66
        self.ax = self.fig.add_axes((0.06, 1 - road_h - 0.06, 0.92, road_h))
        self.panel = self.fig.add_axes((0.07, 0.08, 0.5, 0.94 - road_h - 0.17))
        self.aspect = (road_h * self.fig.get_figheight()) / (0.92 * self.fig.get_figwidth())
        self.ax.set_aspect("equal")
        self.ax.invert_yaxis()  # highway-env's y grows downwards on screen
        self.ax.set(xlabel="x [m]", ylabel="y [m]")
        self.ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
        self.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4 if self.strip else 6))
        self._draw_road()
        M = ep.state.shape[1]
        self.boxes = [self.ax.add_patch(Polygon(np.zeros((4, 2)), closed=True, zorder=5, lw=0.8, ec="black",
                                                visible=False)) for _ in range(M)]
        self.labels = [self.ax.text(0, 0, str(m), fontsize=7, ha="center", va="center", zorder=8, clip_on=True,
                                    visible=False, bbox={"fc": "white", "alpha": 0.7, "lw": 0, "pad": 0.5})
                       for m in range(M)]
        (self.path,) = self.ax.plot([], [], "-", color=EGO_COLOUR, lw=2, alpha=0.8, zorder=4, label="ego executed")
        (self.plan,) = self.ax.plot([], [], "o--", color=PLAN_COLOUR, lw=2.2, ms=4, zorder=7, label="ego planned")
        self.futures, self.ellipses = [], []
        if replay.planned:
            A, K, H, _ = log["future_mean"].shape[1:]
            self.futures = [[self.ax.plot([], [], ".-", lw=1.6, ms=5, zorder=6)[0] for _ in range(K)]
                            for _ in range(A)]
            self.ellipses = [[[self.ax.add_patch(Ellipse((0, 0), 1, 1, lw=0, zorder=3, visible=False))
                               for _ in range(H)] for _ in range(K)] for _ in range(A)]
            self.ax.plot([], [], "-", color=AGENT_COLOURS[0], label="predicted (per mode, 1σ)")
        self.fig.legend(*self.ax.get_legend_handles_labels(), loc="upper right", fontsize=8, ncols=3,
                        bbox_to_anchor=(0.99, 0.995), framealpha=0.9)
        self.info = self.fig.text(0.63, 0.94 - road_h - 0.13, "", ha="left", va="top", fontsize=8.5,
                                  family="monospace")
        self._draw_panel()
        note = "" if replay.planned else " — no planning log: vehicles only"
        m = replay.manifest
        self.fig.suptitle(f"{m['scenario']['name']} · agent {m['agent']} · episode {ep.index} (seed {ep.seed})"
                          f"{note}", fontsize=11, x=0.02, ha="left")
        self._background: Any = None

    def _draw_road(self) -> None:
        from matplotlib.patches import Polygon

        styles = {1: {"ls": (0, (4, 6)), "color": "white", "lw": 1.0}, 2: {"ls": "-", "color": "white", "lw": 1.4},
                  3: {"ls": "-", "color": "white", "lw": 1.4}}
        self.ax.set_facecolor("#7fa86a")
        for lane in self.replay.road:
            surface = np.concatenate([lane.left, lane.right[::-1]])
            self.ax.add_patch(Polygon(surface, closed=True, fc="#5a5a5a", ec="none", zorder=1))
        for lane in self.replay.road:
            for line, kind in ((lane.left, lane.left_line), (lane.right, lane.right_line)):
                if kind in styles:
                    self.ax.plot(line[:, 0], line[:, 1], zorder=2, **styles[kind])

    def _draw_panel(self) -> None:
        ep, dt = self.replay.episode, float(self.replay.manifest["dt"])
        time = np.arange(ep.state.shape[0]) * dt
        speed = np.hypot(ep.state[:, EGO_TRACK, VX], ep.state[:, EGO_TRACK, VY])
        self.panel.plot(time, speed, color=EGO_COLOUR, lw=1.5)
        self.panel.set(xlabel="time [s]", ylabel="ego speed [m/s]", xlim=(0, max(time[-1], dt)))
        self.panel.grid(alpha=0.3)
        step_time = ep.decision_frame * dt
        for s in np.flatnonzero(ep.fallback != ""):
            self.panel.axvspan(step_time[s], step_time[s] + float(self.replay.manifest["policy_dt"]), color="red",
                               alpha=0.15, lw=0)
        if self.replay.planned:
            risk = self.panel.twinx()
            risk.step(step_time, ep.step_log["collision_prob"], where="post", color="tab:red", lw=1.2)
            risk.set(ylabel="P(collision) of plan", ylim=(0, 1))
            risk.yaxis.label.set_color("tab:red")
        self.cursor = self.panel.axvline(0, color="black", lw=1)

    def draw(self, frame: int) -> None:
        """Update every artist to recorded frame `frame`."""
        ep = self.replay.episode
        state, present = ep.state[frame], ep.present[frame]
        corners = box_corners(state)
        coloured = self._predicted_tracks(frame)
        ego = state[EGO_TRACK]
        centre = ego[[X, Y]] + 0.25 * self.view * np.array([np.cos(ego[HEADING]), np.sin(ego[HEADING])]) \
            * (1.0 if self.strip else 0.4)
        half = np.array([self.view, self.view * self.aspect]) / 2
        self.ax.set_xlim(centre[0] - half[0], centre[0] + half[0])
        self.ax.set_ylim(centre[1] + half[1], centre[1] - half[1])  # inverted y
        in_view = present & np.all(np.abs(state[:, [X, Y]] - centre) < half + 5.0, axis=-1)
        for m, (box, label) in enumerate(zip(self.boxes, self.labels, strict=True)):
            visible = bool(in_view[m])
            box.set_visible(visible)
            label.set_visible(visible)
            if visible:
                box.set_xy(corners[m])
                box.set_facecolor(EGO_COLOUR if m == EGO_TRACK else coloured.get(m, "#d9d9d9"))
                label.set_position((state[m, X], state[m, Y] - 0.5 * state[m, WIDTH] - 1.2))
        self.path.set_data(ep.state[: frame + 1, EGO_TRACK, X], ep.state[: frame + 1, EGO_TRACK, Y])
        self._draw_plan(frame)
        self.cursor.set_xdata([frame * float(self.replay.manifest["dt"])] * 2)
        self.info.set_text(self._info(frame))

    def _predicted_tracks(self, frame: int) -> dict[int, str]:
        """Colour of each track that has predictions at this frame's decision."""
        s = self.steps[frame]
        if not self.replay.planned or s < 0:
            return {}
        tracks = self.replay.episode.step_log["track"][s]
        return {int(t): AGENT_COLOURS[(a - 1) % len(AGENT_COLOURS)] for a, t in enumerate(tracks) if a and t >= 0}

    def _draw_plan(self, frame: int) -> None:
        s = self.steps[frame]
        if not self.replay.planned or s < 0:
            self.plan.set_data([], [])
            return
        log = self.replay.episode.step_log
        pose, tracks = log["ego_pose"][s], log["track"][s]
        mean = ego_to_world(log["future_mean"][s].astype(np.float64), pose)  # (A, K, H, 2)
        std = log["future_std"][s].astype(np.float64)  # (A, K, H, 2), ego-frame axes
        prob = log["future_prob"][s].astype(np.float64)  # (A, K)
        spread = log["future_disagreement"][s].astype(np.float64) if "future_disagreement" in log \
            else np.zeros(mean.shape[:1] + mean.shape[2:3])
        start = self.replay.episode.state[self.replay.episode.decision_frame[s]]
        ego_mode = int(np.nanargmax(prob[0])) if np.isfinite(prob[0]).any() else 0
        self.plan.set_data(*np.concatenate([pose[None, :2], mean[0, ego_mode]]).T)
        angle = np.degrees(pose[2])
        for a, (lines, ellipses) in enumerate(zip(self.futures, self.ellipses, strict=True)):
            ok = bool(a > 0 and tracks[a] >= 0 and np.isfinite(mean[a]).all())
            colour = AGENT_COLOURS[(a - 1) % len(AGENT_COLOURS)]
            for k, (line, rings) in enumerate(zip(lines, ellipses, strict=True)):
                p = float(np.nan_to_num(prob[a, k])) if ok else 0.0
                line.set_visible(ok)
                for ring in rings:
                    ring.set_visible(ok)
                if not ok:
                    continue
                origin = start[tracks[a], [X, Y]]
                line.set_data(*np.concatenate([origin[None], mean[a, k]]).T)
                line.set(color=colour, alpha=0.15 + 0.85 * p)
                sigma = np.sqrt(std[a, k] ** 2 + spread[a, :, None] ** 2 / 2)  # (H, 2) per ego-frame axis
                for h, ring in enumerate(rings):
                    ring.set(center=mean[a, k, h], width=2 * sigma[h, 0], height=2 * sigma[h, 1], angle=angle,
                             facecolor=colour, alpha=0.03 + 0.2 * p)

    def _info(self, frame: int) -> str:
        ep, s = self.replay.episode, self.steps[frame]
        names = self.replay.manifest.get("action_names", [])
        speed = float(np.hypot(*ep.state[frame, EGO_TRACK, [VX, VY]]))
        lines = [f"t {frame * float(self.replay.manifest['dt']):5.1f} s  speed {speed:4.1f} m/s"]
        if s >= 0:
            lines.append(f"step {s}: {_action_text(ep.action[s], names)}"
                         + (f"  FALLBACK {ep.fallback[s]}" if ep.fallback[s] else ""))
        if self.replay.planned and s >= 0:
            log = ep.step_log
            lines.append(f"P(collision) {float(log['collision_prob'][s]):.3f}  cost {float(log['cost'][s]):+.2f}")
            for c, plan in enumerate(log["cand_plan"][s][:3]):
                if not np.isnan(plan).any() if plan.dtype.kind == "f" else plan[0] >= 0:  # unused rows: NaN / -1
                    shown = plan[:2] if plan.ndim == 2 else plan  # continuous plans: their first two actions
                    acts = " ".join(_action_text(a, names, short=True) for a in shown) + (" …" if len(shown) < len(
                        plan) else "")
                    lines.append(f"#{c + 1} {acts}  cost {float(log['cand_cost'][s, c]):+.2f} "
                                 f"P {float(log['cand_collision_prob'][s, c]):.2f}")
        return "\n".join(lines)

    def render(self, frame: int) -> np.ndarray:
        """Draw `frame` and return the figure as (H, W, 4) uint8 RGBA. Fast path: the static part (panel, title,
        legend) is drawn once and restored; only the road view and the dynamic panel artists are redrawn."""
        canvas = self.fig.canvas
        if self._background is None:
            dynamic = (self.ax, self.cursor, self.info)
            for artist in dynamic:
                artist.set_visible(False)
            canvas.draw()
            self._background = canvas.copy_from_bbox(self.fig.bbox)
            for artist in dynamic:
                artist.set_visible(True)
        self.draw(frame)
        canvas.restore_region(self._background)
        renderer = canvas.get_renderer()
        self.ax.draw(renderer)
        self.cursor.draw(renderer)
        self.info.draw(renderer)
        return np.asarray(canvas.buffer_rgba())

    def png(self, path: Path) -> Path:
        """Write the current frame as a PNG atomically."""
        atomic_write(path, lambda f: self.fig.savefig(f, format="png", dpi=self.dpi))
        return path

    def close(self) -> None:
        import matplotlib.pyplot as plt

        plt.close(self.fig)


def _short(action: str) -> str:
    """A meta-action name in at most 5 letters: LANE_LEFT -> LEFT, FASTER -> FASTE."""
    return action.replace("LANE_", "")[:5]


def _action_text(action: Any, names: list[str], short: bool = False) -> str:
    """A recorded action as text: a meta-action's name (`_short` when short), or a continuous action's
    components (`acceleration +0.21 steering -0.05`; short: `+0.21/-0.05`)."""
    action = np.asarray(action)
    if action.ndim:
        if short:
            return "/".join(f"{v:+.2f}" for v in action)
        return " ".join(f"{n} {v:+.2f}" for n, v in zip(names, action, strict=False))
    i = int(action)
    if i >= len(names) or i < 0:
        return str(i)
    return _short(names[i]) if short else names[i]


def _gif_writer(fps: float) -> Any:
    """matplotlib's PillowWriter, with `add(rgba)` taking frames already rendered by `SceneView.render` (its own
    `grab_frame` would draw the whole figure again)."""
    from matplotlib import animation
    from PIL import Image

    class RenderedPillowWriter(animation.PillowWriter):
        def add(self, rgba: np.ndarray) -> None:
            self._frames.append(Image.fromarray(np.ascontiguousarray(rgba[..., :3])))

    return RenderedPillowWriter(fps=fps)


def _movie(view: SceneView, frames: np.ndarray, path: Path, writer: Any,
           on_frame: Callable[[int], None] | None) -> Path:
    """Render `frames` through a matplotlib animation writer into a temp file beside `path`, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with writer.saving(view.fig, tmp, view.dpi):
            for frame in frames:
                if hasattr(writer, "add"):
                    writer.add(view.render(int(frame)))
                else:
                    view.draw(int(frame))
                    writer.grab_frame()
                if on_frame:
                    on_frame(int(frame))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def key_frames(episode: Episode, count: int) -> list[int]:
    """`count` recorded frames at evenly spaced policy decisions (first and last included)."""
    if count <= 0 or episode.steps == 0:
        return []
    steps = np.unique(np.linspace(0, episode.steps - 1, count).round().astype(int))
    return [int(episode.decision_frame[s]) for s in steps]


def write_replay(replay: Replay, out: Path, hz: float = 5.0, keys: int = 4, view: float = 0.0, dpi: int = 80,
                 mp4: bool = True, on_frame: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write `<out>/ep_<index>.gif` (and `.mp4` when ffmpeg exists and `mp4`), and `keys` PNG key frames; returns
    the paths, frame count and rendering speed [frames/s] (the GIF pass, drawing and encoding)."""
    import time

    from matplotlib import animation

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ep = replay.episode
    frames = render_frames(ep, float(replay.manifest["dt"]), hz)
    fps = 1.0 / (float(replay.manifest["dt"]) * max(1, int(frames[1] - frames[0]) if len(frames) > 1 else 1))
    stem = f"ep_{ep.index:06d}"
    view_ = SceneView(replay, view, dpi)
    try:
        start = time.perf_counter()
        gif = _movie(view_, frames, out / f"{stem}.gif", _gif_writer(fps), on_frame)
        seconds = time.perf_counter() - start
        paths = {"gif": str(gif)}
        if mp4 and animation.writers.is_available("ffmpeg"):
            paths["mp4"] = str(_movie(view_, frames, out / f"{stem}.mp4", animation.FFMpegWriter(fps=fps), None))
        pngs = []
        for frame in key_frames(ep, keys):
            view_.draw(frame)
            pngs.append(str(view_.png(out / f"{stem}_step{frame_steps(ep)[frame]:03d}.png")))
    finally:
        view_.close()
    return {"episode": ep.index, "planning_log": replay.planned, "frames": len(frames), "fps_playback": fps,
            "render_seconds": seconds, "render_fps": len(frames) / seconds, **paths, "png": pngs,
            "mp4_skipped": "mp4" not in paths}
