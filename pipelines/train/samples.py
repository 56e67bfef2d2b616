"""Sample grids for watching a model learn: fixed seeds, one row per class (per caption, per image), through the core's one
seeds -> images path (:func:`ddpm.generate_images`), so grids from different points of training show the same
noise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ddpm import from_labels, generate_images, make_grid
from ddpm.checkpoint import LoadedModel

CAPTION_BAND = 12  # pixels under each row of a text model's grid, for its caption (Pillow's default font is ~11 px)


def sample_grid(loaded: LoadedModel, *, rows: int, columns: int, steps: int, first_seed: int = 0,
                captions: Sequence[str] = (), images: np.ndarray | None = None,
                guidance_scale: float = 1.0) -> np.ndarray:
    """A (rows*(H+1)+1, columns*(W+1)+1, C) uint8 grid of DDIM samples; image i comes from seed first_seed + i.

    A class-conditional model draws row r as class r (``rows`` should then be at most its number of classes). A
    text model draws row r from ``captions[r]`` (``rows`` = len(captions)), each row followed by a band with its
    caption written in it (``CAPTION_BAND`` pixels more per row). unCLIP's decoder draws row r as variations of
    ``images[r]`` ((rows, H, W, C) uint8), which opens its row (one column more), and reads ``captions[r]`` too if
    it is a text decoder.
    """
    seeds = [first_seed + i for i in range(rows * columns)]
    per_row = lambda values: [v for v in values for _ in range(columns)]  # noqa: E731 (row r's value, columns times)
    text = loaded.text_encoder is not None
    if text and len(captions) != rows:
        raise ValueError(f"a text model's grid needs one caption per row: {rows} rows, {len(captions)} captions")
    if loaded.image_encoder is not None:
        if images is None or len(images) != rows:
            raise ValueError(f"a decoder's grid needs one image per row: {rows} rows, "
                             f"{0 if images is None else len(images)} images")
        condition = loaded.condition(len(seeds), images=np.repeat(images, columns, axis=0),
                                     prompts=per_row(captions) if text else None)
    elif text:
        condition = loaded.condition(len(seeds), prompts=per_row(captions))
    else:
        labels = np.arange(rows).repeat(columns) if loaded.config.num_classes else None  # (rows * columns,)
        condition = from_labels(labels, len(seeds))
    out = generate_images(loaded, seeds, condition=condition, sampler="ddim", steps=steps,
                          guidance_scale=guidance_scale)  # (N, H, W, C)
    if loaded.image_encoder is not None:  # each row opens with the image it varies
        out = np.concatenate([images[:, None], out.reshape(rows, columns, *out.shape[1:])], axis=1)
        out, columns = out.reshape(-1, *out.shape[2:]), columns + 1
    if not text:
        return make_grid(out, ncols=columns)
    strips = [np.concatenate([make_grid(out[r * columns:(r + 1) * columns], ncols=columns)[:-1],
                              _caption_band(caption, columns * (out.shape[2] + 1) + 1, out.shape[3])])
              for r, caption in enumerate(captions)]
    return np.concatenate(strips + [np.zeros((1, *strips[0].shape[1:]), np.uint8)])  # the grid's last pad row


def _caption_band(caption: str, width: int, channels: int) -> np.ndarray:
    """(CAPTION_BAND, width, channels) uint8: ``caption`` in white on black, cut at the band's right edge."""
    from PIL import Image, ImageDraw

    band = Image.new("L", (width, CAPTION_BAND))
    ImageDraw.Draw(band).text((2, 0), caption, fill=255)
    return np.repeat(np.asarray(band)[:, :, None], channels, axis=2)
