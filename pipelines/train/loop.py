"""The worker loop of the stages that train one model with one optimizer on the dataset's rows (``ddpm
train-autoencoder``, ``ddpm train-clip``): build or restore the model, take this worker's rows
(:class:`pipelines.train.rows.Rows`, the same order as ``ddpm train``'s: a function of images seen), train exactly
the run's images in DDP, and on rank 0 evaluate, log to MLflow and write the checkpoints. What a stage adds is a
:class:`LoopTask`: its model, its loss, its evaluation and its checkpoint's model folder.

Every step takes min(batch_size, images left) images, split across the workers as in ``ddpm train`` (rank r trains
on its contiguous part; DDP's gradient is weighted by ``LoopTask.gradient_weight``, each rank's share by default),
so the run sees exactly ``train.total_images`` images in the same steps whatever the number of workers. A
checkpoint (``pipelines.train.checkpoints``' layout, the task's model in ``model/``) holds the optimizer and every
rank's RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from ddpm.training import autocast_dtype, lr_at
from pipelines.tracking import RunLogger
from pipelines.train import ddp, preemption
from pipelines.train.checkpoints import TrainingState, report_checkpoint, resume_from
from pipelines.train.progress import Progress, Reporter
from pipelines.train.rows import Blocks, Rows
from pipelines.train.worker import Throughput, TrainingClock, checkpoint_cause, crossed


class LoopTask:
    """A stage's part of the loop. The driver builds it (it is pickled into every worker); each worker calls
    ``start`` once, then the rest. ``config.train`` must carry the fields of
    :class:`pipelines.train.loop_config.LoopTrainConfig`."""

    def build(self, config) -> torch.nn.Module:
        """A fresh model (the same on every rank: the loop seeds torch with ``train.seed`` first)."""
        raise NotImplementedError

    def restore(self, net: torch.nn.Module, folder: Path) -> tuple[TrainingState, dict, dict]:
        """Load a checkpoint folder's model into ``net``; (state, optimizer state_dict, RNG states)."""
        raise NotImplementedError

    def probe(self, net: torch.nn.Module, device, dtype) -> None:
        """One forward and backward pass shaped like a step's, for :func:`ddp.match_grad_layout`."""
        raise NotImplementedError

    def start(self, *, rank: int, rows: Rows, device) -> None:
        """Before the first step (rank 0 fetches its evaluation data here)."""

    def loss(self, model, images, labels, *, rows: int, n: int, world: int, device,
             autocast) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss to back-propagate, this rank's per-image means to log) for ``images`` (used, H, W, C) uint8
        and ``labels`` (used,) of which the first ``rows`` are this rank's share of the step's ``n``."""
        raise NotImplementedError

    def gradient_weight(self, rows: int, n: int, world: int) -> float:
        """This rank's weight in the gradient all-reduce (:func:`ddp.weighted_allreduce`): its share of the step."""
        return rows / n

    def evaluate(self, net: torch.nn.Module, device, logger: RunLogger, *, seen: int, step: int) -> dict[str, float]:
        """Rank 0, at every checkpoint and every ``train.sample_every_images``: the metrics to log (files go through
        ``logger``). What it sets on ``net`` is in the checkpoint written next."""
        return {}

    def write(self, folder: Path, *, state: TrainingState, net, optimizer, rng_states: dict) -> None:
        """The checkpoint's files: ``model/`` then :func:`pipelines.train.checkpoints.write_training_state`."""
        raise NotImplementedError


@dataclass(frozen=True)
class LoopJob:
    """What the driver hands every worker (inside Ray Train's ``train_loop_config``, which is pickled)."""

    config: object  # the stage's run config (model, train), fitted to the dataset
    task: LoopTask
    fingerprint: str  # the dataset's
    run_id: str  # the MLflow run rank 0 logs to
    tracking_uri: str
    storage: str  # checkpoints go to STORAGE/NAME/
    name: str
    endpoint_url: str | None  # the driver's S3 endpoint, so every worker reads and writes the same store
    blocks: Blocks  # the training rows in Ray's object store
    progress: object | None = None  # the driver's progress actor (pipelines.train.progress.printing)

    def loop_config(self) -> dict:
        return {"job": self}


