"""Training the forecaster: split by episode, normalisation, minibatch Adam, early stopping, checkpoints, resume.

Checkpoint folder layout (every file written atomically):

    meta.json   schema version, model config, scene spec, fit config, dataset manifest summary, split, history
    best.pt     weights with the lowest validation NLL so far (what `load_forecaster` returns; with `ema` the
                averaged weights)
    last.pt     weights + averaged weights + optimiser + RNG + epoch counters: `fit` resumes from it after an interrupt

A batch whose loss or gradient is not finite stops training with `NonFiniteLoss` after reporting the batch; the
checkpoints of the last good epoch stay as they were. Library code: it returns metrics and reports progress
through a callback; it never prints.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drive_mbrl import SCHEMA_VERSION, __version__
from drive_mbrl.config import PRECISIONS
from drive_mbrl.data import atomic_write, write_json
from drive_mbrl.errors import DataError, DriveMbrlError
from drive_mbrl.features import HIST_FEATURES, TARGET_FEATURES, Scenes, SceneSpec
from drive_mbrl.forecaster import Forecaster, ForecasterConfig, native_precision
from drive_mbrl.losses import forecaster_loss

BEST, LAST, META = "best.pt", "last.pt", "meta.json"
GRAD_CLIP = 2.0
"""Gradient-norm clip per member (the clip on all members together is this x sqrt(E))."""


class NonFiniteLoss(DriveMbrlError):
    """Training hit a NaN/inf loss or gradient; the message names the epoch and batch."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 60
    batch_size: int = 256
    lr: float = 5e-4
    """Peak learning rate; cosine decay to 5 % of it over `epochs`."""
    weight_decay: float = 1e-4
    patience: int = 8
    """Stop after this many epochs without a better validation NLL."""
    seed: int = 0
    mode_weight: float = 0.0
    """Weight of the mode-classification term of the loss (`losses.forecaster_loss`'s `mode_weight`)."""
    ema: float = 0.0
    """Averaging window [epochs] of an exponential moving average of the weights, which is what is validated and
    checkpointed (0 = off, the raw weights): per-step decay 1 - 1 / (ema x steps per epoch)."""
    precision: str = "fp32"
    """Training forward pass: `fp32`, `bf16` (autocast to bfloat16: 1.7-2x the steps/s on a CPU with native
    bfloat16 matmuls, slower where it is emulated) or `auto` (bf16 where the device has native bfloat16 matmuls:
    `forecaster.native_precision`; the checkpoint's meta.json records the resolved one, and a resumed fit keeps
    it). fp32 by default here; `drive-mbrl fit` defaults to auto. Weights, optimiser, loss and validation stay
    fp32."""


def ema_decay(window_epochs: float, steps_per_epoch: int) -> float:
    """Per-step decay of a weight average whose window (1 / (1 - decay) steps) spans `window_epochs` epochs."""
    return 1.0 - 1.0 / max(1.0, window_epochs * steps_per_epoch)


