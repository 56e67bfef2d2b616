"""What a batch generation job makes: the sampler settings, each image's class or prompt, the seeds cut into shards.

Image i (i = 0..N-1) has seed ``(K + i) mod 2^32`` (``ddpm.image_seeds``) and, with labels, the class
``Labels.at(i)``. With a prompts file (``pipelines.generate.prompts``) of n images per prompt, image i = k n + j is
prompt k's j-th and has seed ``(K + j) mod 2^32`` instead. Shard j holds images ``j*S .. min((j+1)*S, N) - 1``: the
unit of work, of commit and of resumption. :func:`check_job` refuses, before anything runs, what the model cannot
make.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipelines.errors import UserError

if TYPE_CHECKING:
    from pipelines.generate.model_source import ModelSource
    from pipelines.generate.prompts import Prompts

FORMATS = ("png", "parquet")
SHARD_IMAGES = 256  # images per shard: the unit of work, of commit and of resumption


@dataclass(frozen=True)
class Sampling:
    """The settings that decide the pixels besides the seed and the label (what ``POST /generate`` takes)."""

    sampler: str = "ddim"
    steps: int | None = None  # None: the sampler's default, resolved by :meth:`resolved`
    eta: float = 0.0
    guidance_scale: float = 1.0
    forward_rows: int = 16  # ddpm.FORWARD_ROWS, the endpoint's micro_batch
    prior_steps: int | None = None  # a whole unCLIP model's prior (None: ddpm.settings.PRIOR_STEPS)
    prior_guidance_scale: float | None = None  # ... and its guidance (None: ddpm.settings.PRIOR_GUIDANCE_SCALE)

    def resolved(self) -> "Sampling":
        from ddpm import DEFAULT_STEPS

        return self if self.steps is not None else replace(self, steps=DEFAULT_STEPS[self.sampler])

    def describe(self) -> dict:
        """The settings as a job's manifest records them; the prior's only when set (a job of a model without a
        prior describes itself as before they existed, so its manifest still resumes)."""
        return {k: v for k, v in asdict(self.resolved()).items() if v is not None or not k.startswith("prior_")}


@dataclass(frozen=True, eq=False)
class Labels:
    """Image i's class: none (unconditional), one class for all, ``balanced`` (i mod num_classes), or given per image.

    ``balanced`` is a rule, not a list, so it costs nothing at any N; ``given`` (``ddpm evaluate`` labels its samples
    like the held-out images) holds one label per image.
    """

    kind: str = "none"  # none | class | balanced | given
    class_label: int | None = None
    num_classes: int = 0
    given: np.ndarray | None = None

    @classmethod
    def none(cls) -> "Labels":
        return cls()

    @classmethod
    def one(cls, class_label: int) -> "Labels":
        return cls("class", class_label=int(class_label))

    @classmethod
    def balanced(cls, num_classes: int) -> "Labels":
        return cls("balanced", num_classes=int(num_classes))

    @classmethod
    def per_image(cls, labels: Sequence[int]) -> "Labels":
        return cls("given", given=np.asarray(labels, dtype=np.int64))

    def at(self, start: int, stop: int) -> int | np.ndarray | None:
        """The class labels of images start..stop-1 in the form ``ddpm.generate_images`` takes."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return self.class_label
        if self.kind == "balanced":
            return np.arange(start, stop, dtype=np.int64) % self.num_classes
        return self.given[start:stop]

    def counts(self, num_images: int, num_classes: int) -> list[int] | None:
        """Images per class over the whole job (None when unconditional)."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            return [num_images if c == self.class_label else 0 for c in range(num_classes)]
        if self.kind == "balanced":
            return np.bincount(np.arange(num_images) % self.num_classes, minlength=num_classes).tolist()
        return np.bincount(self.given[:num_images], minlength=num_classes).tolist()

    def describe(self) -> dict:
        if self.kind == "given":
            digest = hashlib.sha256(np.ascontiguousarray(self.given, dtype=np.int64).tobytes()).hexdigest()
            return {"kind": "given", "count": int(len(self.given)), "sha256": digest}
        return {k: v for k, v in {"kind": self.kind, "class_label": self.class_label,
                                  "num_classes": self.num_classes or None}.items() if v is not None}


@dataclass(frozen=True)
class Plan:
    """Seeds K..K+N-1 (mod 2^32) cut into shards of ``shard_images``; with ``per_prompt`` n > 0 (a prompts file),
    image i is prompt i // n's, from seed K + (i mod n)."""

    seed: int
    num_images: int
    shard_images: int = SHARD_IMAGES
    per_prompt: int = 0

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_images / self.shard_images)

    def rows(self, shard: int) -> range:
        """The image indices i of ``shard``."""
        start = shard * self.shard_images
        return range(start, min(start + self.shard_images, self.num_images))

    def seeds(self, rows: range) -> list[int]:
        from ddpm import image_seeds

        if self.per_prompt:
            return [(self.seed + i % self.per_prompt) % 2**32 for i in rows]  # (K + j) mod 2^32, j = i mod n
        return image_seeds(self.seed + rows.start, len(rows))  # (K + i) mod 2^32 for i in rows

    def prompt_indices(self, rows: range) -> list[int]:
        """The prompt k of each image in ``rows``: i // n with a prompts file, else 0 (the one prompt, if any)."""
        return [i // self.per_prompt for i in rows] if self.per_prompt else [0] * len(rows)

    def describe(self) -> dict:
        if self.per_prompt:
            return {"first": self.seed, "count": self.num_images, "per_prompt": self.per_prompt,
                    "last": (self.seed + self.per_prompt - 1) % 2**32}
        last = (self.seed + self.num_images - 1) % 2**32
        return {"first": self.seed, "count": self.num_images, "last": last}


def check_job(source: ModelSource, sampling: Sampling, labels: Labels, fmt: str | None = None,
              prompts: Prompts | None = None) -> None:
    """Refuse, before anything runs, what this model cannot make: the rules of ``POST /generate``
    (``ddpm.settings``) plus the batch job's own (labels for every image, a format that holds the images). Each
    prompt of a file was checked on reading (``read_prompts``); here the job's prompts as a whole."""
    from ddpm.settings import SettingError, check_for_model, check_settings

    from pipelines.errors import flag_error

    class_label = labels.class_label if labels.kind == "class" else None
    prompt = None if prompts is None else prompts.representative()
    try:
        if labels.kind in ("balanced", "given"):
            if source.takes_text:
                raise SettingError("labels", "this model is conditioned on text: give --prompt or --prompts instead")
            if source.num_classes == 0:
                raise SettingError("labels", "this model is unconditional: leave the labels out")
            class_label = 0  # stands for every class below: the guidance rule applies as for one class
        negative = None if prompts is None or prompts.kind != "one" else prompts.negatives[0]
        check_settings(sampler=sampling.sampler, steps=sampling.steps, eta=sampling.eta, seed=0,
                       class_label=class_label, guidance_scale=sampling.guidance_scale, prompt=prompt,
                       negative_prompt=negative, prior_steps=sampling.prior_steps,
                       prior_guidance_scale=sampling.prior_guidance_scale)
        check_for_model(steps=sampling.steps, class_label=class_label if labels.kind == "class" else None,
                        num_classes=source.num_classes, num_timesteps=source.num_timesteps, prompt=prompt,
                        takes_text=source.takes_text, takes_image=source.takes_image,
                        prior_steps=sampling.prior_steps, prior_guidance_scale=sampling.prior_guidance_scale,
                        prior_timesteps=source.prior_timesteps)
        if labels.kind == "given" and len(labels.given) and not 0 <= labels.given.min() <= labels.given.max() \
                < source.num_classes:
            raise SettingError("labels", f"labels must be in 0..{source.num_classes - 1} for this model")
    except SettingError as exc:
        raise flag_error(exc) from None
    if sampling.forward_rows < 1:
        raise UserError(f"--batch-size must be at least 1, got {sampling.forward_rows}")
    if fmt == "png" and source.image_shape[2] not in (1, 3):
        raise UserError(f"--format png: this model makes {source.image_shape[2]}-channel images and PNG holds 1 "
                        f"(grey) or 3 (RGB); use --format parquet")
