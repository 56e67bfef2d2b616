"""``ddpm train-autoencoder``'s configuration: a YAML file with two sections, each a typed, frozen dataclass.

::

    model:  {preset: small-f4, latent_channels: 4, ...}   # -> ddpm.AutoencoderConfig (preset first, then fields)
    train:  {batch_size: 32, lr: 1.0e-3, kl_weight: 1.0e-6, ...}   # -> AutoencoderTrainConfig

An unknown key anywhere is an error that names it; overrides are ``--set section.key=value`` as for ``ddpm train``
(:func:`pipelines.config.apply_overrides`). The model's ``scaling_factor`` and ``shift_factor`` are not settings:
training measures the scaling factor (:func:`ddpm.autoencoder.measure_scaling_factor`) and stores it in every
checkpoint's model. Lengths carry their unit in the name (``total_images``, ``checkpoint_every_images``).

Validating a config loads torch (the core) but never Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


from ddpm.autoencoder import AutoencoderConfig
from ddpm.training import PRECISIONS
from pipelines.config import _strict, apply_overrides, read_yaml, set_by, unknown_section_source
from pipelines.errors import UserError

SECTIONS = ("model", "train")
MEASURED = ("scaling_factor", "shift_factor")  # model fields that training measures, never set in a config
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    total_images: int = 200_000           # the run ends after exactly this many training images ...
    max_minutes: float | None = None      # ... or this many minutes of training, if sooner (the LR decays over both)
    batch_size: int = 32                  # global batch, split evenly across workers
    lr: float = 1e-3
    lr_decay: str = "cosine"              # "constant" or "cosine" (to 0 at total_images or max_minutes)
    warmup_images: int = 3_200
    adam_beta2: float = 0.999
    weight_decay: float = 0.0             # AdamW's; 0 is plain Adam
    grad_clip: float = 1.0
    loss: str = "l1"                      # reconstruction: "l1" (LDM's pixel term) or "l2", mean over pixels
    kl_weight: float = 1e-6               # LDM's weight; the KL is normalised as LDM's (see the worker's docstring)
    random_flip: bool = True
    seed: int = 0                         # weights, the held-out split, the row order
    precision: str = "auto"               # "auto" (bf16 on CUDA and bf16 CPUs, else fp32), "fp32" or "bf16"
    eval_images: int = 64                 # held out (first rows after a seeded shuffle), never trained on: PSNR
    scaling_images: int = 256             # training rows the scaling factor is measured on at each checkpoint
    log_every_steps: int = 50
    checkpoint_every_images: int = 50_000
    sample_every_images: int = 50_000     # held-out PSNR and the originals-over-reconstructions grid (also at
                                          # every checkpoint and at the end)
    num_checkpoints_to_keep: int = 2
    max_failures: int = 2
    elastic_check_s: float = 60.0         # an elastic run (--num-workers MIN-MAX) looks for room to grow this often

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"train.loss must be l1 or l2, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.lr_decay not in ("constant", "cosine"):
            raise UserError(f"train.lr_decay must be constant or cosine, got {self.lr_decay!r}")
        for name in ("total_images", "batch_size", "checkpoint_every_images", "sample_every_images",
                     "eval_images", "scaling_images", "log_every_steps", "num_checkpoints_to_keep"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_images", "max_failures"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be at least 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        if not self.kl_weight >= 0:
            raise UserError(f"train.kl_weight must be at least 0, got {self.kl_weight}")
        if not 0 <= self.adam_beta2 < 1:
            raise UserError(f"train.adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        if not self.elastic_check_s >= 0:
            raise UserError(f"train.elastic_check_s must be at least 0, got {self.elastic_check_s}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"train.max_minutes must be positive (or null for no time limit), got {self.max_minutes}")

    def build_optimizer(self, params):
        """Adam (AdamW with ``weight_decay``) with beta1 0.9, fused where torch has a fused kernel."""
        import torch

        params = list(params)
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        cls = torch.optim.AdamW if self.weight_decay else torch.optim.Adam
        return cls(params, lr=self.lr, betas=(0.9, self.adam_beta2), weight_decay=self.weight_decay, fused=fused)

    def time_spent(self, seconds: float) -> float:
        """The fraction of ``max_minutes`` that ``seconds`` of training used; 0 without a time limit."""
        return seconds / (self.max_minutes * 60) if self.max_minutes is not None else 0.0

    def finished(self, images_seen: int, seconds: float) -> bool:
        return images_seen >= self.total_images or self.time_spent(seconds) >= 1


@dataclass(frozen=True)
class AutoencoderRunConfig:
    model: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig.preset("small-f4"))
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train)}

    def hash(self) -> str:
        """A short, stable hash of the recipe (model and train sections), for registry tags."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def from_dict(raw: dict, source: str = "config", given: dict[str, str] | None = None) -> AutoencoderRunConfig:
    """The run's config from nested sections; ``given``: the keys ``--set`` gave (:func:`pipelines.config.set_by`)."""
    given = given or {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model, train), "
                        f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{unknown_section_source(unknown[0], source, given)}: unknown section {unknown[0]!r}; "
                        f"expected model, train")
    for section in SECTIONS:
        if not isinstance(raw.get(section) or {}, dict):
            raise UserError(f"{source}: section {section} must be a mapping of keys to values, got {raw[section]!r}")
    model = dict(raw.get("model") or {})
    measured = sorted(set(model) & set(MEASURED))
    if measured:
        who = given.get(f"model.{measured[0]}", source)
        raise UserError(f"{who}: model.{measured[0]} is measured during training, not set; remove it")
    preset = model.pop("preset", None)
    try:
        base = AutoencoderConfig.preset(str(preset)).to_dict() if preset is not None else {}
    except ValueError as exc:
        raise UserError(f"{source}: model.preset: {exc}") from None
    for key in MEASURED:
        base.pop(key, None)
    return AutoencoderRunConfig(
        model=_strict(AutoencoderConfig, {**base, **model}, f"{source}: model", given),
        train=_strict(AutoencoderTrainConfig, dict(raw.get("train") or {}), f"{source}: train", given),
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> AutoencoderRunConfig:
    """Read a YAML preset (defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_yaml(path, example="configs/autoencoder-f4.yaml")
    return from_dict(apply_overrides(raw, overrides or []), str(path or "config"), set_by(overrides))
