"""What ``ddpm evaluate`` adds for a text model: alignment on the fixed evaluation prompts, and a CLIP score.

::

    reader      pipelines.evaluate.alignment's reader, trained on the data's captions (cached beside FD-cls's)
    prompts     alignment.evaluation_prompts(): P prompts, N images each; image k N + j is prompt k's j-th, from seed
                (K + j) mod 2^32, as `ddpm generate --prompts FILE --num-images N --seed K` makes them
    alignment   align_<seen|held_out>_<count|colour|shape|size|relation|all>: the share of images the reader reads
                as their prompt says (alignment.score)
    CLIP score  clip_score = mean over images of max(100 cos(E_I(image), E_T(prompt)), 0) (Hessel et al. 2021,
                CLIPScore without its rescaling weight), with a registered CLIP; clip_score_real is the same for n
                real held-out images with their own captions: the number a perfect generator would reach

FD-cls for a text model (in :mod:`pipelines.evaluate.quality`) samples with the held-out half's captions as prompts,
as a class model samples with the held-out labels, so the samples' distribution is the reference's.

The CLIP is ``--clip models:/NAME/VERSION``, or by default the one the model's text encoder came from when its
checkpoint names a registered version (``config.json``'s ``text_encoder.source``); when there is none, or it cannot
be found, the CLIP score is skipped and the log says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipelines.errors import UserError
from pipelines.evaluate import alignment


@dataclass
class TextReference:
    """The text side of an evaluation, prepared once per dataset: the reader, the prompts, the CLIP (or why none)
    and its score on real images."""

    reader: alignment.Reader | None  # None: the captions are not in the shapes grammar, alignment is not scored
    prompts: list[str]
    images_per_prompt: int
    clip: object | None = None  # ddpm.clip.LoadedClip
    clip_uri: str | None = None
    clip_note: str = ""         # why there is no CLIP score
    clip_score_real: float | None = None

    def identity(self) -> dict:
        return {"alignment_reader": self.reader.key if self.reader else "none", "alignment_prompts": len(self.prompts),
                "images_per_prompt": self.images_per_prompt, "clip": self.clip_uri or "none"}

    def reader_metrics(self) -> dict[str, float]:
        """The reader's own accuracies per head: ``reader_<head>`` on the real held-out half, ``reader_composition_
        <head>`` on rendered held-out compositions."""
        if self.reader is None:
            return {}
        return ({f"reader_{k}": v for k, v in self.reader.accuracy.items()}
                | {f"reader_composition_{k}": v for k, v in self.reader.held_out_accuracy.items()})


def default_clip(checkpoint_path: str | Path) -> str | None:
    """``models:/NAME/VERSION`` of the CLIP a text model's encoder came from (a whole unCLIP model's own CLIP), when
    its checkpoint names one."""
    from ddpm import checkpoint

    config = checkpoint.read_config(checkpoint_path)
    source = (config.get("text_encoder") or config.get("image_encoder") or {}).get("source") or {}
    if source.get("name") and source.get("version"):
        return f"models:/{source['name']}/{source['version']}"
    return None


def load_clip(uri: str | None, checkpoint_path: str | Path, tracking_uri: str | None, log=print):
    """(LoadedClip or None, the URI used, a note when there is none). A ``uri`` given that does not load is a
    UserError; the default one that does not is a note."""
    from ddpm import clip

    from pipelines.registry import resolve_clip

    given = uri is not None
    uri = uri or default_clip(checkpoint_path)
    if uri is None:
        return None, None, "the model's checkpoint names no registered CLIP (pass --clip models:/NAME/VERSION)"
    try:
        folder = resolve_clip(uri, tracking_uri).path if uri.startswith("models:/") else Path(uri).expanduser()
        return clip.load(folder), uri, ""
    except (UserError, clip.ClipError, OSError) as exc:
        if given:
            raise UserError(f"--clip {uri}: {exc}") from None
        return None, None, f"its text encoder's CLIP {uri} could not be loaded ({exc})"


def prepare_text(real, captions: Sequence[str], fingerprint: str, held_out_rows: np.ndarray, *,
                 images_per_prompt: int = alignment.IMAGES_PER_PROMPT, clip_uri: str | None = None,
                 checkpoint_path: str | Path, tracking_uri: str | None = None, log=print) -> TextReference:
    """The reader (cached or trained), the prompts, the CLIP and its score on the real ``held_out_rows`` with their
    captions. ``real``: a RealData; ``captions`` row-aligned with it; ``fingerprint``: the FD-cls classifier's."""
    if images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    reader = None
    if (alignment.targets(captions) >= 0).any():
        reader = alignment.load_or_train(real, captions, fingerprint, log=log)
    else:
        log("[evaluate] no alignment: the data's captions are not in the shapes grammar (ddpm data shapes), so "
            "there is no reader for them")
    loaded_clip, used, note = load_clip(clip_uri, checkpoint_path, tracking_uri, log)
    text = TextReference(reader, alignment.evaluation_prompts(), images_per_prompt, loaded_clip, used, note)
    if loaded_clip is None:
        log(f"[evaluate] no CLIP score: {note}")
    else:
        rows = np.asarray(held_out_rows)
        text.clip_score_real = clip_score(loaded_clip, real.take(rows), [captions[i] for i in rows])
        log(f"[evaluate] CLIP {used}: real held-out images with their captions score {text.clip_score_real:.2f} "
            f"(n={len(rows)})")
    return text


