"""Helpers of the reliability suite: plain functions and classes, imported as ``tests.reliability.support``.

An S3 endpoint that can be killed and brought back (:class:`S3Endpoint`), the tiny training command every training
fault runs (:func:`train_args`), ways to find its workers and its MLflow run, and one bounded poll (:func:`wait_for`).
The fixtures built on them live in this folder's ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.support import S3_PORT, free_port

from pipelines import cli

T = TypeVar("T")
RELAY = Path(__file__).with_name("relay.py")
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy, at most ``timeout`` seconds; returns that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def run_cli_beside(fault: Callable[[], None], args: list[str]) -> int:
    """``ddpm ARGS`` in this process while ``fault`` runs in a thread beside it; the exit code, once both are done."""
    thread = threading.Thread(target=fault)
    thread.start()
    try:
        return cli.main(args)
    finally:
        thread.join()


def train_args(data: str, storage: str, name: str, tracking_uri: str, *, total: int, every: int,
               workers: int = 2, max_failures: int = 1, experiment: str = "reliability") -> list[str]:
    """``ddpm train`` on the tiny 8x8 U-Net, batch 16: a log point every 2 steps, a checkpoint every ``every``.

    One CPU (one thread) per worker: on a busy two-core machine a two-thread convolution stalls at its barrier.
    """
    return [
        "train", "--data", data, "--config", CONFIG,
        "--set", "model.preset=tiny", "--set", "train.batch_size=16", "--set", "train.warmup_images=32",
        "--set", "train.log_every_steps=2", "--set", f"train.total_images={total}",
        "--set", f"train.checkpoint_every_images={every}", "--set", f"train.sample_every_images={total}",
        "--set", f"train.max_failures={max_failures}",
        "--num-workers", str(workers), "--cpus-per-worker", "1", "--storage", storage, "--name", name,
        "--tracking-uri", tracking_uri, "--experiment", experiment,
    ]


def train_worker_pids() -> list[int]:
    """The pids of the live Ray Train workers, from the GCS actor table (no dashboard needed)."""
    import ray._private.state

    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def log_steps(total_images: int) -> set[int]:
    """The steps at which a :func:`train_args` run logs metrics: every second one, and the last."""
    steps = -(-total_images // 16)
    return set(range(2, steps, 2)) | {steps}


def run_named(client, name: str, experiment: str = "reliability"):
    """The MLflow run of the training run ``name`` (None until the driver has opened it)."""
    from pipelines import tracking

    runs = client.search_runs([tracking.ensure_experiment(experiment, client.tracking_uri)],
                              f"tags.`ddpm.run_name` = '{name}'")
    return runs[0] if runs else None


class S3Endpoint:
    """An S3 endpoint on 127.0.0.1 in its own process, in front of the session's moto server (see ``relay.py``).

    ``kill()`` SIGKILLs the process: new connections are refused and open ones reset, which is what a client sees
    when the store's endpoint dies. ``start()`` brings it back on the same port. The objects live in moto behind it,
    so what was written before the outage can be checked after it, through the session's own endpoint (``S3_PORT``).
    """

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(RELAY), str(self.port), str(S3_PORT)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"  # listening: connections from now on are relayed

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc.stdout.close()
            self.proc = None
