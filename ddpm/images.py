"""Tensor <-> image conversions (no image codecs here: the core stays PyTorch + NumPy)."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images into one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 image."""
    b, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(b)))
    nrows = int(np.ceil(b / ncols))
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} -> PNG bytes. Pillow is imported here only, when an image is written."""
    import io

    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W, 1|3) uint8, got {image.shape} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()
