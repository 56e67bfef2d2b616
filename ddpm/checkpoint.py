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
      text/               text models only: the frozen text encoder whose token states the U-Net attends to
                          (``ddpm.text``'s layout: text/text_encoder/ + text/tokenizer/); config.json then also holds
                          "text_encoder": {"source": ..., "folder": "text", "context_length": L, "width": D}
      image_encoder/      unCLIP decoders only: the frozen CLIP whose image embeddings the U-Net is conditioned on
                          (``ddpm.clip``'s layout); config.json then also holds
                          "image_encoder": {"source": ..., "folder": "image_encoder", "embed_dim": E}
      prior/              a whole unCLIP model only: the prior (``ddpm.prior``'s folder) that samples the decoder's
                          image embedding from a prompt, in the same CLIP's space; config.json then also holds
                          "prior": {"source": ..., "folder": "prior"}

The folder is read and written by ``ddpm.folder_format`` (as the autoencoder's is), which also holds
``CheckpointError``. Like nanoGPT's checkpoints, the config travels with the weights, so ``load(path)`` needs
nothing else: a latent model carries its decoder, and every consumer (generation, evaluation, the endpoint) gets
pixels. Training state (optimizer, step, RNG) is a separate file written by the training pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

import numpy as np

from . import autoencoder as ae_format
from . import clip as clip_format
from . import prior as prior_format
from . import text as text_format
from .autoencoder import Autoencoder
from .clip import LoadedClip
from .prior import LoadedPrior
from .conditioning import Condition, embed_images, encode_prompts, from_labels, with_image
from .folder_format import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, check_weights, read_weights, write_folder
from .folder_format import read_config as read_config_file
from .schedule import PREDICTION_TYPES, NoiseSchedule
from .settings import SettingError, check_for_model
from .text import TextEncoder
from .unet import UNet, UNetConfig

FORMAT, VERSION = "ddpm-checkpoint", 1
AUTOENCODER_DIR, TEXT_DIR, IMAGE_ENCODER_DIR, PRIOR_DIR = "autoencoder", "text", "image_encoder", "prior"


@dataclass
class LoadedModel:
    """Everything needed to sample: the network (EMA weights by default, eval mode), its schedule and settings, for
    a latent model the autoencoder whose decoder turns its samples into pixels, for a text model its frozen text
    encoder, for unCLIP's decoder the frozen CLIP whose image embeddings it takes, and for a whole unCLIP model
    (decoder + prior) the prior that samples those embeddings from a prompt."""

    model: UNet
    schedule: NoiseSchedule
    prediction_type: str
    class_names: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    autoencoder: Autoencoder | None = None  # on the model's device, eval mode
    text_encoder: TextEncoder | None = None  # on the model's device, frozen
    image_encoder: LoadedClip | None = None  # on the model's device, frozen
    prior: LoadedPrior | None = None  # on the model's device, eval mode; its CLIP is image_encoder

    @cached_property
    def prompt_encoder(self) -> TextEncoder | None:
        """What encodes a prompt: the text encoder, or for a whole unCLIP model without one the CLIP's text tower
        (the prior reads its token states; a decoder that reads captions too pins that same tower, :func:`save`)."""
        if self.text_encoder is not None or self.prior is None:
            return self.text_encoder
        return TextEncoder(self.image_encoder.tokenizer, self.image_encoder.model.text_model,
                           device=next(self.image_encoder.model.parameters()).device)

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

    def check_request(self, *, steps: int | None = None, class_label: int | None = None, prompt: str | None = None,
                      negative_prompt: str | None = None, image: object | None = None,
                      prior_steps: int | None = None, prior_guidance_scale: float | None = None) -> None:
        """``ddpm.settings.check_for_model`` with this model's facts: what every door refuses (a SettingError)
        before it samples, e.g. a prompt to a model without a text encoder or prior steps to a model without a
        prior; and a prompt with an image to vary when the decoder reads no caption (the prompt would only reach a
        prior, which a variation does not run)."""
        check_for_model(steps=steps, class_label=class_label, num_classes=self.config.num_classes,
                        num_timesteps=self.schedule.num_timesteps, prompt=prompt, negative_prompt=negative_prompt,
                        takes_text=self.prompt_encoder is not None, image=image,
                        takes_image=self.image_encoder is not None, prior_steps=prior_steps,
                        prior_guidance_scale=prior_guidance_scale,
                        prior_timesteps=None if self.prior is None else self.prior.schedule.num_timesteps)
        if image is not None and not self.config.text_dim:
            for field_, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
                if value:
                    raise SettingError(field_, "a variation is drawn from the image's embedding alone: this "
                                               "decoder reads no caption; leave it out")

    def condition(self, count: int, *, class_labels: int | Sequence[int] | None = None,
                  prompts: str | Sequence[str] | None = None,
                  negative_prompts: str | Sequence[str] | None = None,
                  images: np.ndarray | None = None, image_embeddings: torch.Tensor | None = None
                  ) -> Condition | None:
        """The Condition of a request for ``count`` images, or None (an unconditional or class model without a
        label). class_labels / prompts / negative_prompts: one for all, or one per image.

        A text model always gets text: no prompt (or "") is the empty prompt's encoding, the unconditional model
        caption dropout trained (whether such a row is guided is ``ddpm.settings.guided``'s business). unCLIP's
        decoder always gets an image embedding: of ``images`` ((H, W, C) uint8 for all, or (count, H, W, C)) through
        its CLIP, or ``image_embeddings`` ((E,) or (count, E), e.g. from the prior; unit norm), else zeros, the
        unconditional model. A whole unCLIP model (with its prior) given neither gets the prompt's text condition,
        which ``ddpm.generate_images`` turns into image embeddings through the prior, one per seed. Refused with a ``SettingError`` (a ValueError naming the field, shown as it is by the
        CLI and HTTP): a prompt to a model without a text encoder, an image to a model without a CLIP, a class label
        to a text model, a class this model does not have.
        """
        labels = from_labels(class_labels, count)
        present = lambda values: None if values is None else ""  # noqa: E731 (check_for_model reads only "given")
        for label in dict.fromkeys(labels.labels.tolist()) if labels is not None else [None]:
            self.check_request(class_label=label, prompt=present(prompts), negative_prompt=present(negative_prompts),
                               image=None if images is None and image_embeddings is None else "")
        encoder = self.prompt_encoder
        text = None if encoder is None else encode_prompts(
            encoder, _strings("prompt", prompts, count), _strings("negative_prompt", negative_prompts, count))
        if self.image_encoder is None:
            return labels if text is None else text
        if self.prior is not None and images is None and image_embeddings is None:
            return text  # for the prior (ddpm.generation.unclip_condition)
        return with_image(self._embeddings(count, images, image_embeddings),
                          text if self.config.text_dim else None)

    def _embeddings(self, count: int, images: np.ndarray | None, embeddings: torch.Tensor | None) -> torch.Tensor:
        """(count, E) unit-norm image embeddings on the model's device: of ``images`` through the CLIP, the given
        ``embeddings``, or zeros."""
        clip = self.image_encoder.model
        device, e = next(clip.parameters()).device, clip.config.embed_dim
        if images is not None and embeddings is not None:
            raise SettingError("image", "send an image or an image embedding, not both")
        if embeddings is not None:
            z = torch.as_tensor(embeddings, dtype=torch.float32)
            z = z[None] if z.dim() == 1 else z  # (1 or count, E)
            if z.dim() != 2 or z.shape[1] != e or z.shape[0] not in (1, count):
                raise SettingError("image_embedding", f"must be {e} numbers, or {count} rows of {e}; got shape "
                                   f"{tuple(torch.as_tensor(embeddings).shape)}")
            return z.expand(count, -1).to(device)
        if images is None:
            return torch.zeros(count, e, device=device)
        from .images import from_uint8

        images = np.asarray(images)
        size, channels = clip.config.image_size, clip.config.in_channels
        if images.ndim == 3:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, channels) or (
                images.shape[0] not in (1, count)):
            raise SettingError("image", f"must be {size}x{size}x{channels} uint8 (the CLIP's input), one for all "
                               f"images or one each; got {images.dtype} of shape {images.shape}")
        z = embed_images(clip, from_uint8(images))  # (1 or count, E)
        return z.expand(count, -1)

def _strings(field_: str, values: str | Sequence[str] | None, count: int) -> list[str]:
    """One string per image from None (the empty prompt), one string for all, or one per image; else SettingError."""
    values = "" if values is None else values
    rows = [values] * count if isinstance(values, str) else values
    if not isinstance(rows, (list, tuple)) or not all(isinstance(v, str) for v in rows):
        raise SettingError(field_, "must be a string, or one string per image")
    if len(rows) != count:
        raise SettingError(field_, f"got {len(rows)} for {count} images")
    return list(rows)


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
    text_encoder: TextEncoder | None = None,
    text_encoder_source: dict | None = None,
    image_encoder: LoadedClip | None = None,
    image_encoder_source: dict | None = None,
    prior: LoadedPrior | None = None,
    prior_source: dict | None = None,
) -> Path:
    """Write ``model`` (and the EMA weights, or a copy of the raw ones) to the folder ``path``.

    A latent model passes its ``autoencoder`` (saved into ``autoencoder/``) and ``autoencoder_source``, where it
    came from (e.g. ``{"uri": "models:/photos-ae/3", "name": "photos-ae", "version": "3"}``), recorded in config.json.
    A text model (``text_dim`` > 0) passes its ``text_encoder`` (saved into ``text/``, ``ddpm.text``'s layout) and
    ``text_encoder_source`` the same way; unCLIP's decoder (``image_dim`` > 0) its CLIP, ``image_encoder``
    (saved into ``image_encoder/``, ``ddpm.clip``'s layout), and ``image_encoder_source``; a whole unCLIP model
    also its ``prior`` (saved into ``prior/``; its embeddings must be the CLIP's, and a decoder that reads captions
    must read them with that CLIP's text tower) and ``prior_source``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    text_dim = model.config.text_dim
    if (text_encoder is None) != (text_dim == 0) or (text_encoder is not None and text_encoder.width != text_dim):
        raise ValueError(f"a U-Net with text_dim {text_dim} needs " + (
            "no text encoder" if text_dim == 0 else f"a text encoder of width {text_dim}") + (
            "" if text_encoder is None else f"; got one of width {text_encoder.width}"))
    image_dim = model.config.image_dim
    found = None if image_encoder is None else image_encoder.model.config.embed_dim
    if (image_encoder is None) != (image_dim == 0) or (found is not None and found != image_dim):
        raise ValueError(f"a U-Net with image_dim {image_dim} needs " + (
            "no image encoder" if image_dim == 0 else f"a CLIP of embedding width {image_dim}") + (
            "" if found is None else f"; got one of width {found}"))
    if prior is not None:
        _check_prior(prior, image_dim, text_encoder, image_encoder, "the prior")
    path = Path(path)
    if text_encoder is not None:
        text_format.save(path / TEXT_DIR, text_encoder.tokenizer, text_encoder.model)
    if prior is not None:
        prior_format.save(path / PRIOR_DIR, prior.model, prior.schedule, metadata=prior.metadata)
    if image_encoder is not None:
        clip_format.save(path / IMAGE_ENCODER_DIR, image_encoder.model, image_encoder.tokenizer)
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
    if text_encoder is not None:
        config["text_encoder"] = {"source": text_encoder_source or {}, "folder": TEXT_DIR,
                                  "context_length": text_encoder.context_length, "width": text_encoder.width}
    if image_encoder is not None:
        config["image_encoder"] = {"source": image_encoder_source or {}, "folder": IMAGE_ENCODER_DIR,
                                   "embed_dim": image_dim}
    if prior is not None:
        config["prior"] = {"source": prior_source or {}, "folder": PRIOR_DIR}
    return write_folder(path, tensors, config)


def attach_prior(path: str | Path, prior: LoadedPrior, prior_source: dict | None = None) -> Path:
    """Make the decoder checkpoint folder ``path`` a whole unCLIP model: ``prior/`` written and its entry added to
    config.json (rewritten last), after the fit is checked as :func:`save` checks it. The prior must sample the
    embeddings of the decoder's own CLIP: that its weights are the same is the caller's to check (the folder keeps
    one CLIP)."""

    path = Path(path)
    decoder = load(path)
    if decoder.prior is not None:
        raise CheckpointError(f"{path}: already carries a prior")
    _check_prior(prior, decoder.config.image_dim, decoder.text_encoder, decoder.image_encoder, "the prior")
    prior_format.save(path / PRIOR_DIR, prior.model, prior.schedule, metadata=prior.metadata)
    config = read_config(path)
    config["prior"] = {"source": prior_source or {}, "folder": PRIOR_DIR}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def _check_prior(prior: LoadedPrior, image_dim: int, text_encoder: TextEncoder | None,
                 image_encoder: LoadedClip | None, where) -> None:
    """A prior fits a decoder when it samples the embeddings of the decoder's CLIP and, if the decoder reads
    captions, the decoder reads them with that CLIP's text tower (one encoding of a prompt serves both)."""
    if image_encoder is None or prior.model.config.embed_dim != image_dim:
        raise CheckpointError(f"{where} samples embeddings of width {prior.model.config.embed_dim}, but the decoder "
                              f"takes " + ("no image embedding" if image_encoder is None else f"width {image_dim}"))
    tower = image_encoder.model.text_model.state_dict()
    if prior.model.config.text_dim != image_encoder.model.config.text_width:
        raise CheckpointError(f"{where} reads token states of width {prior.model.config.text_dim}, not the CLIP's "
                              f"{image_encoder.model.config.text_width}")
    if text_encoder is not None and (text_encoder.model.config != image_encoder.model.text_model.config or any(
            not torch.equal(v, tower[k]) for k, v in text_encoder.model.state_dict().items())):
        raise CheckpointError(f"{where}: the decoder reads captions with another text encoder than its CLIP's text "
                              f"tower; a whole unCLIP model encodes a prompt once, with the CLIP")


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
    encoder = _load_pinned(path, config, "text_encoder", TEXT_DIR, unet_config.text_dim, text_format.load,
                           lambda e: e.width, "text encoder", "token states", device)
    clip = _load_pinned(path, config, "image_encoder", IMAGE_ENCODER_DIR, unet_config.image_dim, clip_format.load,
                        lambda c: c.model.config.embed_dim, "CLIP", "image embeddings", device)
    prior = None
    if config.get("prior"):
        prior = prior_format.load(path / config["prior"].get("folder", PRIOR_DIR), device=device)
        _check_prior(prior, unet_config.image_dim, encoder, clip, path)
    return LoadedModel(model, schedule, config["prediction_type"], config.get("class_names", []),
                       config.get("metadata", {}), decoder, encoder, clip, prior)


def _load_pinned(path: Path, config: dict, key: str, folder: str, width: int, load, width_of, noun: str, what: str,
                 device):
    """The encoder a model pins in config.json's ``key`` ("text_encoder": a text model's, read by ``ddpm.text.load``;
    "image_encoder": unCLIP's decoder's CLIP, ``ddpm.clip.load``), loaded from its folder and checked against the
    U-Net's ``width`` (``width_of(encoder)``: its token states', its embeddings'); None when the U-Net takes none.
    ``noun`` and ``what`` name the encoder and its output in errors."""
    entry = config.get(key)
    if not entry:
        if width:
            raise CheckpointError(f"{path}: the U-Net takes {what} of width {width} but the checkpoint has no {noun} "
                                  f"(config.json has no \"{key}\")")
        return None
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path / CONFIG_FILE}: \"{key}\" must be an object")
    encoder = load(path / entry.get("folder", folder), device=device)
    if width_of(encoder) != width:
        raise CheckpointError(f"{path}: the U-Net takes {what} of width {width} but its {noun}'s have width "
                              f"{width_of(encoder)}")
    return encoder


def load_training_weights(path: str | Path) -> tuple[dict, dict]:
    """(raw state, EMA state) as CPU tensors, for resuming training."""
    tensors = read_weights(Path(path) / WEIGHTS_FILE)
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return raw, ema
