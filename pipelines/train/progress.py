"""Training progress a person can follow: one line per progress window, from rank 0, printed by the driver.

::

    [train]  38,400/150,000 images (26%)  472 img/s  loss 0.0412  lr 9.1e-04  1:21 elapsed, 3:39 left (time budget)

Ray Train workers are separate processes (on a cluster, separate machines), and their own output goes to the Ray
session's log files, not to the terminal (``pipelines.ray_utils.init_ray``). So rank 0 sends each line to a small
actor the driver created (:func:`printing`), and a thread in the driver prints it: on a terminal, in a log file or in
a Ray job's log alike, without Ray's ``(RayTrainWorker pid=...)`` prefixes. Rank 0 also prints the line itself, so
it is in the worker's log file too.

Lines come by time, whatever the step rate (:class:`Progress`): the first right after the first step, then one every
``DDPM_PROGRESS_EVERY_S`` seconds (30 by default), the last at the end. On a slow CPU a step takes seconds, and a
line every N steps would leave the screen silent for minutes. MLflow still gets every ``train.log_every_steps``
window, and so do Ray's own metrics (:class:`RayGauges`: ``ray_ddpm_train_*`` on each node's metrics agent, which
Prometheus scrapes on a cluster; deploy/monitoring/prometheus.yml).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import ray

from pipelines.train import ddp

EVERY_ENV = "DDPM_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def clock(seconds: float) -> str:
    """``75`` -> ``1:15``, ``3725`` -> ``1:02:05``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def time_left(seen: int, total: int, rate: float, elapsed_s: float, budget_s: float | None) -> tuple[float, str]:
    """Seconds left and what bounds them: the image count at the current rate, or the time budget if sooner."""
    by_images = (total - seen) / rate if rate > 0 else float("inf")
    if budget_s is not None and budget_s - elapsed_s <= by_images:
        return max(budget_s - elapsed_s, 0.0), "time budget"
    return by_images, "image count"


def format_line(*, seen: int, total: int, rate: float, loss: float, lr: float, elapsed_s: float,
                budget_s: float | None) -> str:
    """One progress line (see the module docstring)."""
    left, bound = time_left(seen, total, rate, elapsed_s, budget_s)
    left_text = clock(left) if left != float("inf") else "?"
    width = len(f"{total:,}")
    return (f"[train] {seen:>{width},}/{total:,} images ({100 * seen / total:3.0f}%)  {rate:,.0f} img/s  "
            f"loss {loss:.4f}  lr {lr:.1e}  {clock(elapsed_s)} elapsed, {left_text} left ({bound})")


class RayGauges:
    """Rank 0's progress as Ray metrics (``ray.util.metrics``), tagged with the run's name: exported by the node's
    metrics agent as ``ray_ddpm_train_images_seen``, ``..._images_per_second``, ``..._loss``,
    ``..._learning_rate``, ``..._time_left_seconds``. Never fails training: without a metrics agent it goes quiet."""

    NAMES = {"images_seen": "Images trained on so far", "images_per_second": "Training throughput, all workers",
             "loss": "Mean loss over the last logging window", "learning_rate": "The learning rate now",
             "time_left_seconds": "Estimated seconds until the run ends"}

    def __init__(self, run: str):
        self.tags = {"run": run}
        try:
            from ray.util.metrics import Gauge

            self.gauges = {k: Gauge(f"ddpm_train_{k}", description=d, tag_keys=("run",))
                           for k, d in self.NAMES.items()}
        except Exception:
            self.gauges = {}

    def set(self, **values: float) -> None:
        for key, v in values.items():
            gauge = self.gauges.get(key)
            if gauge is not None and v == v and abs(v) != float("inf"):  # no NaN or infinity
                try:
                    gauge.set(float(v), tags=self.tags)
                except Exception:
                    self.gauges.pop(key, None)


