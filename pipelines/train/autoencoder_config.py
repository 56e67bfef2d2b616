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

from dataclasses import asdict, dataclass, field
from pathlib import Path


from ddpm.autoencoder import AutoencoderConfig
from pipelines.config import _strict, apply_overrides, read_yaml, set_by
from pipelines.errors import UserError
from pipelines.train.loop_config import LoopTrainConfig, read_sections, recipe_hash

MEASURED = ("scaling_factor", "shift_factor")  # model fields that training measures, never set in a config
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class AutoencoderTrainConfig(LoopTrainConfig):
    """The shared train keys (:class:`pipelines.train.loop_config.LoopTrainConfig`) and the autoencoder's."""

    loss: str = "l1"                      # reconstruction: "l1" (LDM's pixel term) or "l2", mean over pixels
    kl_weight: float = 1e-6               # LDM's weight; the KL is normalised as LDM's (see the worker's docstring)
    random_flip: bool = True
    scaling_images: int = 256             # training rows the scaling factor is measured on at each checkpoint

    POSITIVE = (*LoopTrainConfig.POSITIVE, "scaling_images")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"train.loss must be l1 or l2, got {self.loss!r}")
        super().__post_init__()
        if not self.kl_weight >= 0:
            raise UserError(f"train.kl_weight must be at least 0, got {self.kl_weight}")


@dataclass(frozen=True)
class AutoencoderRunConfig:
    model: AutoencoderConfig = field(default_factory=lambda: AutoencoderConfig.preset("small-f4"))
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train)}

    def hash(self) -> str:
        """A short, stable hash of the recipe (model and train sections), for registry tags."""
        return recipe_hash(self.to_dict())


def from_dict(raw: dict, source: str = "config", given: dict[str, str] | None = None) -> AutoencoderRunConfig:
    """The run's config from nested sections; ``given``: the keys ``--set`` gave (:func:`pipelines.config.set_by`)."""
    given = given or {}
    model, train = read_sections(raw, source, given)
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
        train=_strict(AutoencoderTrainConfig, train, f"{source}: train", given),
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> AutoencoderRunConfig:
    """Read a YAML preset (defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_yaml(path, example="configs/autoencoder-f4.yaml")
    return from_dict(apply_overrides(raw, overrides or []), str(path or "config"), set_by(overrides))
