"""The model artifact: a folder with ``model.safetensors`` and ``config.json``. Loading never unpickles.

::

    checkpoint/
      config.json         {"format": "ddpm-checkpoint", "version": 1, "unet": {...}, "schedule": {...},
                           "prediction_type": "epsilon", "image_shape": [C, H, W], "num_classes": K,
                           "class_names": [...], "metadata": {...}}
      model.safetensors   "model.<param>" (raw weights) and "ema.<param>" (EMA weights), float32

Like nanoGPT's checkpoints, the config travels with the weights, so ``load(path)`` needs nothing else. Training
state (optimizer, step, RNG) is a separate file written by the training pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .schedule import PREDICTION_TYPES, NoiseSchedule
from .unet import UNet, UNetConfig

FORMAT, VERSION = "ddpm-checkpoint", 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, truncated, or does not match its own config."""


@dataclass
class LoadedModel:
    """Everything needed to sample: the network (EMA weights by default, eval mode), its schedule and settings."""

    model: UNet
    schedule: NoiseSchedule
    prediction_type: str
    class_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def config(self) -> UNetConfig:
        return self.model.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.in_channels, c.image_size, c.image_size)


def save(
    path: str | Path,
    model: UNet,
    schedule: NoiseSchedule,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    prediction_type: str = "epsilon",
    class_names: list[str] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` (and the EMA weights, or a copy of the raw ones) to the folder ``path``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters()}
    ema = {name: t.detach().float().cpu().contiguous() for name, t in (ema_state or raw).items()}
    tensors = {f"model.{k}": v for k, v in raw.items()} | {f"ema.{k}": v.clone() for k, v in ema.items()}
    cfg = model.config
    config = {
        "format": FORMAT,
        "version": VERSION,
        "unet": cfg.to_dict(),
        "schedule": schedule.to_config(),
        "prediction_type": prediction_type,
        "image_shape": [cfg.in_channels, cfg.image_size, cfg.image_size],
        "num_classes": cfg.num_classes,
        "class_names": list(class_names or []),
        "metadata": metadata or {},
    }
    save_file(tensors, str(path / WEIGHTS_FILE))
    # config.json last: a folder with a config has complete weights beside it.
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a ddpm checkpoint folder") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid JSON ({exc})") from None
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {config.get('format')!r} "
                              f"version {config.get('version')!r}; expected {FORMAT!r} version {VERSION}")
    return config


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> LoadedModel:
    """Read a checkpoint folder: a UNet with the ``weights`` ("ema" or "model") loaded, in eval mode."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    config = read_config(path)
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        schedule = NoiseSchedule.from_config(config["schedule"])
        model = UNet(unet_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config ({exc})") from None
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))  # safetensors: plain tensors, no code execution
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable or truncated ({exc})") from None
    prefix = f"{weights}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = dict(model.named_parameters())
    problems = [f"missing {k}" for k in expected.keys() - state.keys()]
    problems += [f"unexpected {k}" for k in state.keys() - expected.keys()]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {tuple(p.shape)}"
                 for k, p in expected.items() if k in state and state[k].shape != p.shape]
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json ({len(problems)} problems, "
                              f"first: {sorted(problems)[0]})")
    model.load_state_dict(state, strict=False)  # strict on parameters above; the UNet has no buffers
    model.to(device).eval()
    return LoadedModel(model, schedule, config["prediction_type"], config.get("class_names", []),
                       config.get("metadata", {}))


def load_training_weights(path: str | Path) -> tuple[dict, dict]:
    """(raw state, EMA state) as CPU tensors, for resuming training."""
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return raw, ema