class Reporter:
    """Rank 0's side: formats the lines :class:`Progress` asks for and sends them to the driver's :class:`_Lines`
    actor; sets the Ray gauges at every logging window."""

    def __init__(self, sink, *, total: int, budget_s: float | None, every_s: float | None = None,
                 run: str = ""):
        self.sink, self.total, self.budget_s = sink, total, budget_s
        self.every_s = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S)) if every_s is None else every_s
        self.last: float | None = None
        self.gauges = RayGauges(run)

    def export(self, *, seen: int, rate: float, loss: float, lr: float, elapsed_s: float) -> None:
        left, _ = time_left(seen, self.total, rate, elapsed_s, self.budget_s)
        self.gauges.set(images_seen=seen, images_per_second=rate, loss=loss, learning_rate=lr,
                        time_left_seconds=left)

    def due(self, finished: bool) -> bool:
        return finished or self.last is None or time.monotonic() - self.last >= self.every_s

    def report(self, *, final: bool = False, **values) -> str:
        """Print and send one line. Lines go fire-and-forget, except the ``final`` one: rank 0 waits (10 s at most)
        until the actor has it, and so every line before it (one caller's actor calls run in order), so that the
        driver's last drain after ``fit()`` finds them all rather than racing them."""
        line = format_line(total=self.total, budget_s=self.budget_s, **values)
        self.last = time.monotonic()
        print(line, flush=True)  # the worker's own log file
        if self.sink is not None:
            try:
                sent = self.sink.put.remote(line)  # a lost line must never stop training
                if final:
                    ray.get(sent, timeout=10)
            except Exception:  # the driver (and its actor) went away, or is slow: training goes on
                self.sink = None
        return line


class Progress:
    """Every rank's side of the progress lines; call :meth:`step` after every training step, on every rank.

    Rank 0's clock decides when a line is due (:meth:`Reporter.due`) and every rank learns it (one number
    broadcast per step), because the line's loss is a sum over the ranks, a collective all of them must join. The
    line's loss is the mean over the rows trained since the last line; its rate counts training steps only
    (:meth:`pause` after sampling or a checkpoint: their time is not a step's).
    """

    def __init__(self, reporter: Reporter | None, world: int, device):
        self.reporter, self.world, self.device = reporter, world, device
        self._reset()
        self.mark = time.perf_counter()

    def _reset(self) -> None:
        self.loss_sum, self.rows, self.images, self.busy_s = 0.0, 0, 0, 0.0

    def pause(self) -> None:
        """Time from now on counts again: what ran since the last step was not training."""
        self.mark = time.perf_counter()

    def step(self, *, loss: float, rows: int, images: int, seen: int, lr: float, elapsed_s: float,
             finished: bool) -> str | None:
        """Count one step (this rank's ``rows`` of the global batch's ``images``, mean ``loss`` over its rows);
        returns the line when one was due (on rank 0)."""
        now = time.perf_counter()
        self.busy_s, self.mark = self.busy_s + now - self.mark, now
        self.loss_sum, self.rows, self.images = self.loss_sum + loss * rows, self.rows + rows, self.images + images
        due = self.reporter is not None and self.reporter.due(finished)
        if not ddp.from_rank0(float(due), self.world, self.device):
            return None
        loss_sum, rows = ddp.sum_over_ranks([self.loss_sum, self.rows], self.world, self.device)
        line = None
        if self.reporter is not None:
            line = self.reporter.report(final=finished, seen=seen, rate=self.images / max(self.busy_s, 1e-9),
                                        loss=loss_sum / max(rows, 1), lr=lr, elapsed_s=elapsed_s)
        self._reset()
        return line


@ray.remote(num_cpus=0, max_restarts=0)
class _Lines:
    """The lines rank 0 sent, until the driver takes them."""

    def __init__(self):
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


@contextlib.contextmanager
def printing(out=None, poll_s: float = 1.0):
    """An actor handle for :class:`Reporter`; a driver thread prints what arrives there until the block ends."""
    out = out or sys.stdout
    sink = _Lines.remote()
    stop = threading.Event()

    def drain() -> None:
        for line in ray.get(sink.take.remote(), timeout=30):
            print(line, file=out, flush=True)

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                drain()
            except Exception:  # a slow or lost actor: progress is a convenience, never a failure
                pass

    thread = threading.Thread(target=loop, name="train-progress", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            drain()
        with contextlib.suppress(Exception):
            ray.kill(sink)


def fit_with_progress(trainer_cls, trainer_args: dict):
    """``trainer_cls(**trainer_args).fit()`` with rank 0's progress lines printed here while it runs (the driver's
    one call into this module: the :class:`WorkerJob` in ``train_loop_config`` gets the sink)."""
    from dataclasses import replace

    with printing() as sink:
        job = trainer_args["train_loop_config"]["job"]
        return trainer_cls(**{**trainer_args, "train_loop_config": replace(job, progress=sink).loop_config()}).fit()
