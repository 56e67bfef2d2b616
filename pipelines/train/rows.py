"""The row stream: exactly the rows a training step needs, cut from a worker's shard of the dataset, pass after
pass."""

from __future__ import annotations

import numpy as np


class RowStream:
    """Exactly ``n`` rows at a time from this worker's shard of the dataset, pass after pass.

    Ray Data hands out batches of its own making and ends each pass over the data; a step needs a given number of
    rows, and a pass rarely divides into steps. So rows are fetched in large chunks (few per pass: Ray Data's cost
    is per batch, not per row), each chunk is put in a new random order (the dataset was shuffled once, when it was
    read; this varies the order from pass to pass), and steps are cut from the chunks, the tail of one pass carrying
    into the next. Every rank takes the same number of rows per step, so the ranks' shards (equal in size,
    ``streaming_split(equal=True)``) run out together and start the next pass together.
    """

    FETCH_BYTES = 4 << 20  # image bytes per chunk, when a step's rows are fewer

    def __init__(self, shard, rows_per_step: int, row_bytes: int, seed: list[int]):
        self._rng = np.random.default_rng(seed)
        self._chunks = self._passes(shard, max(rows_per_step, self.FETCH_BYTES // row_bytes))
        self._images, self._labels, self._offset = None, None, 0

    def _passes(self, shard, rows_per_fetch: int):
        while True:
            empty = True
            for batch in shard.iter_batches(batch_size=rows_per_fetch, batch_format="numpy"):
                empty = False
                order = self._rng.permutation(len(batch["label"]))
                yield batch["image"][order], batch["label"][order]  # (k, H, W, C) uint8, (k,) int64: fresh arrays
            if empty:
                raise RuntimeError("this worker's shard of the dataset is empty: use fewer workers than images")

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W, C) uint8 images and (n,) int64 labels (views of fresh, writable arrays)."""
        images, labels = [], []
        while n > 0:
            if self._labels is None or self._offset == len(self._labels):
                (self._images, self._labels), self._offset = next(self._chunks), 0
            k = min(n, len(self._labels) - self._offset)
            images.append(self._images[self._offset:self._offset + k])
            labels.append(self._labels[self._offset:self._offset + k])
            self._offset, n = self._offset + k, n - k
        if len(labels) == 1:
            return images[0], labels[0]
        return np.concatenate(images), np.concatenate(labels)
