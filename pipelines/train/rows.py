"""The training rows: one endless order of the dataset's rows that depends on the images seen, never on the number
of workers, so a run that resizes (elastic training) or resumes continues exactly where it stopped.

Position ``i`` of the order is in pass ``p = i // N`` (N rows in the dataset). A pass visits the dataset's blocks in
an order drawn from ``(seed, p)`` and the rows of each block in an order drawn from ``(seed, p, block)``: every row
once per pass, a new order every pass, and nothing but ``i`` decides which row comes at ``i``. A training step
takes positions ``[seen, seen + n)``; rank r of W trains on its contiguous part of them. After a resize from W to W'
workers the next step takes positions from ``seen`` on, as it would have without the resize: no image is repeated
or skipped, except the steps after the last checkpoint, which every restart trains again.

The blocks are the dataset's, in Ray's object store (read once by the driver, spilled to disk if they must be):
a worker fetches a block when a position first needs it (zero-copy from its node's object store) and keeps the few
it is reading. Each node fetches each block once per pass, since the ranks' parts of a step come from the same
stretch of the order; for the datasets this is built for (images at training size, or latents) that is cheap next to
training on them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import ray


@dataclass(frozen=True)
class Blocks:
    """The dataset as Ray object refs to numpy blocks (``{"image": (k, H, W, C) uint8, "label": (k,) int64}``, and
    ``"caption": (k,)`` strings for a text model) and each block's row count: what the driver hands every worker."""

    refs: tuple  # ObjectRef per block
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, dataset) -> "Blocks":
        """From a materialized Ray Dataset with ``image`` and ``label`` (and ``caption``) columns (empty blocks left
        out)."""
        refs = dataset.to_numpy_refs()
        sizes = ray.get([_num_rows.remote(ref) for ref in refs])
        kept = [(ref, size) for ref, size in zip(refs, sizes) if size > 0]
        return cls(tuple(r for r, _ in kept), tuple(s for _, s in kept))

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)


@ray.remote(num_cpus=0)
def _num_rows(block: dict) -> int:
    return len(block["label"])


class Order:
    """Which (block, row) is at each position of the endless order (see the module docstring); no data, no Ray."""

    def __init__(self, sizes: tuple[int, ...], seed: int):
        if not sizes or min(sizes) <= 0:
            raise ValueError("the dataset has no rows")
        self.sizes, self.seed, self.num_rows = np.asarray(sizes), seed, int(sum(sizes))
        self._pass: int | None = None
        self._row_orders: dict[int, np.ndarray] = {}

    def _enter(self, p: int) -> None:
        """Draw pass p's block order; row orders are drawn as their blocks are reached."""
        if self._pass != p:
            self._pass, self._row_orders = p, {}
            self._blocks = np.random.default_rng([self.seed, p]).permutation(len(self.sizes))
            self._ends = np.cumsum(self.sizes[self._blocks])  # position within the pass where each block ends

    def _rows_of(self, block: int) -> np.ndarray:
        if block not in self._row_orders:
            rng = np.random.default_rng([self.seed, self._pass, block])
            self._row_orders[block] = rng.permutation(int(self.sizes[block]))
        return self._row_orders[block]

    def at(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Positions ``[start, start + count)`` as runs of (block, row indices), in order."""
        runs = []
        while count > 0:
            p, q = divmod(start, self.num_rows)
            self._enter(p)
            k = int(np.searchsorted(self._ends, q, side="right"))  # the block holding position q of the pass
            block, begin = int(self._blocks[k]), int(self._ends[k] - self.sizes[self._blocks[k]])
            take = min(count, int(self._ends[k]) - q)
            runs.append((block, self._rows_of(block)[q - begin:q - begin + take]))
            start, count = start + take, count - take
        return runs


class Rows:
    """A worker's access to the order: ``take(start, n)`` is positions ``[start, start + n)`` as arrays."""

    KEEP_BLOCKS = 4  # blocks held at once: a step's part spans one or two

    def __init__(self, blocks: Blocks, seed: int):
        self.blocks, self.order = blocks, Order(blocks.sizes, seed)
        self._held: OrderedDict[int, dict] = OrderedDict()

    def _block(self, index: int) -> dict:
        if index in self._held:
            self._held.move_to_end(index)
        else:
            self._held[index] = ray.get(self.blocks.refs[index])  # read-only arrays in the object store
            if len(self._held) > self.KEEP_BLOCKS:
                self._held.popitem(last=False)
        return self._held[index]

    def take(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W, C) uint8 images and (n,) int64 labels at positions ``[start, start + n)`` (fresh arrays)."""
        images, labels = [], []
        for block, rows in self.order.at(start, n):
            data = self._block(block)
            images.append(data["image"][rows])  # fancy indexing copies: the step may write to them
            labels.append(data["label"][rows])
        return np.concatenate(images), np.concatenate(labels)

    def captions(self, start: int, n: int) -> list[str]:
        """The captions at positions ``[start, start + n)``, the rows :meth:`take` gives for the same positions."""
        captions = []
        for block, rows in self.order.at(start, n):
            captions.extend(str(c) for c in self._block(block)["caption"][rows])
        return captions
