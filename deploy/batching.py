"""Merging the batches that queued while the previous one ran (plain asyncio: no Ray, tested without it).

``@serve.batch`` gathers concurrent requests into batches, but in Ray 2.60 it closes each batch
``batch_wait_timeout_s`` after its first request even while the previous batch is still running. Under load that
makes a row of small batches waiting their turn, and with a fixed forward size a small batch costs as much as a full
one. So the Sampler deployment (``deploy.sampler``) hands its batches to a :class:`MergingRunner` instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from deploy.engine import Outcome, Queued


def count_images(items: list[Queued]) -> int:
    """The size of a batch: images, not requests (a request carries up to 64)."""
    return sum(item.job.num_images for item in items)


class MergingRunner:
    """Runs batches one at a time and merges every batch that queued up while the previous one ran: the next run
    starts the moment the last one ends, with everything that waited meanwhile (whole batches, in arrival order, up
    to ``max_images``)."""

    def __init__(self, run: Callable[[list[Queued]], Awaitable[list[Outcome]]], max_images: int):
        self.run = run
        self.max_images = max_images
        self._waiting: deque[tuple[list[Queued], asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def submit(self, batch: list[Queued]) -> list[Outcome]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            taken, images = [], 0
            while self._waiting:
                batch, future = self._waiting[0]
                if future.done():  # cancelled: its client went away while it waited
                    self._waiting.popleft()
                    continue
                if taken and images + count_images(batch) > self.max_images:
                    break
                taken.append(self._waiting.popleft())
                images += count_images(batch)
            if not taken:
                return
            try:
                outcomes = await self.run([item for batch, _ in taken for item in batch])
            except Exception as exc:  # a failed run fails its own requests, not the runner
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for batch, future in taken:
                if not future.done():
                    future.set_result(outcomes[start:start + len(batch)])
                start += len(batch)
