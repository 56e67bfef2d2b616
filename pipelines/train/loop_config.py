"""The ``train`` section every :mod:`pipelines.train.loop` stage shares (``ddpm train-autoencoder``, ``ddpm
train-clip``): length, batch, optimizer, precision, the held-out split, logging, checkpoints and retries. A stage's
own section subclasses it with its objective's keys. Lengths carry their unit in the name."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ddpm.training import PRECISIONS
from pipelines.config import unknown_section_source
from pipelines.errors import UserError

SECTIONS = ("model", "train")  # a loop stage's config file: its model and its train section


def read_sections(raw, source: str, given: dict[str, str]) -> tuple[dict, dict]:
    """(model, train) mappings of a loop stage's config file, or a UserError naming the file (or the ``--set``,
    ``given``: :func:`pipelines.config.set_by`) for anything else at the top level."""
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
    return dict(raw.get("model") or {}), dict(raw.get("train") or {})


def recipe_hash(config_dict: dict) -> str:
    """A short, stable hash of a resolved config (its sections as a dict), for registry tags."""
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoopTrainConfig:
    total_images: int = 200_000           # the run ends after exactly this many training images ...
    max_minutes: float | None = None      # ... or this many minutes of training, if sooner (the LR decays over both)
    batch_size: int = 32                  # global batch, split evenly across workers
    lr: float = 1e-3
    lr_decay: str = "cosine"              # "constant" or "cosine" (to 0 at total_images or max_minutes)
    warmup_images: int = 3_200
    adam_beta2: float = 0.999
    weight_decay: float = 0.0             # AdamW's; 0 is plain Adam
    grad_clip: float = 1.0
    seed: int = 0                         # weights, the held-out split, the row order
    precision: str = "auto"               # "auto" (bf16 on CUDA and bf16 CPUs, else fp32), "fp32" or "bf16"
    eval_images: int = 64                 # held out (first rows after a seeded shuffle), never trained on
    log_every_steps: int = 50
    checkpoint_every_images: int = 50_000
    sample_every_images: int = 50_000     # the held-out evaluation (also at every checkpoint and at the end)
    num_checkpoints_to_keep: int = 2
    max_failures: int = 2
    elastic_check_s: float = 60.0         # an elastic run (--num-workers MIN-MAX) looks for room to grow this often

    POSITIVE = ("total_images", "batch_size", "checkpoint_every_images", "sample_every_images", "eval_images",
                "log_every_steps", "num_checkpoints_to_keep")

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.lr_decay not in ("constant", "cosine"):
            raise UserError(f"train.lr_decay must be constant or cosine, got {self.lr_decay!r}")
        for name in self.POSITIVE:
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_images", "max_failures"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be at least 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.adam_beta2 < 1:
            raise UserError(f"train.adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        if not self.weight_decay >= 0:
            raise UserError(f"train.weight_decay must be at least 0, got {self.weight_decay}")
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
