"""Tensor <-> image conversions, and reading the image + mask pair of an edit (inpainting).

Pillow is imported inside the functions that encode or decode, so importing the core needs PyTorch + NumPy only.
"""

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


# -- decoding: what ``ddpm inpaint`` and ``POST /inpaint`` read ----------------------------------------------------
# Formats Pillow may open here: what an image editor saves, and no plugin that runs an external program (EPS).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class EditInputError(ValueError):
    """An image or mask that cannot be edited; ``field`` names which ("image" or "mask")."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def to_mode(img, mode: str):
    """A PIL image converted to ``mode`` (L or RGB) without the two silent losses of a bare ``convert``.

    16-bit grey would be clipped at 255 (almost all white), so its top 8 bits are kept instead; transparent pixels
    would show whatever colour they happen to store, so transparency is flattened onto white, as a viewer shows it.
    """
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16L", "I;16B"):
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == mode else img.convert(mode)


def decode_image(data: bytes, mode: str, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> (H, W, C) uint8 in ``mode`` ("L": C = 1, "RGB": C = 3).

    Raises ValueError for bytes Pillow cannot decode and, before decoding, for more than ``max_pixels`` pixels.
    """
    import io

    from PIL import Image

    # Pillow's decoders answer damaged or hostile bytes with many exception types (OSError, SyntaxError, ValueError,
    # EOFError, struct.error, DecompressionBombError, IndexError, ...): each of them means "not a readable image".
    def unreadable(exc: Exception) -> ValueError:
        return ValueError(f"not a readable image ({(str(exc) or type(exc).__name__).splitlines()[0]})")

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.UnidentifiedImageError:
        raise ValueError("not a PNG, JPEG, WebP, BMP or GIF image") from None
    except Exception as exc:
        raise unreadable(exc) from None
    with img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ValueError(f"the image is {img.width}x{img.height}: more than the {max_pixels:,} pixels allowed")
        try:
            img.load()
            pixels = np.array(to_mode(img, mode), dtype=np.uint8)  # (H, W) or (H, W, 3), a writable copy
        except Exception as exc:
            raise unreadable(exc) from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def _stretch(pixels: np.ndarray, size: int, resample) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C), with PIL's ``resample`` filter."""
    from PIL import Image

    channels = pixels.shape[2]
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels).resize((size, size), resample)
    return np.array(img, dtype=np.uint8).reshape(size, size, channels)


def decode_edit_inputs(image: bytes, mask: bytes | None, *, size: int, channels: int, resize: bool = False,
                       resize_hint: str = "", max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask of an edit, checked against each other and against a ``size`` x ``size`` model.

    image: encoded bytes, converted to the model's ``channels`` (1 grey, 3 RGB; transparency onto white).
    mask: encoded bytes of the same size, black (0) = keep and white (255) = generate, no other grey level, some white;
    None: the whole image (an edit of all of it).
    resize: stretch both to the model's size (image LANCZOS, mask nearest-neighbour so it stays black and white)
    instead of rejecting another size; ``resize_hint`` is appended to that rejection (how to ask for a resize).

    Returns (image (size, size, C) uint8, generate (size, size) bool). Raises :class:`EditInputError` naming the
    input at fault. ``ddpm.inpaint`` takes them as ``from_uint8(image[None])`` and ``generate[None, None]``.
    """
    from PIL import Image

    def read(field: str, data: bytes, mode: str) -> np.ndarray:
        try:
            return decode_image(data, mode, max_pixels)
        except ValueError as exc:
            raise EditInputError(field, str(exc)) from None

    pixels = read("image", image, "L" if channels == 1 else "RGB")  # (H, W, C)
    generate = np.ones(pixels.shape[:2], dtype=bool)  # (H, W): no mask edits the whole image
    if mask is not None:
        levels = read("mask", mask, "L")[..., 0]  # (H, W)
        other = np.unique(levels[(levels != 0) & (levels != 255)])
        if other.size:
            raise EditInputError("mask", f"the mask must be black (0 = keep) and white (255 = generate) only; found "
                                         f"{other.size} other grey level{'s' if other.size > 1 else ''} "
                                         f"(e.g. {int(other[0])})")
        generate = levels == 255  # (H, W)
        if not generate.any():
            raise EditInputError("mask", "the mask is all black, so there is nothing to generate (white = generate)")
    (h, w), (mh, mw) = pixels.shape[:2], generate.shape
    if (mh, mw) != (h, w):
        raise EditInputError("mask", f"the mask is {mw}x{mh} but the image is {w}x{h}; they must match")
    if (h, w) != (size, size):
        if not resize:
            hint = f" ({resize_hint})" if resize_hint else ""
            raise EditInputError("image", f"the image is {w}x{h} but the model expects {size}x{size}{hint}")
        pixels = _stretch(pixels, size, Image.Resampling.LANCZOS)
        generate = _stretch(generate[..., None].astype(np.uint8) * 255, size, Image.Resampling.NEAREST)[..., 0] == 255
        if not generate.any():
            raise EditInputError("mask", f"no white pixel is left after resizing the mask to {size}x{size}")
    return pixels, generate