@torch.no_grad()
def clip_score(loaded_clip, images: np.ndarray, prompts: Sequence[str], batch_size: int = 256) -> float:
    """mean_i max(100 cos(E_I(image_i), E_T(prompt_i)), 0) for images (N, H, W, C) uint8 and N prompts; images of
    another side than the CLIP's are resized to it (bilinear, antialiased)."""
    import torch.nn.functional as F

    from ddpm import from_uint8

    model, tokenizer = loaded_clip
    size, channels = model.config.image_size, model.config.in_channels
    if images.shape[-1] != channels:
        raise UserError(f"the CLIP reads {channels}-channel images, these have {images.shape[-1]}")
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i:i + batch_size]).to(device)  # (B, C, H, W) in [-1, 1]
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        cos = (model.encode_image(x) * model.encode_text(tokenizer.tokenize(prompts[i:i + batch_size]).to(device))
               ).sum(-1)  # (B,): both unit norm
        scores.append((100 * cos).clamp(min=0).cpu())
    return float(torch.cat(scores).mean()) if scores else float("nan")


def prompt_rows(text: TextReference, seed: int) -> tuple[list[str], list[int]]:
    """(prompt of each image, seed of each image): image k N + j is prompt k's j-th, from seed (K + j) mod 2^32."""
    from ddpm import image_seeds

    n = text.images_per_prompt
    return [p for p in text.prompts for _ in range(n)], image_seeds(seed, n) * len(text.prompts)


def text_metrics(loaded, text: TextReference, settings, *, batch_size: int = 128, log=print) -> tuple[dict, np.ndarray]:
    """(alignment and CLIP metrics, the images (P N, H, W, C) uint8) of ``loaded`` (a text LoadedModel) under
    ``settings`` (an EvalSettings: sampler, steps, guidance_scale, seed), through the core's one generation path."""
    from ddpm import generate_images

    if text.reader is None and text.clip is None:
        return {}, np.zeros((0, *loaded.image_shape[1:], loaded.image_shape[0]), np.uint8)
    prompts, seeds = prompt_rows(text, settings.seed)
    images = generate_images(loaded, seeds, condition=loaded.condition(len(prompts), prompts=prompts),
                             sampler=settings.sampler, steps=settings.steps, guidance_scale=settings.guidance_scale,
                             batch_size=batch_size)
    metrics = alignment.score(text.reader, images, prompts) if text.reader is not None else {}
    if text.clip is not None:
        metrics["clip_score"] = clip_score(text.clip, images, prompts)
        metrics["clip_score_real"] = text.clip_score_real
    metrics |= text.reader_metrics()
    log(f"[evaluate] alignment over {len(text.prompts)} prompts x {text.images_per_prompt} images: "
        + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("align_", "clip_score"))))
    return metrics, images