def train_loop_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs (``loop_config``: :meth:`LoopJob.loop_config`)."""
    with preemption.handling_sigterm():
        _train(loop_config["job"])


def _train(job: LoopJob) -> None:
    config, task = job.config, job.task
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = task.build(config)
    state = TrainingState()
    restored = resume_from(ray.train.get_checkpoint(), storage=job.storage, name=job.name,
                           endpoint_url=job.endpoint_url, rank=rank, world=world)
    optimizer_state = rng = None
    if restored is not None:
        with restored.as_directory() as folder:
            state, optimizer_state, rng = task.restore(net, Path(folder))
        state = replace(state, restarts=state.restarts + 1)
    dtype = autocast_dtype(device, tc.precision)
    net.to(device)
    if world > 1:  # DDP's gradient buckets then take every gradient in place (ddp.match_grad_layout)
        ddp.match_grad_layout(net, lambda: task.probe(net, device, dtype))
    model = ray.train.torch.prepare_model(net)  # on the device; wrapped in DDP when world > 1
    optimizer = tc.build_optimizer(net.parameters())
    if restored is not None:
        optimizer.load_state_dict(optimizer_state)
        ddp.restore_rng(rng, rank, device)
    else:
        torch.manual_seed(tc.seed * 1_000_003 + rank)  # each rank its own noise (posterior samples, flips)
    share = ddp.BatchShare()
    if world > 1:
        model.register_comm_hook(share, ddp.weighted_allreduce)

    def autocast():
        return (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())

    step, seen, total = state.step, state.images_seen, tc.total_images
    clock = TrainingClock(state.train_seconds, tc, world, device)
    rows_of = Rows(job.blocks, seed=tc.seed)  # position = images seen (pipelines.train.rows)
    total_steps, warmup_steps = math.ceil(total / tc.batch_size), tc.warmup_images // tc.batch_size
    task.start(rank=rank, rows=rows_of, device=device)

    logger = RunLogger(job.run_id, job.tracking_uri) if rank == 0 else None
    reporter = None
    if rank == 0:
        logger.set_tag("ray.num_workers", world)
        logger.log_metrics({"world_size": world}, step)
        logger.set_tag("train.autocast", "bf16" if dtype is not None else "fp32")
        if restored is not None:
            logger.set_tag("restarts", state.restarts)
            logger.log_metrics({"restarts": state.restarts, "resumed_at_images": seen}, step)
        reporter = Reporter(job.progress, total=total, run=job.name,
                            budget_s=tc.max_minutes * 60 if tc.max_minutes is not None else None)
    progress = Progress(reporter, world, device)  # a line after the first step, then every 30 s
    throughput, sums, count, last = Throughput(), {}, 0, dict(state.metrics)
    time_spent = clock.spent()

    while seen < total and time_spent < 1:
        # This step's images: n of them, rank r trains on rows [r*m, r*m + m) of the global batch.
        n = min(tc.batch_size, total - seen)
        m = math.ceil(n / world)
        rows = min(max(n - rank * m, 0), m)
        used = max(rows, 1)  # a rank with no rows still runs (DDP needs every rank), with weight 0
        images, labels = rows_of.take(seen + min(rank * m, n - 1), used)  # (used, H, W, C) uint8, (used,)
        share.weight = task.gradient_weight(rows, n, world)
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=warmup_steps, total_steps=total_steps, decay=tc.lr_decay,
                   time_spent=time_spent)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, values = task.loss(model, images, labels, rows=rows, n=n, world=world, device=device,
                                 autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = tc.grad_clip if tc.grad_clip else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True))
        optimizer.step()
        step, seen = step + 1, seen + n
        sums = {k: sums.get(k, 0.0) + v * rows for k, v in values.items()}
        count += rows
        throughput.images += n
        time_spent = clock.spent()
        finished = seen == total or time_spent >= 1
        signalled = None if finished else preemption.signalled_rank(rank, world, device)
        progress.step(loss=values["loss"], rows=rows, images=n, seen=seen, lr=lr, elapsed_s=clock.seconds(),
                      finished=finished)

        if step % tc.log_every_steps == 0 or finished:
            keys = sorted(sums)
            *totals, total_rows = ddp.sum_over_ranks([sums[k] for k in keys] + [count], world, device)
            logged = {k: v / total_rows for k, v in zip(keys, totals)}
            logged.update({"lr": lr, "grad_norm": grad_norm, "images_per_sec": throughput.rate(), "images_seen": seen})
            last.update(logged)
            if logger is not None:
                logger.log_metrics(logged, step)
            if reporter is not None:
                reporter.export(seen=seen, rate=last["images_per_sec"], loss=last["loss"], lr=lr,
                                elapsed_s=clock.seconds())
            sums, count = {}, 0
            throughput.restart()

        checkpoint_now = crossed(seen, n, tc.checkpoint_every_images) or finished or signalled is not None
        if logger is not None and (checkpoint_now or crossed(seen, n, tc.sample_every_images)):
            # Rank 0 only, before the checkpoint is written: what evaluate sets on the model is saved with it.
            net.eval()
            with torch.no_grad():
                measured = task.evaluate(net, device, logger, seen=seen, step=step)
            net.train()
            last.update(measured)
            logger.log_metrics(measured, step)
            throughput.restart()
            progress.pause()

        if checkpoint_now:
            state = TrainingState(step=step, images_seen=seen, train_seconds=clock.seconds(), restarts=state.restarts,
                                  mlflow_run_id=job.run_id, world_size=world, config=config.to_dict(),
                                  dataset_fingerprint=job.fingerprint, metrics=dict(last),
                                  cause=checkpoint_cause(signalled, finished))
            if signalled is not None and logger is not None:
                logger.set_tag(f"preempted_{seen:012d}", f"SIGTERM to rank {signalled} of {world}; checkpoint at "
                                                         f"{seen} images, step {step}")
            closing = finished or signalled is not None
            unlogged = logger.close() if closing and logger is not None else []
            report_checkpoint(state, unlogged, rank=rank, storage=job.storage, name=job.name,
                              endpoint_url=job.endpoint_url, write=task.write, net=net,
                              optimizer=optimizer, rng_states=ddp.gather_rng(world, device))
            throughput.restart()
            progress.pause()
            if signalled is not None:
                preemption.checkpoint_written()
                raise preemption.Preempted(f"rank {signalled} got SIGTERM; checkpoint written at {seen} images")

    if logger is not None:
        logger.close()
