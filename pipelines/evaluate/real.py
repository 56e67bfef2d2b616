"""The real images an evaluation compares samples with: a preprocessed dataset (or ``digits``), in memory for small
n, or read a shard at a time so that the driver of an evaluation at scale never holds the whole dataset.

``digits`` is scikit-learn's digits exactly as ``ddpm train-local`` trains on them (at the model's resolution), so a
locally trained model is compared with the very images it learned from.

:class:`RealData` is the streamed view: the manifest's shards, each shard's first row (from its ``label`` column, the
only column the driver reads whole), and readers that return one shard's images, a few rows, or the blocks that
feature actors map. Row ``i`` is the ``i``-th row in shard order, as in :func:`load_data`, so both views number the
images alike and the classifier's split (:func:`pipelines.evaluate.classifier.split`) means the same rows in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.errors import UserError

MEMORY_SHARD = 1024  # rows per "shard" of a dataset held in memory (digits): the feature actors' block size


def _manifest(data: str) -> dict:
    from pipelines.data.dataset import is_latent, read_manifest

    manifest = read_manifest(data)
    if is_latent(manifest):
        raise UserError(f"{data} holds latents (ddpm encode); evaluate against the images they were encoded from, "
                        f"{manifest['source']['uri']}")
    return manifest


def _digits(resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
    from ddpm import to_uint8
    from pipelines.train.local import digits_dataset

    x, y = digits_dataset(resolution or 16)
    return to_uint8(x), y.numpy()


def load_data(data: str, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) uint8, labels (N,)) in memory, from a preprocessed dataset URI or ``digits``."""
    if data == "digits":
        return _digits(resolution)
    from pipelines.data.dataset import load_numpy

    _manifest(data)
    return load_numpy(data)


@dataclass(frozen=True, eq=False)
class RealData:
    """A dataset read shard by shard. Shard ``s`` holds rows ``offsets[s]:offsets[s + 1]``.

    ``memory`` holds the images of a dataset small enough to travel whole (``digits``), cut into
    :data:`MEMORY_SHARD`-row shards; otherwise each read goes to the shard's Parquet file, on whichever machine
    (driver or actor) asks.
    """

    uri: str
    image_shape: tuple          # (H, W, C)
    shards: tuple               # shard paths relative to ``uri`` (empty for a dataset in memory)
    offsets: np.ndarray         # (S + 1,) first row of each shard, then N
    labels: np.ndarray          # (N,) int64
    memory: np.ndarray | None = None  # (N, H, W, C) uint8, only for a dataset in memory

    @classmethod
    def open(cls, data: str, resolution: int | None = None) -> "RealData":
        """The manifest and the labels (8 bytes a row); no pixels are read."""
        if data == "digits":
            images, labels = _digits(resolution)
            return cls.in_memory(images, labels, uri=data)
        from pipelines.data.dataset import read_columns

        manifest = _manifest(data)
        shards = tuple(manifest["shards"])
        labels = [read_columns(data, [s], ["label"], None).column("label").to_numpy() for s in shards]
        offsets = np.cumsum([0] + [len(part) for part in labels])
        return cls(data, tuple(manifest["image_shape"]), shards, offsets,
                   np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64))

    @classmethod
    def in_memory(cls, images: np.ndarray, labels: np.ndarray, uri: str = "memory") -> "RealData":
        offsets = np.append(np.arange(0, len(images), MEMORY_SHARD), len(images))
        return cls(uri, tuple(images.shape[1:]), (), offsets, np.asarray(labels, np.int64), images)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    def read_shard(self, s: int) -> np.ndarray:
        """Shard ``s``'s images, (n_s, H, W, C) uint8: a view of the shard's Parquet column (or of ``memory``)."""
        if self.memory is not None:
            return self.memory[self.offsets[s]:self.offsets[s + 1]]
        from pipelines.data.dataset import images_from_arrow, read_columns

        column = read_columns(self.uri, [self.shards[s]], ["image"], None).column("image")
        images = images_from_arrow(column, self.image_shape)
        if len(images) != self.offsets[s + 1] - self.offsets[s]:
            raise UserError(f"{self.uri}: shard {self.shards[s]} changed while it was read "
                            f"({len(images)} rows, {self.offsets[s + 1] - self.offsets[s]} before)")
        return images

    def shard_parts(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
        """``rows`` (sorted, increasing) cut by shard: (shard, rows within it, position of its first in ``rows``)."""
        rows = np.asarray(rows, np.int64)
        cuts = np.searchsorted(rows, self.offsets)  # rows[cuts[s]:cuts[s + 1]] lie in shard s
        return [(s, rows[cuts[s]:cuts[s + 1]] - self.offsets[s], int(cuts[s]))
                for s in range(self.num_shards) if cuts[s + 1] > cuts[s]]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Images of ``rows`` (sorted), (len(rows), H, W, C) uint8: one shard in memory at a time, plus the result."""
        out = np.empty((len(rows), *self.image_shape), np.uint8)
        for s, local, first in self.shard_parts(rows):
            out[first:first + len(local)] = self.read_shard(s)[local]
        return out

    def fingerprint(self) -> str:
        """:func:`pipelines.evaluate.classifier.fingerprint` of (all images, labels), hashed a shard at a time."""
        from pipelines.evaluate.classifier import fingerprint_parts

        return fingerprint_parts((len(self), *self.image_shape), (self.read_shard(s) for s in range(self.num_shards)),
                                 self.labels)
