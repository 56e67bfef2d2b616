"""``ddpm train-clip``'s configuration: a YAML file with two sections, each a typed, frozen dataclass.

::

    model:  {image_channels: [32, 64, 128], embed_dim: 128, text_layers: 2, vocab_size: 1024, ...}  # ClipModelConfig
    train:  {batch_size: 128, lr: 5.0e-4, weight_decay: 0.1, eval_images: 256, ...}                 # ClipTrainConfig

The model's side and channels come from the dataset (``ddpm train-clip`` sets them); its vocabulary and special
token ids from the tokenizer learned on the training captions (``vocab_size`` is that tokenizer's largest size).
An unknown key anywhere is an error that names it; overrides are ``--set section.key=value``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ddpm.clip import ClipConfig
from ddpm.text import ClipTokenizer
from pipelines.config import _strict, apply_overrides, read_yaml, set_by
from pipelines.train.loop_config import LoopTrainConfig, read_sections, recipe_hash

MIN_VOCAB = 2 * 256 + 2  # ddpm.text.train_tokenizer's smallest: bytes, bytes + "</w>", BOS, EOS


@dataclass(frozen=True)
class ClipModelConfig:
    """ddpm.clip.ClipConfig's sizes; the token ids are the tokenizer's (:meth:`clip_config`)."""

    image_size: int = 32  # the dataset's (set by ddpm train-clip)
    in_channels: int = 3  # the dataset's
    image_channels: tuple[int, ...] = (32, 64, 128)
    image_blocks: int = 1
    image_heads: int = 4
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_mlp_ratio: int = 4
    hidden_act: str = "quick_gelu"
    vocab_size: int = 4096  # the learned tokenizer's at most (ddpm.text.train_tokenizer)
    context_length: int = 77  # tokens per caption, BOS and EOS included

    def __post_init__(self):
        object.__setattr__(self, "image_channels", tuple(self.image_channels))
        if self.vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB}, got {self.vocab_size}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be at least 3 (BOS, a token, EOS), got {self.context_length}")
        ClipConfig(**self.sizes(), vocab_size=self.vocab_size, context_length=self.context_length,
                   bos_token_id=0, eos_token_id=1, pad_token_id=1)  # its own checks

    def sizes(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("vocab_size", "context_length")}

    def clip_config(self, tokenizer: ClipTokenizer) -> ClipConfig:
        """The CLIP these sizes make with ``tokenizer``'s vocabulary, context and special ids."""
        return ClipConfig.for_tokenizer(tokenizer, **self.sizes())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_channels"] = list(self.image_channels)
        return d


@dataclass(frozen=True)
class ClipTrainConfig(LoopTrainConfig):
    """The shared train keys (:class:`pipelines.train.loop_config.LoopTrainConfig`), CLIP's defaults: AdamW with
    weight decay, a larger batch (every other pair in it is a negative), more held-out images for retrieval."""

    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    adam_beta2: float = 0.98  # CLIP's
    eval_images: int = 256


@dataclass(frozen=True)
class ClipRunConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": asdict(self.train)}

    def hash(self) -> str:
        """A short, stable hash of the recipe (model and train sections), for registry tags."""
        return recipe_hash(self.to_dict())


def from_dict(raw: dict, source: str = "config", given: dict[str, str] | None = None) -> ClipRunConfig:
    """The run's config from nested sections; ``given``: the keys ``--set`` gave (:func:`pipelines.config.set_by`)."""
    given = given or {}
    model, train = read_sections(raw, source, given)
    return ClipRunConfig(
        model=_strict(ClipModelConfig, model, f"{source}: model", given),
        train=_strict(ClipTrainConfig, train, f"{source}: train", given),
    )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ClipRunConfig:
    """Read a YAML preset (defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw = read_yaml(path, example="configs/clip-shapes.yaml")
    return from_dict(apply_overrides(raw, overrides or []), str(path or "config"), set_by(overrides))
