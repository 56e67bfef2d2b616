"""One Ray Train stage, from the driver's side: the prologue, the TorchTrainer and the epilogue that every trainer
(``ddpm train``, ``ddpm train-autoencoder``, ``ddpm train-clip``) shares.

::

    read the manifest -> the stage's dataset check (fits the config) -> the run's latest checkpoint, checked to be
    resumable -> the workers, and whether the cluster holds them -> the MLflow run (new, or the checkpoint's) ->
    [already final: skip to registration] -> the TorchTrainer of the stage's worker loop (run_trainer: retries,
    storage outages, one-line failures) -> log the final model, register it with the stage's tags, close the run

A :class:`Stage` is what differs between trainers: its dataset check, its resume check, the worker function and
loop config it launches, how its model is logged and which version tags it adds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines import storage as store
from pipelines import tracking
from pipelines.config import readable
from pipelines.data.dataset import read_manifest
from pipelines.errors import UserError
from pipelines.ray_utils import init_ray, verbose
from pipelines.train.checkpoints import UPLOAD_RETRY_WAITS_S, TrainingState, latest_checkpoint
from pipelines.train.progress import fit_with_progress
from pipelines.train.resources import Workers, check_workers_fit
from pipelines.train.run import fail_run, finish_run, killed_on_interrupt, open_run, resume_hint


@dataclass(frozen=True)
class Stage:
    """A trainer's specifics.

    ``check(config, manifest, data) -> config``: refuse unusable data (UserError), return the config fitted to it.
    ``check_resumable(state, config, name)``: refuse resuming a checkpoint with an incompatible config.
    ``launch(data, config, manifest, *, storage, name, run_id, tracking_uri) -> (worker function, loop config)``:
    put the dataset in Ray's object store and build the workers' job.
    ``log_model(model_dir, *, run_id, tracking_uri) -> models:/ URI`` (None: a DDPM, ``registry.log_model``) and
    ``extra_tags(checkpoint folder) -> dict`` (the version's own tags), as :func:`pipelines.train.run.finish_run`.
    """

    check: Callable
    check_resumable: Callable
    launch: Callable
    log_model: Callable | None = None
    extra_tags: Callable | None = None


@dataclass(frozen=True)
class StageResult:
    run_id: str
    images_seen: int
    checkpoint: str  # URI of the final checkpoint folder
    model_version: str | None  # None without --register-as
    unlogged: list[str] = field(default_factory=list)  # what never reached the tracking server


def run_stage(
    stage: Stage,
    data: str,
    config,
    *,
    storage: str,
    name: str,
    num_workers: int | str | Workers = 1,
    use_gpu: bool = False,
    cpus_per_worker: int | None = None,
    placement: str | None = None,
    register_as: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "ddpm",
    resource_wait_s: float | None = None,
) -> StageResult:
    """Train ``config`` on the dataset at ``data`` with checkpoints under STORAGE/NAME, the module docstring's path.

    Running it again with the same ``name`` resumes from the run's latest complete checkpoint, in the same MLflow
    run; a run that already holds its final checkpoint only registers (found again by its run_id and images_seen
    tags, so nothing is registered twice).

    ``num_workers`` is a fixed N or an elastic range ``"MIN-MAX"`` (:class:`pipelines.train.resources.Workers`).
    ``cpus_per_worker`` defaults to the cluster's CPUs divided among the workers (at most one node's worth): Ray sets
    a worker's thread count from its CPU reservation. ``placement`` defaults to SPREAD on CPUs and PACK on GPUs.
    Before anything is created, the cluster must be able to hold the workers
    (:func:`pipelines.train.resources.check_workers_fit`, waiting up to ``resource_wait_s``).
    """
    manifest = read_manifest(data)
    config = stage.check(config, manifest, data)
    if verbose():  # else one line below says where the resolved config is: it is 80 lines
        print(readable(config.to_dict()), flush=True)
    previous = latest_checkpoint(storage, name)
    if previous is not None:
        stage.check_resumable(previous.state, config, name)
    workers = Workers.parse(num_workers)
    init_ray()
    cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers.max)
    check_workers_fit(workers.min, {"CPU": cpus_per_worker, "GPU": 1 if use_gpu else 0}, wait_s=resource_wait_s)
    uri = tracking_uri or tracking.tracking_uri()
    run_id = open_run(uri, experiment, name, config, manifest, data, previous)

    unlogged: list[str] = []
    with killed_on_interrupt(run_id, uri, storage, name):
        if previous is not None and config.train.finished(previous.state.images_seen, previous.state.train_seconds):
            print(f"run {name} already holds its final checkpoint ({previous.state.images_seen} images); "
                  f"skipping to registration", flush=True)
            final_uri = previous.uri
        else:
            worker_fn, loop_config = stage.launch(data, config, manifest, storage=storage, name=name, run_id=run_id,
                                                  tracking_uri=uri)
            result = run_trainer(worker_fn, loop_config, config, storage=storage, name=name, workers=workers,
                                 use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, placement=placement,
                                 run_id=run_id, tracking_uri=uri)
            final_uri = store.join(storage, name, Path(result.checkpoint.path).name)
            unlogged = list((result.metrics or {}).get("unlogged", []))

        images_seen, version = finish_run(final_uri, run_id=run_id, register_as=register_as, tracking_uri=uri,
                                          config=config, manifest=manifest, log_model=stage.log_model,
                                          extra_tags=stage.extra_tags)
    return StageResult(run_id, images_seen, final_uri, version, unlogged)


def check_not_past_end(state: TrainingState, config, name: str) -> None:
    """A run never resumes past its end (every stage's last resume check)."""
    if state.images_seen > config.train.total_images:
        raise UserError(f"run {name} has already seen {state.images_seen} images, more than "
                        f"train.total_images={config.train.total_images}")


def default_cpus_per_worker(num_workers: int) -> int:
    """The cluster's CPUs shared among the workers, at most one node's worth (a worker cannot span nodes)."""
    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return max(1, min(int(max(per_node, default=1)), int(sum(per_node) // num_workers)))



class InterruptibleTrainer(TorchTrainer):
    """A TorchTrainer whose ``fit()`` turns Ctrl-C into ``KeyboardInterrupt`` once the run's workers are stopped.

    Ray Train's own SIGINT handler aborts the controller and then exits the process (status 1, no message) before the
    command can close its MLflow run (``DataParallelTrainer._register_sigint_handler``, Ray 2.60). A second Ctrl-C
    while the workers stop interrupts at once.
    """

    def _register_sigint_handler(self, controller) -> None:
        def interrupt(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(Exception):  # abort() ends the controller actor, so the call itself fails
                ray.get(controller.abort.remote(), timeout=30)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)


def run_trainer(worker_fn, loop_config: dict, config, *, storage: str, name: str, workers: Workers, use_gpu: bool,
                cpus_per_worker: int, placement: str | None, run_id: str, tracking_uri: str):
    """Run a TorchTrainer of ``worker_fn`` with checkpoints under STORAGE/NAME; returns its Result.
    ``config.train`` gives the retries, checkpoints kept and the
    elastic check; a failure that ends the run becomes one line naming where it will resume.

    A worker (or node) that dies is replaced by Ray Train (``train.max_failures`` times) and the group restarts from
    the last checkpoint (:func:`pipelines.train.checkpoints.resume_from`). When the retries run out, the one-line
    error names the checkpoint the same command will resume from. An elastic group (``workers.elastic``) also
    restarts, from the latest checkpoint, when Ray Train resizes it: it looks for more room every
    ``train.elastic_check_s`` seconds.
    """
    fs, root = store.filesystem_for(storage)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer_args = dict(
        train_loop_per_worker=worker_fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers.scaling(), use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=placement or ("PACK" if use_gpu else "SPREAD"),
                                               elastic_resize_monitor_interval_s=config.train.elastic_check_s),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.train.num_checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
        ),
    )
    print(f"training on {workers} worker(s) x {cpus_per_worker} CPU{' + 1 GPU' if use_gpu else ''}; "
          f"checkpoints under {store.join(storage, name)}", flush=True)
    outages = 0
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    while True:
        try:
            return fit_with_progress(InterruptibleTrainer, trainer_args)  # rank 0's progress lines printed here
        except ray.train.TrainingFailedError as exc:
            # Ray Train's controller writes its own state to the store when it registers a checkpoint, and does not
            # retry that: a storage outage at that moment ends the run. Wait for the store, then go on from the last
            # complete checkpoint, as the same command run again would (at most train.max_failures times).
            if (isinstance(exc, ray.train.ControllerError) and store.explain(str(exc)) is not None
                    and outages < config.train.max_failures and _store_back(storage, name)):
                outages += 1
                print(f"storage came back after an outage that stopped Ray Train's controller; resuming "
                      f"({outages}/{config.train.max_failures})", flush=True)
                continue
            raise UserError(_failure_message(exc, config, storage, name, run_id, tracking_uri)) from None
        finally:
            if on_main_thread:  # fit() left its Ctrl-C handler behind
                signal.signal(signal.SIGINT, sigint)


def _store_back(storage: str, name: str, waits_s=UPLOAD_RETRY_WAITS_S) -> bool:
    """Whether the store answers again within about a minute (the wait of a checkpoint upload)."""
    for wait_s in waits_s:
        time.sleep(wait_s)
        try:
            latest_checkpoint(storage, name)
            return True
        except UserError:
            continue
    return False


def _failure_message(exc: Exception, config, storage: str, name: str, run_id: str, tracking_uri: str) -> str:
    """One line: why training stopped, and where it will resume (the same command resumes from there)."""
    fail_run(run_id, tracking_uri)
    cause = exc.__cause__ or exc
    explained = store.explain(str(cause))
    if explained:
        reason = f"{storage}: {explained}"
    elif getattr(cause, "worker_failures", None):  # ray.train.WorkerGroupError: rank -> its error
        # a rank whose process or node died fails its health check; the others' errors are then only echoes of it
        lost = {rank: error for rank, error in cause.worker_failures.items() if "health check" in str(error)}
        reason = "; ".join(f"rank {rank}: {'worker lost: ' if lost else ''}{_one_line(error)[:150]}"
                           for rank, error in sorted((lost or cause.worker_failures).items()))
    else:
        reason = _one_line(getattr(cause, "controller_failure", None) or cause)
    return (f"training failed (train.max_failures={config.train.max_failures}): {reason[:300]}; "
            f"{resume_hint(storage, name)}")


def _one_line(error: BaseException) -> str:
    """An error in one line: its message's first line, or for a quoted traceback its last (the exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if any(line.startswith("Traceback (most recent call last)") for line in lines) else lines[0]
