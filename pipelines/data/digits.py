"""scikit-learn's digits as image files, and the image writer that ``ddpm data`` (``pipelines/commands/data.py``) uses.

The layout is the common one for labelled images, one folder per class::

    OUTPUT/0/0000.png  OUTPUT/1/0001.png  ...  OUTPUT/9/1796.png

so a quick start, a demo or a test exercises the same path as a user's own bucket of photos. The digits ship inside
scikit-learn (1,797 images, 8x8, grey levels 0..16): nothing is downloaded.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipelines import storage

# file extension -> Pillow's format name
FORMATS = {"png": "PNG", "jpeg": "JPEG"}

# Object stores answer each PUT after a round trip; this many in flight hides the latency of small objects.
_WRITERS = 16


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (N, 8, 8) uint8 and labels (N,) int64, N = 1,797.

    The originals hold grey levels 0..16; scaling by 255/16 and rounding keeps all 17 levels distinct and matches
    how ``ddpm train-local`` reads the same data.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return images, d.target.astype(np.int64)


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """(H, W) or (H, W, 3) uint8 -> the bytes of a PNG or a JPEG file (JPEG at quality 95)."""
    from PIL import Image

    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "jpeg" else {}
    Image.fromarray(image).save(buf, format=FORMATS[fmt], **options)
    return buf.getvalue()


def write_images(
    output_uri: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    fmt: str = "png",
    first_index: int = 0,
    endpoint_url: str | None = None,
) -> list[str]:
    """Write images (N, H, W[, 3]) uint8 as ``OUTPUT/<label>/<index>.<fmt>``; returns the keys written.

    A label is a class id or a folder name (``pipelines.data.photos``). Indices count from ``first_index``, so several
    calls (say, one per format) can fill one folder without clashes.
    """
    keys = [f"{label if isinstance(label, str) else int(label)}/{first_index + i:04d}.{fmt}"
            for i, label in enumerate(labels)]

    def put(i: int) -> None:
        storage.write_bytes(storage.join(output_uri, keys[i]), encode(images[i], fmt), endpoint_url)

    with ThreadPoolExecutor(_WRITERS) as pool:
        list(pool.map(put, range(len(keys))))
    return keys


def write_digits(
    output_uri: str, *, fmt: str = "png", limit: int | None = None, endpoint_url: str | None = None
) -> int:
    """Write the first ``limit`` digits (all 1,797 by default) under ``output_uri``; returns how many."""
    images, labels = digits()
    write_images(output_uri, images[:limit], labels[:limit], fmt=fmt, endpoint_url=endpoint_url)
    return len(images[:limit])