def lr_factor(step: int, total_steps: int, warmup: float = 0.05, final: float = 0.05) -> float:
    """Learning-rate multiplier: linear warm-up over the first `warmup` share of steps, then cosine decay to
    `final` at `total_steps`."""
    warm = max(1, int(warmup * total_steps))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def split_by_episode(episode: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) masks over scenes such that no episode (or any group id given instead, such as
    `env_seeds`) has scenes in both."""
    ids = np.unique(episode)
    if len(ids) < 2:
        raise DataError(f"the dataset has {len(ids)} episode(s); a validation split by episode needs at least 2")
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    val_ids = rng.choice(ids, size=n_val, replace=False)
    val = np.isin(episode, val_ids)
    return ~val, val


def tensors(scenes: Scenes, device: torch.device) -> dict[str, torch.Tensor]:
    """The torch view of a batch of scenes on `device`."""
    return {k: torch.as_tensor(v, device=device) for k, v in scenes.__dict__.items()}


def normalisation(scenes: Scenes) -> dict[str, Any]:
    """Input mean/std per history feature over present entries, target scale (per-feature std of the one-step
    change) and mean reward."""
    present = scenes.history[..., -1] > 0.5
    hist = scenes.history[present]
    delta = scenes.future[:, :, 0] - scenes.history[:, :, -1, :4]
    delta = delta[scenes.future_mask[:, :, 0]]
    reward = scenes.reward[scenes.step_valid]
    return {"hist_mean": hist.mean(0).tolist(), "hist_std": hist.std(0).tolist(),
            "target_scale": np.nanstd(delta, axis=0).tolist() if len(delta) else [1.0] * 4,
            "reward_mean": float(reward.mean()) if len(reward) else 0.0}


def build_model(config: ForecasterConfig, norm: dict[str, Any]) -> Forecaster:
    model = Forecaster(config)
    model.set_normalisation(torch.tensor(norm["hist_mean"]), torch.tensor(norm["hist_std"]),
                            torch.tensor(norm["target_scale"]), norm["reward_mean"])
    return model


def _save_torch(path: Path, payload: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def evaluate_loss(model: Forecaster, scenes: Scenes, device: torch.device, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss terms over `scenes` (weighted by batch size), no gradients."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            batch = tensors(scenes.subset(np.arange(start, min(start + batch_size, len(scenes)))), device)
            out = model(batch["history"], batch["agent_mask"], batch["actions"])
            terms = forecaster_loss(out, batch["future"], batch["future_mask"], batch["reward"], batch["crash"],
                                    batch["step_valid"])
            n = batch["history"].shape[0]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
    return {k: v / len(scenes) for k, v in sums.items()}


def fit(train: Scenes, val: Scenes, config: ForecasterConfig, settings: TrainSettings, out: Path,
        meta_extra: dict[str, Any], device: torch.device,
        on_epoch: Callable[[dict[str, float]], None] | None = None, init: Path | None = None,
        calibration: Scenes | None = None) -> dict[str, Any]:
    """Train (or resume training) a forecaster into checkpoint folder `out`; returns the fit history summary.

    init: a checkpoint to fine-tune from (its weights and feature normalisation; `config` must be its config).
    calibration: scenes to fit the predicted spread and the planner's uncertainty limits on after training
    (`validation.calibrate`); None uses the validation split.
    """
    if settings.precision not in ("auto", *PRECISIONS):
        raise DataError(f"precision {settings.precision!r} is not known: choose auto or one of "
                        f"{', '.join(PRECISIONS)}")
    out = Path(out)
    if settings.precision == "auto" and (out / LAST).exists() and (out / META).exists():
        # A resumed fit goes on in the precision it started in (checkpoints from before `precision`: fp32).
        started = json.loads((out / META).read_text()).get("settings", {}).get("precision", "fp32")
        settings = replace(settings, precision=started)
    settings = replace(settings, precision=native_precision(settings.precision, device))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    if init is not None:
        model, init_meta = load_forecaster(init, device)
        if init_meta["model"] != config.to_dict():
            raise DataError(f"cannot fine-tune {init}: its model config {init_meta['model']} differs from "
                            f"{config.to_dict()}")
        model.reset_calibration()  # recalibrated after training
        norm = init_meta["normalisation"]
    else:
        norm = normalisation(train)
        model = build_model(config, norm).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, -(-len(train) // settings.batch_size))
    total_steps = settings.epochs * steps_per_epoch
    average = None
    if settings.ema > 0:
        decay = ema_decay(settings.ema, steps_per_epoch)
        average = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))  # buffers: constants, copied
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: lr_factor(step, total_steps))
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "stale": 0, "history": []}
    rng = np.random.default_rng(settings.seed)
    if (out / LAST).exists():
        previous = json.loads((out / META).read_text()).get("model") if (out / META).exists() else None
        if previous != config.to_dict():
            raise DataError(f"{out} holds training of another model config ({previous} there, {config.to_dict()} "
                            "now): choose another out= folder, or delete it to start over")
        last = torch.load(out / LAST, map_location=device, weights_only=False)
        model.load_state_dict(last["model"])
        optim.load_state_dict(last["optim"])
        sched.load_state_dict(last["sched"])
        if average is not None:
            if "average" not in last:
                raise DataError(f"{out} holds training without a weight average (ema=0): resume it with ema=0")
            average.load_state_dict(last["average"])
        state = last["state"]
        rng.bit_generator.state = last["rng"]
    meta = {"schema_version": SCHEMA_VERSION, "package_version": __version__, "model": config.to_dict(),
            "settings": asdict(settings), "normalisation": norm, "hist_features": list(HIST_FEATURES),
            "target_features": list(TARGET_FEATURES), **meta_extra}
    write_json(out / META, meta)
    while state["epoch"] < settings.epochs and state["stale"] < settings.patience:
        model.train()
        order = rng.permutation(len(train))
        total, batches = 0.0, 0
        for b, start in enumerate(range(0, len(order), settings.batch_size)):
            batch = tensors(train.subset(order[start : start + settings.batch_size]), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
                out_ = model(batch["history"], batch["agent_mask"], batch["actions"])
            out_ = {k: v.float() for k, v in out_.items()}
            terms = forecaster_loss(out_, batch["future"], batch["future_mask"], batch["reward"], batch["crash"],
                                    batch["step_valid"], mode_weight=settings.mode_weight)
            optim.zero_grad(set_to_none=True)
            terms["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP * math.sqrt(config.members))
            if not (torch.isfinite(terms["total"]) and torch.isfinite(grad_norm)):
                raise NonFiniteLoss(f"non-finite loss/gradient at epoch {state['epoch']}, batch {b} "
                                    f"(loss {float(terms['total'].detach())}, grad norm {float(grad_norm)}); "
                                    f"training stopped, the checkpoints in {out} are from the last good epoch")
            optim.step()
            sched.step()
            if average is not None:
                average.update_parameters(model)
            total += float(terms["total"].detach()) / config.members
            batches += 1
        kept = model if average is None else average.module  # the weights validated and checkpointed
        val_terms = evaluate_loss(kept, val, device)
        val_terms["total"] /= config.members  # per member, as train_loss (the loss sums the members)
        if not all(math.isfinite(v) for v in val_terms.values()):
            raise NonFiniteLoss(f"non-finite validation loss at epoch {state['epoch'] + 1} ({val_terms}); training "
                                f"stopped, the checkpoints in {out} are from the last good epoch")
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": total / max(batches, 1),
                  **{f"val_{k}": v for k, v in val_terms.items()}}
        state["history"].append(record)
        if val_terms["nll"] < state["best_val"]:
            state.update(best_val=val_terms["nll"], best_epoch=state["epoch"], stale=0)
            _save_torch(out / BEST, {"model": kept.state_dict()})
        else:
            state["stale"] += 1
        _save_torch(out / LAST, {"model": model.state_dict(), "optim": optim.state_dict(),
                                 "sched": sched.state_dict(), "state": state, "rng": rng.bit_generator.state,
                                 **({} if average is None else {"average": average.state_dict()})})
        if on_epoch:
            on_epoch(record)
    # Post-hoc calibration of the best weights' predicted spread on the validation split (or the given scenes).
    from drive_mbrl.validation import calibrate

    model.load_state_dict(torch.load(out / BEST, map_location=device, weights_only=True)["model"])
    spread = calibrate(model, val if calibration is None else calibration, device, seed=settings.seed)
    _save_torch(out / BEST, {"model": model.state_dict()})
    return {"epochs": state["epoch"], "best_epoch": state["best_epoch"], "best_val_nll": state["best_val"],
            **spread, "history": state["history"]}


def recalibrate(checkpoint: Path | str, model: Forecaster, meta: dict[str, Any], scenes: Scenes,
                sources: dict[str, Any], out: Path | str, device: torch.device,
                seed: int = 0) -> dict[str, Any]:
    """Write a copy of forecaster `checkpoint` (loaded as `model`, `meta` by `load_forecaster`; `model` is
    recalibrated in place) into the new folder `out` whose spread map (`std_scale`, `std_power`), mode temperature
    and planner uncertainty limits are refitted on `scenes` (`validation.calibrate`); its meta.json records the
    calibration data (`sources`, from `load_scenes`) and the fitted values. The weights are unchanged and the
    training state (last.pt) is not copied: the new folder is for use (validate, plan, export, `fit init=`), not
    to resume. Returns the calibration as `calibrate` does."""
    from drive_mbrl.data import atomic_folder
    from drive_mbrl.validation import calibrate

    if Path(out).resolve() == Path(checkpoint).resolve():
        raise DataError(f"out={out} is the checkpoint itself: write the recalibrated copy to another folder")
    spread = calibrate(model, scenes, device, seed=seed)

    def build(tmp: Path) -> None:
        _save_torch(tmp / BEST, {"model": model.state_dict()})
        write_json(tmp / META, {**meta, "calibration": {"from": str(checkpoint), **spread, **sources}})

    atomic_folder(Path(out), build)
    return spread


def forecaster_digest(checkpoint: Path | str) -> str:
    """sha256 of a checkpoint's weights file (BEST): what a dataset's agent options and a bundle's contract record,
    so that a retrained checkpoint in the same folder is told apart from the old one."""
    from drive_mbrl.onboard import sha256_file

    return sha256_file(Path(checkpoint) / BEST)


def load_forecaster(checkpoint: Path | str, device: str | torch.device = "cpu") -> tuple[Forecaster, dict]:
    """Load the best weights of a checkpoint folder and its meta.json; raises DataError on a bad folder."""
    folder = Path(checkpoint)
    if not (folder / META).is_file() or not (folder / BEST).is_file():
        raise DataError(f"{folder} is not a forecaster checkpoint (needs {META} and {BEST}; train one with "
                        "`drive-mbrl fit dataset=...`)")
    meta = json.loads((folder / META).read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"checkpoint {folder} has schema version {meta.get('schema_version')!r}, this drive_mbrl "
                        f"reads {SCHEMA_VERSION}: retrain it")
    device = resolve_device(device) if isinstance(device, str) else device
    model = build_model(ForecasterConfig(**meta["model"]), meta["normalisation"])
    try:
        model.load_state_dict(torch.load(folder / BEST, map_location="cpu", weights_only=True)["model"])
    except RuntimeError as exc:
        raise DataError(f"checkpoint {folder} does not match the model its meta.json describes "
                        f"({meta['model']}): retrain it with `drive-mbrl fit`") from exc
    return model.to(device).eval(), meta


def scene_spec(config: ForecasterConfig, history_stride: int, history_dt: float) -> SceneSpec:
    """How the forecaster's scenes are cut: history frames `history_stride` recorded frames = `history_dt` [s] apart."""
    return SceneSpec(agents=config.agents, history_len=config.history_len, history_stride=history_stride,
                     horizon=config.horizon, pad_dt=history_dt if config.pad_history else 0.0)


