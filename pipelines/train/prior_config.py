"""``ddpm train-prior``'s configuration: a YAML file with two sections, each a typed, frozen dataclass.

::

    model:  {width: 256, depth: 4, heads: 4, schedule: cosine}                       # PriorModelConfig
    train:  {clip: models:/shapes-clip/1, batch_size: 256, caption_dropout: 0.1, ...}  # PriorTrainConfig

The prior's embedding and text widths come from the CLIP it is trained on (``train.clip``, also ``--clip``): the
image embeddings it samples are that CLIP's. An unknown key anywhere is an error that names it; overrides are
``--set section.key=value``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddpm import NoiseSchedule
from ddpm.prior import PriorConfig
from pipelines.config import _strict, apply_overrides, read_yaml, set_by
from pipelines.errors import UserError
from pipelines.train.loop_config import LoopTrainConfig, read_sections, recipe_hash

SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class PriorModelConfig:
    """ddpm.prior.PriorConfig's sizes (the CLIP gives the embedding and text widths) and the noise schedule."""

    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    schedule: str = "cosine"  # unCLIP's prior: cosine, T = 1000
    num_timesteps: int = 1000

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"model.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        try:
            PriorConfig(embed_dim=1, text_dim=1, width=self.width, depth=self.depth, heads=self.heads,
                        dropout=self.dropout)  # its own checks
        except ValueError as exc:
            raise UserError(f"model: {exc}") from None

    def prior_config(self, embed_dim: int, text_dim: int) -> PriorConfig:
        return PriorConfig(embed_dim=embed_dim, text_dim=text_dim, width=self.width, depth=self.depth,
                           heads=self.heads, dropout=self.dropout)

    def noise_schedule(self) -> NoiseSchedule:
        if self.schedule == "cosine":
            return NoiseSchedule.cosine(self.num_timesteps)
        return NoiseSchedule.linear(self.num_timesteps)


@dataclass(frozen=True)
class PriorTrainConfig(LoopTrainConfig):
    """The shared train keys (:class:`pipelines.train.loop_config.LoopTrainConfig`) and the prior's own."""

    clip: str = ""  # the CLIP (models:/NAME/VERSION, or a folder ddpm.clip.load reads); --clip sets it
    caption_dropout: float = 0.1  # rows trained with the empty caption: the null form guidance drops to
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    eval_images: int = 256
    eval_steps: int = 20  # DDIM steps of the held-out evaluation's samples
    eval_guidance_scale: float = 1.0
    clip_sha256: str = ""  # set by ddpm train-prior: the CLIP's weights, which a resume must find again

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"train.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.eval_steps < 1:
            raise UserError(f"train.eval_steps must be positive, got {self.eval_steps}")


@dataclass(frozen=True)
class PriorRunConfig:
    model: PriorModelConfig = field(default_factory=PriorModelConfig)
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "train": asdict(self.train)}

    def hash(self) -> str:
        """A short, stable hash of the recipe (model and train sections), for registry tags."""
        return recipe_hash(self.to_dict())


def from_dict(raw: dict, source: str = "config", given: dict[str, str] | None = None) -> PriorRunConfig:
    given = given or {}
    model, train = read_sections(raw, source, given)
    return PriorRunConfig(model=_strict(PriorModelConfig, model, f"{source}: model", given),
                          train=_strict(PriorTrainConfig, train, f"{source}: train", given))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PriorRunConfig:
    """Read a YAML preset (defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_yaml(path, example="configs/prior-shapes.yaml")
    return from_dict(apply_overrides(raw, overrides or []), str(path or "config"), set_by(overrides))
