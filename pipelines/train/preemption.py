"""Graceful preemption: a SIGTERM to a training worker (a spot instance's notice, a Kubernetes pod's termination)
asks for a checkpoint at the next step boundary instead of ending the process mid-step.

Without this, Ray's worker exits at once on SIGTERM and the run restarts from its last periodic checkpoint: every
image since then is trained twice. With it, the worker that got the signal finishes its step, every rank learns of
the request in the step's closing all-reduce (:func:`signalled_rank`), all ranks write a checkpoint of exactly
the images seen and raise :class:`Preempted`; Ray Train ends the worker group, its processes with it, and starts
the next one (smaller, under elastic training, if the node has gone) from that checkpoint. If the checkpoint is not
written within ``GRACE_S`` seconds, the signalled worker exits through Ray's own handler anyway.

Python runs signal handlers in the main thread, and only the main thread may install one; Ray Train runs the
training function in a thread of its worker actor and keeps the actor's main thread free for its calls, so the
handler is installed through the actor's own ``execute`` call (:func:`handling_sigterm`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import torch

GRACE_S = float(os.environ.get("DDPM_PREEMPT_GRACE_S", "60"))

_requested = threading.Event()  # a SIGTERM arrived while a training loop listened
_done = threading.Event()  # the checkpoint it asked for is written: the next SIGTERM ends the process
_previous = {}  # the handler this module replaced (Ray's), per process


def _on_sigterm(signum, frame) -> None:
    """First SIGTERM while training: note it (the loop checkpoints); later ones, or after the checkpoint: Ray's."""
    if _requested.is_set() or _done.is_set():
        handler = _previous.get("handler")
        signal.signal(signal.SIGTERM, handler if callable(handler) else signal.SIG_DFL)
        if callable(handler):
            handler(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
        return
    _requested.set()
    print(f"SIGTERM: a checkpoint at the next step boundary, then this worker exits (at most {GRACE_S:g} s)",
          flush=True)
    timer = threading.Timer(GRACE_S, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()


def _install() -> bool:
    """Runs in the worker actor's main thread (:func:`handling_sigterm`)."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _previous["handler"] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    _requested.clear()
    _done.clear()
    return True


def _uninstall() -> None:
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, _previous.get("handler") or signal.SIG_DFL)


@contextlib.contextmanager
def handling_sigterm():
    """While the block runs, a SIGTERM to this Ray Train worker asks for a checkpoint (:func:`signalled_rank` tells
    every rank at the next step). Yields whether the handler
    is in place (it is not outside a Ray actor, or if Ray's worker actor stops offering ``execute``: training then
    goes on, and SIGTERM ends the worker as before)."""
    import ray

    actor = None
    try:
        actor = ray.get_runtime_context().current_actor
        installed = ray.get(actor.execute.remote(_install), timeout=30)
    except Exception as exc:  # noqa: BLE001 - graceful preemption is an improvement, never a reason to fail
        print(f"SIGTERM handler not installed ({type(exc).__name__}); a SIGTERM ends this worker at once",
              flush=True)
        installed = False
    try:
        yield installed
    finally:
        if installed and not _requested.is_set():
            with contextlib.suppress(Exception):
                ray.get(actor.execute.remote(_uninstall), timeout=30)


class Preempted(RuntimeError):
    """Raised on every rank once the checkpoint a SIGTERM asked for is written: Ray Train restarts the group from it
    (one of ``train.max_failures``)."""


def signalled_rank(rank: int, world: int, device) -> int | None:
    """The highest rank that got a SIGTERM, or None: every rank calls this after the same step (a one-number
    all-reduce)."""
    flag = rank + 1.0 if _requested.is_set() else 0.0
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([flag], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = t.item()
    return int(flag) - 1 if flag > 0 else None


def checkpoint_written() -> None:
    """The requested checkpoint is in storage. The loop then raises :class:`Preempted` on every rank, and Ray
    Train's controller ends this worker group (its processes with it) and starts the next one; another SIGTERM
    meanwhile goes to Ray's own handler."""
    if _requested.is_set():
        _done.set()
        _requested.clear()


def stop_local_workers(wait_s: float = 60.0) -> tuple[list[int], float, float]:
    """SIGTERM every Ray Train worker process on this machine and wait (at most ``wait_s``) until they are gone:
    the command of a node's shutdown hook (a Kubernetes ``preStop``, a spot notice's handler), run before Ray
    itself is stopped. Returns the pids signalled, when (Unix time) and how many seconds until all had exited."""
    import psutil  # a dependency of Ray

    signalled = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):  # the process title Ray sets
            signalled.append(proc)
    sent = time.time()
    for proc in signalled:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    psutil.wait_procs(signalled, timeout=wait_s)
    return [p.pid for p in signalled], sent, time.time() - sent


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train.preemption [--wait-s S]``: see :func:`stop_local_workers`."""
    import argparse
    from datetime import datetime, timezone

    parser = argparse.ArgumentParser(prog="python -m pipelines.train.preemption",
                                     description="checkpoint and stop this machine's Ray Train workers (SIGTERM)")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for them (default: 60)")
    args = parser.parse_args(argv)
    pids, sent, waited = stop_local_workers(args.wait_s)
    when = datetime.fromtimestamp(sent, timezone.utc).isoformat(timespec="milliseconds")
    print(f"{when} SIGTERM to {len(pids)} Ray Train worker(s)" + (f" (pid {', '.join(map(str, pids))})" if pids
                                                                 else "") + f"; {waited:.1f} s until they exited",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