def load_scenes(paths: list[str], config: ForecasterConfig, history_dt: float) -> tuple[Scenes, dict[str, Any]]:
    """Scenes of one or more datasets of the same scenario and rates; episode ids are made unique across them.

    Returns the scenes and a summary of the sources (for meta.json and reports).
    """
    from drive_mbrl.data import load_dataset
    from drive_mbrl.features import dataset_scenes

    if not paths:
        raise DataError("no dataset given: pass dataset=[FOLDER,...] (folders written by `drive-mbrl collect`)")
    parts, sources, reference = [], [], None
    for offset, path in enumerate(paths):
        manifest, episodes = load_dataset(Path(path))
        key = (manifest["scenario"]["env_id"], manifest["dt"], manifest["policy_dt"])
        reference = reference or key
        if key != reference:
            raise DataError(f"dataset {path} has (env, dt, policy dt) {key}, the first one {reference}: train on "
                            "datasets of one scenario and recording rate")
        stride = round(history_dt / manifest["dt"])
        if stride < 1 or abs(stride * manifest["dt"] - history_dt) > 1e-6:
            raise DataError(f"history_dt={history_dt} is not a multiple of dataset {path}'s dt {manifest['dt']}")
        if abs(manifest["policy_dt"] - config.policy_dt) > 1e-9:
            raise DataError(f"dataset {path} has policy dt {manifest['policy_dt']}, the model {config.policy_dt}")
        if manifest_actions(manifest) != (config.num_actions, config.action_dim):
            raise DataError(f"dataset {path} has (meta-actions, continuous action dims) {manifest_actions(manifest)}, "
                            f"the model ({config.num_actions}, {config.action_dim}): use datasets of one scenario")
        if not episodes:
            raise DataError(f"dataset {path} holds no episodes")
        scenes = dataset_scenes(episodes, scene_spec(config, stride, history_dt), manifest)
        scenes.episode = scenes.episode + offset * 10**7
        parts.append(scenes)
        sources.append({"path": str(path), "agent": manifest["agent"], "seed": manifest["seed"],
                        "episodes": len(episodes), "steps": int(sum(ep.steps for ep in episodes))})
    merged = Scenes(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in Scenes.__dataclass_fields__})
    return merged, {"scenario": reference[0], "dt": reference[1], "policy_dt": reference[2], "sources": sources}


