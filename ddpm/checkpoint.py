"""The model artifact: a folder with ``model.safetensors`` and ``config.json``. Loading never unpickles.

::

    checkpoint/
      config.json         {"format": "ddpm-checkpoint", "version": 1, "unet": {...}, "schedule": {...},
                           "prediction_type": "epsilon", "image_shape": [C, H, W], "num_classes": K,
                           "class_names": [...], "metadata": {...}}
      model.safetensors   "model.<param>" (raw weights) and "ema.<param>" (EMA weights), float32
      autoencoder/        latent models only: the autoencoder the U-Net's samples are decoded with
                          (``ddpm.autoencoder``'s folder); config.json then also holds "autoencoder": {"source": ...,
                          "image_shape": [C, H, W] of the decoded images}

The folder is read and written by ``ddpm.folder_format`` (as the autoencoder's is), which also holds
``CheckpointError``. Like nanoGPT's checkpoints, the config travels with the weights, so ``load(path)`` needs
nothing else: a latent model carries its decoder, and every consumer (generation, evaluation, the endpoint) gets
pixels. Training state (optimizer, step, RNG) is a separate file written by the training pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import autoencoder as ae_format
from .autoencoder import Autoencoder
from .folder_format import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, check_weights, read_weights, write_folder
from .folder_format import read_config as read_config_file
from .schedule import PREDICTION_TYPES, NoiseSchedule
from .unet import UNet, UNetConfig

FORMAT, VERSION = "ddpm-checkpoint", 1
AUTOENCODER_DIR = "autoencoder"


@dataclass
class LoadedModel:
    """Everything needed to sample: the network (EMA weights by default, eval mode), its schedule and settings, and
    for a latent model the autoencoder whose decoder turns its samples into pixels."""

    model: UNet
    schedule: NoiseSchedule
    prediction_type: str
    class_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    autoencoder: Autoencoder | None = None  # on the model's device, eval mode

    @property
    def config(self) -> UNetConfig:
        return self.model.config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the diffusion runs on: the images, or a latent model's latents."""
        c = self.model.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images it makes: the samples, or for a latent model their decoded size."""
        if self.autoencoder is None:
            return self.sample_shape
        c, h, w = self.sample_shape
        f = self.autoencoder.downsample_factor
        return (self.autoencoder.config.in_channels, h * f, w * f)


def save(
    path: str | Path,
    model: UNet,
    schedule: NoiseSchedule,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    prediction_type: str = "epsilon",
    class_names: list[str] | None = None,
    metadata: dict | None = None,
    autoencoder: Autoencoder | None = None,
    autoencoder_source: dict | None = None,
) -> Path:
    """Write ``model`` (and the EMA weights, or a copy of the raw ones) to the folder ``path``.

    A latent model passes its ``autoencoder`` (saved into ``autoencoder/``) and ``autoencoder_source``, where it
    came from (e.g. ``{"uri": "models:/photos-ae/3", "name": "photos-ae", "version": "3"}``), recorded in config.json.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    path = Path(path)
    if autoencoder is not None:
        ae_format.save(path / AUTOENCODER_DIR, autoencoder, metadata={"source": autoencoder_source or {}})
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
    if autoencoder is not None:
        c, h, w = config["image_shape"]
        f = autoencoder.downsample_factor
        config["autoencoder"] = {"source": autoencoder_source or {}, "folder": AUTOENCODER_DIR,
                                 "image_shape": [autoencoder.config.in_channels, h * f, w * f]}
    return write_folder(path, tensors, config)


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json, checked to be this format and version (``ddpm.folder_format.read_config``)."""
    path = Path(path)
    config = read_config_file(path, what="a ddpm checkpoint folder")
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
    tensors = read_weights(path / WEIGHTS_FILE)
    prefix = f"{weights}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    check_weights(state, dict(model.named_parameters()), path)
    model.load_state_dict(state, strict=False)  # strict on parameters above; the UNet has no buffers
    model.to(device).eval()
    decoder = None
    if config.get("autoencoder"):
        decoder = ae_format.load(path / config["autoencoder"].get("folder", AUTOENCODER_DIR), device=device)
        if decoder.config.latent_channels != unet_config.in_channels:
            raise CheckpointError(f"{path}: the U-Net takes {unet_config.in_channels} channels but its autoencoder's "
                                  f"latents have {decoder.config.latent_channels}")
    return LoadedModel(model, schedule, config["prediction_type"], config.get("class_names", []),
                       config.get("metadata", {}), decoder)


def load_training_weights(path: str | Path) -> tuple[dict, dict]:
    """(raw state, EMA state) as CPU tensors, for resuming training."""
    tensors = read_weights(Path(path) / WEIGHTS_FILE)
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return raw, ema
