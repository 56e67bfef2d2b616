"""Encoder actors of ``ddpm encode``: uint8 images -> an autoencoder's latents, one Parquet shard per piece.

Each actor loads the autoencoder once (from the object store: ``pipelines.actors``), then per piece of a source
shard: read its rows -> uint8 (B, H, W, C) -> [-1, 1] -> encoder in chunks of exactly ``forward_rows`` rows (the
last one padded) -> latents (B, h, w, c) float32 channels last -> one Parquet shard, written whole (one PUT, or a
rename on a local disk). Only a small summary row goes back to the driver.

Exactness: the encoder always runs on ``forward_rows`` rows at a time (``ddpm.fixed_size_forward``'s idea), so an
image's latent does not depend on which other images shared its batch, its actor, or the number of actors: it is,
bit for bit, what a single-process loop of the same chunk size and thread count gives (tests/pipelines/
test_encode.py).

Shard columns: ``image`` fixed_size_binary(h*w*c*4), the latent as float32 in row-major (h, w, c) order; ``label``
int64, ``key`` and ``sha256`` strings, and a captioned dataset's ``caption``, copied from the source row (the
mirrored copy of ``--flip`` has key + "#flip" and the same caption).
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.actors import get_payload, setup_torch, unpacked

FLIP_SUFFIX = "#flip"


def encode_fixed(ae, images: np.ndarray, rows: int, mirror: bool = False):
    """``ae.encode`` of uint8 images (B, H, W, C), always ``rows`` images per call, the last chunk zero-padded:
    (B, h, w, c) float32 latents, channels last, each independent of its batch-mates. ``mirror``: of the images'
    left-right mirrors. One chunk at a time is converted to float, so memory stays at the uint8 input plus the
    latents."""
    import torch

    from ddpm import from_uint8

    device = next(ae.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), rows):
            x = from_uint8(images[start:start + rows]).to(device)  # (n, C, H, W) in [-1, 1]
            if mirror:
                x = x.flip(-1)  # along W
            chunk = x.new_zeros((rows, *x.shape[1:]))  # (rows, C, H, W): a fresh buffer of the same shape every call
            chunk[:len(x)] = x
            z = ae.encode(chunk)[:len(x)]  # (n, c, h, w)
            out.append(z.permute(0, 2, 3, 1).float().cpu().numpy())  # (n, h, w, c)
    return np.ascontiguousarray(np.concatenate(out))


def encode_images(ae, images: np.ndarray, rows: int, flip: bool = False) -> np.ndarray:
    """uint8 images (B, H, W, C) -> latents (B, h, w, c) float32, channels last; with ``flip`` (2B, h, w, c): the
    images' latents, then their left-right mirrors'."""
    latents = encode_fixed(ae, images, rows)
    if flip:
        latents = np.concatenate([latents, encode_fixed(ae, images, rows, mirror=True)])
    return latents


def shard_bytes(latents: np.ndarray, labels: np.ndarray, keys: list[str], digests: list[str],
                captions: list[str] | None = None) -> bytes:
    """One shard as Parquet bytes: image (float32 h*w*c, row-major), label, key, sha256[, caption]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, h, w, c = latents.shape
    image_type = pa.binary(h * w * c * 4)
    data = np.ascontiguousarray(latents, dtype="<f4")
    arrays = [pa.FixedSizeBinaryArray.from_buffers(image_type, n, [None, pa.py_buffer(data)]),
              pa.array(labels, pa.int64()), pa.array(keys, pa.string()), pa.array(digests, pa.string())]
    schema = [pa.field("image", image_type, nullable=False), pa.field("label", pa.int64(), False),
              pa.field("key", pa.string(), False), pa.field("sha256", pa.string(), False)]
    if captions is not None:
        arrays.append(pa.array(captions, pa.string()))
        schema.append(pa.field("caption", pa.string(), False))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(schema))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class LatentEncoder:
    """Ray Data callable class: loads the autoencoder once per actor, then turns each batch of source rows into one
    latent shard under the generation folder and returns its summary."""

    def __init__(self, payload, data_uri: str, pixel_shape, generation: str, output_uri: str,
                 endpoint_url: str | None, forward_rows: int, flip: bool, threads: int, use_gpu: bool,
                 captioned: bool = False):
        from ddpm import autoencoder

        device = setup_torch(threads, use_gpu)
        with unpacked(get_payload(payload), prefix="ddpm-ae-") as folder:
            self.ae = autoencoder.load(folder, device=device)
        self.pixel_shape = tuple(pixel_shape)
        self.data_uri = data_uri
        self._cached: tuple[str, Any] | None = None  # the last source shard read: pieces of one often follow
        self.generation, self.output_uri, self.endpoint_url = generation, output_uri, endpoint_url
        self.forward_rows, self.flip = forward_rows, flip
        self.columns = ["image", "label", "key", "sha256"] + (["caption"] if captioned else [])

    def _source(self, shard: str):
        """The source shard's rows (a pyarrow Table), read once per run of consecutive pieces of it."""
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != shard:
            self._cached = None  # free the previous one first
            fs, root = storage.filesystem_for(self.data_uri, self.endpoint_url)
            with storage.user_errors(storage.join(self.data_uri, shard), self.endpoint_url):
                table = pq.read_table(f"{root}/{shard}", filesystem=fs, columns=self.columns)
            self._cached = (shard, table)
        return self._cached[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [self.piece(str(s), int(a), int(b)) for s, a, b in zip(batch["shard"], batch["start"], batch["stop"])]
        return {key: np.array([o[key] for o in out], dtype=object if key == "shard" else None) for key in out[0]}

    def piece(self, source_shard: str, start: int, stop: int) -> dict:
        from pipelines.data.dataset import images_from_arrow

        began = time.perf_counter()
        rows = self._source(source_shard).slice(start, stop - start)
        images = images_from_arrow(rows.column("image"), self.pixel_shape, np.uint8)  # (B, H, W, C)
        keys = rows.column("key").to_pylist()
        labels = rows.column("label").to_numpy().astype(np.int64)
        digests = rows.column("sha256").to_pylist()
        captions = rows.column("caption").to_pylist() if "caption" in self.columns else None
        latents = encode_images(self.ae, images, self.forward_rows, self.flip)  # (B or 2B, h, w, c)
        if self.flip:
            keys = keys + [k + FLIP_SUFFIX for k in keys]
            labels, digests = np.concatenate([labels, labels]), digests + digests
            captions = captions + captions if captions is not None else None
        # Named after its rows, so that a retried call overwrites its own shard rather than adding a second one.
        name = hashlib.sha256(f"{keys[0]}\0{len(keys)}".encode()).hexdigest()[:16]
        shard = f"{self.generation}/part-{name}.parquet"
        storage.write_bytes(storage.join(self.output_uri, shard), shard_bytes(latents, labels, keys, digests, captions),
                            self.endpoint_url)
        return {"shard": shard, "rows": len(keys), "images": len(images), "seconds": time.perf_counter() - began}