def env_seeds(episode: np.ndarray, sources: list[dict[str, Any]]) -> np.ndarray:
    """(B,) the env seed of each scene's episode, from `load_scenes`' episode ids (dataset offset x 10**7 +
    episode index) and sources (each dataset's base seed): datasets collected with the same seeds (the idm and the
    explore runs of one pipeline) replay the same traffic, so a split by episode that puts one run's episode in
    validation and the other's in training leaks; split by this instead."""
    from drive_mbrl.data import episode_seed

    base = np.array([int(src["seed"]) for src in sources], np.int64)
    return episode_seed(base[episode // 10**7], episode % 10**7)


def manifest_actions(manifest: dict) -> tuple[int, int]:
    """(number of meta-actions, continuous action dims) of a dataset: (n, 0) for meta-actions, (0, D) for continuous
    actions (datasets from before the manifest's `action_space` are discrete)."""
    names = manifest["action_names"]
    return (0, len(names)) if manifest.get("action_space", "discrete") == "continuous" else (len(names), 0)


def dataset_rates(path: str) -> tuple[float, int, int]:
    """(policy_dt [s], number of meta-actions, continuous action dims) of a dataset, read from its manifest."""
    from drive_mbrl.data import read_manifest

    manifest = read_manifest(Path(path))
    return (float(manifest["policy_dt"]), *manifest_actions(manifest))
