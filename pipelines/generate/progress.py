"""The progress line that generation prints on stderr: done/total, images/s and the time left."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """``progress(done)`` for ``ddpm.generate_images`` and the batch job: a line on stderr at most every ``every_s``
    seconds, with the rate and the time left, and one at the end.

    ``already``: images that were done before this run started (a resumed batch job); they count towards done/total
    but not towards the rate, which is this run's own.
    """

    def __init__(self, total: int, every_s: float = 5.0, already: int = 0, what: str = "generated"):
        self.total, self.every_s, self.already, self.what = total, every_s, already, what
        self.started = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        """This run's images per second so far."""
        return (done - self.already) / max(time.monotonic() - self.started, 1e-9)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = self.rate(done)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"{self.what} {done:,}/{self.total:,} images ({rate:.1f} images/s, {left:.0f} s left)", file=sys.stderr)
