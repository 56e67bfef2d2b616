"""The loop every Ray Train worker runs: build or restore the model, take this worker's rows, train exactly the
run's images in DDP, and on rank 0 log to MLflow, draw sample grids and write the checkpoints. Its input is one
:class:`WorkerJob`, from the driver."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ddpm import EMA, UNet, autoencoder, encode_png, from_uint8
from ddpm.checkpoint import LoadedModel
from ddpm.conditioning import Condition, embed_images, encode_prompts, with_image
from ddpm.training import drop_condition, drop_labels, lr_at, random_flip, train_step
from pipelines import storage as store
from pipelines.config import Config, TrainConfig
from pipelines.tracking import RunLogger
from pipelines.train import ddp, preemption
from pipelines.train.checkpoints import TrainingState, read_checkpoint, report_checkpoint, resume_from
from pipelines.train.progress import Progress, Reporter
from pipelines.train.rows import Blocks, Rows
from pipelines.train.samples import sample_grid
from pipelines.train.encoders import load_on_worker

# Test hook, for the test suite only: the last rank raises right after the first checkpoint at or past N images, in
# an attempt that started below N, so the failure happens once and the retry finishes the run.
FAIL_AFTER_ENV = "DDPM_TEST_FAIL_AFTER_IMAGES"
SAMPLE_STEPS = 25  # DDIM steps for the sample grids: enough to judge progress, cheap next to training
SAMPLE_COLUMNS = 8
SAMPLE_CLASS_ROWS = 10  # a class-conditional grid shows the first 10 classes, one row each
SAMPLE_TEXT_ROWS = 4  # a text model's grid: the dataset's first distinct captions, one row each
SAMPLE_GUIDANCE = 3.0  # ... with classifier-free guidance, as prompts are sampled


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker (inside Ray Train's ``train_loop_config``, which is pickled)."""

    config: Config  # fitted to the dataset
    class_names: tuple[str, ...]  # the dataset's, empty if it has no labels
    fingerprint: str  # the dataset's
    run_id: str  # the MLflow run rank 0 logs to
    tracking_uri: str
    storage: str  # checkpoints go to STORAGE/NAME/
    name: str
    endpoint_url: str | None  # the driver's S3 endpoint, so every worker reads and writes the same store
    blocks: Blocks | None = None  # the dataset in Ray's object store (pipelines.train.rows)
    fail_after_images: int | None = None  # the FAIL_AFTER_ENV test hook
    progress: object | None = None  # the driver's progress actor (pipelines.train.progress.printing); None: no lines
    # a latent dataset's autoencoder: {"uri": its folder in storage, "source": where it came from}; None for pixels
    autoencoder: dict | None = None
    # a text model's frozen text encoder: {"payload": its files in Ray's object store, "source": uri, name, version,
    # sha256} (pipelines.train.text_encoder.for_workers); None for a model without text
    text_encoder: dict | None = None
    sample_captions: tuple[str, ...] = ()  # a text model's sample grid rows
    # unCLIP's decoder's frozen CLIP, as text_encoder; None for a model without image embeddings
    image_encoder: dict | None = None
    sample_images: np.ndarray | None = None  # (rows, H, W, C) uint8: a decoder's sample grid, variations of each

    def loop_config(self) -> dict:
        """Ray Train's ``train_loop_config``: it must be a dict (Ray's run-state export validates one)."""
        return {"job": self}


class TrainingClock:
    """Seconds of training (this attempt's plus those of the attempts before it) against ``train.max_minutes``.

    Every rank takes rank 0's reading, so all of them set the same learning rate and stop after the same step.
    """

    def __init__(self, carried_s: float, train_config: TrainConfig, world: int, device):
        self.carried_s, self.start = carried_s, time.monotonic()
        self.train_config, self.world, self.device = train_config, world, device

    def seconds(self) -> float:
        return self.carried_s + time.monotonic() - self.start

    def spent(self) -> float:
        """The fraction of the time budget used so far, rank 0's on every rank; 0 without a budget."""
        if self.train_config.max_minutes is None:
            return 0.0  # nothing to agree on
        return ddp.from_rank0(self.train_config.time_spent(self.seconds()), self.world, self.device)


class Throughput:
    """Images per second over training steps only (sampling and checkpointing restart the clock)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def checkpoint_cause(signalled: int | None, finished: bool) -> str:
    """What a checkpoint records as its cause: a SIGTERM's (it stops the group, whatever else holds), the run's end,
    or the periodic interval."""
    return "preemption" if signalled is not None else "final" if finished else "interval"


def crossed(seen: int, n: int, every: int) -> bool:
    """Whether the last ``n`` images took the count past a multiple of ``every``."""
    return seen // every > (seen - n) // every


def train_worker(loop_config: dict) -> None:
    """The loop every Ray Train worker runs (``loop_config``: :meth:`WorkerJob.loop_config`).

    Every step takes min(batch_size, images left) images, split across the workers: rank r trains on its contiguous
    part of the global batch, and DDP's gradient is weighted by each rank's share (:func:`ddp.weighted_allreduce`),
    so the run sees exactly ``train.total_images`` images (or stops when ``train.max_minutes`` run out), in the same
    steps whatever the number of workers, which may change at every restart (elastic training).
    """
    with preemption.handling_sigterm():
        _train(loop_config["job"])


def _train(job: WorkerJob) -> None:
    config = job.config
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # Model, optimizer and EMA: fresh, or as the last checkpoint left them.
    torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = UNet(config.model)
    schedule = config.schedule.build()
    state = TrainingState()
    restored = resume_from(ray.train.get_checkpoint(), storage=job.storage, name=job.name,
                           endpoint_url=job.endpoint_url, rank=rank, world=world)
    if restored is not None:
        with restored.as_directory() as folder:
            state, optimizer_state, raw, ema_state, rng = read_checkpoint(Path(folder))
        net.load_state_dict(raw)
        state = replace(state, restarts=state.restarts + 1)
    step_options = tc.step_options(device)
    net.to(device)
    # a text model's frozen text encoder and a decoder's frozen CLIP, on every rank: each encodes its own rows
    encoder = load_on_worker(job.text_encoder, device) if job.text_encoder else None
    clip = load_on_worker(job.image_encoder, device) if job.image_encoder else None
    if world > 1:  # DDP's gradient buckets then take every gradient in place (ddp.match_grad_layout)
        ddp.match_grad_layout(net, lambda: _probe_step(net, config, device, step_options["autocast_dtype"]))
    model = ray.train.torch.prepare_model(net)  # on the device; wrapped in DDP when world > 1
    optimizer = tc.build_optimizer(net.parameters())
    ema = EMA(net, decay=tc.ema_decay, warmup=tc.ema_warmup)
    if restored is not None:
        optimizer.load_state_dict(optimizer_state)
        ema.load_state_dict({k: v.to(device) for k, v in ema_state.items()}, state.ema_updates)
        ddp.restore_rng(rng, rank, device)
    else:
        torch.manual_seed(tc.seed * 1_000_003 + rank)  # each rank its own noise and timesteps
    share = ddp.BatchShare()
    if world > 1:
        model.register_comm_hook(share, ddp.weighted_allreduce)

    step, seen, total = state.step, state.images_seen, tc.total_images
    clock = TrainingClock(state.train_seconds, tc, world, device)
    rows_of = Rows(job.blocks, seed=tc.seed)  # the run's row order: position = images seen (pipelines.train.rows)
    total_steps, warmup_steps = math.ceil(total / tc.batch_size), tc.warmup_images // tc.batch_size
    fail_after = job.fail_after_images
    armed = fail_after is not None and seen < fail_after and rank == world - 1

    nodes = ddp.gather_strings(ray.get_runtime_context().get_node_id(), world)
    logger = RunLogger(job.run_id, job.tracking_uri) if rank == 0 else None
    if logger is not None:
        logger.set_tag("ray.num_workers", world)
        logger.set_tag("ray.num_nodes", len(set(nodes)))
        logger.log_metrics({"world_size": world}, step)  # one point per (re)start: the group's size over time
        logger.set_tag("train.autocast",  # what precision=auto chose
                       "bf16" if step_options["autocast_dtype"] is not None else "fp32")
        if restored is not None:
            logger.set_tag("restarts", state.restarts)
            logger.log_metrics({"restarts": state.restarts, "resumed_at_images": seen}, step)
    sampler_net = UNet(config.model).to(device) if rank == 0 else None
    # a latent model's decoder, for rank 0's sample grids and checkpoints (which carry it)
    decoder = _load_autoencoder(job, device) if rank == 0 and job.autoencoder else None
    reporter = None
    if rank == 0:
        reporter = Reporter(job.progress, total=total, run=job.name,
                            budget_s=tc.max_minutes * 60 if tc.max_minutes is not None else None)
    progress = Progress(reporter, world, device)  # a line after the first step, then every 30 s
    throughput, loss_sum, loss_rows, last = Throughput(), 0.0, 0, {}
    time_spent = clock.spent()

    while seen < total and time_spent < 1:
        # This step's images: n of them, rank r trains on rows [r*m, r*m + m) of the global batch.
        n = min(tc.batch_size, total - seen)
        m = math.ceil(n / world)
        rows = min(max(n - rank * m, 0), m)
        used = max(rows, 1)  # a rank with no rows still runs (DDP needs every rank), with weight 0
        images, labels = rows_of.take(seen + min(rank * m, n - 1), used)  # (used, H, W, C), (used,) int64
        if job.autoencoder:  # float32 latents, already scaled to about unit variance
            x_0 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)  # (used, c, h, w)
        else:
            x_0 = from_uint8(images).to(device)  # (used, C, H, W) in [-1, 1]
        if tc.random_flip:
            x_0 = random_flip(x_0)
        y = None
        if tc.class_conditional:
            y = drop_labels(torch.from_numpy(labels[:used]).to(device), tc.label_dropout)
        elif encoder is not None or clip is not None:
            # token states + pooled (each distinct caption encoded once), some dropped to ""; a decoder's image
            # embeddings of the images it trains on (flipped or not), some dropped to zeros on rows of their own
            y = None if encoder is None else encode_prompts(
                encoder, rows_of.captions(seen + min(rank * m, n - 1), used))
            if clip is None:
                y = drop_condition(y, tc.caption_dropout)
            else:
                y = with_image(embed_images(clip.model, x_0, rows=x_0.shape[0]), y)
                y = drop_condition(y, tc.caption_dropout if encoder else tc.image_dropout,
                                   image_p=tc.image_dropout if encoder else None)
        share.weight = rows / n
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=warmup_steps, total_steps=total_steps, decay=tc.lr_decay,
                   time_spent=time_spent)
        loss, grad_norm = train_step(model, optimizer, schedule, x_0, lr=lr, condition=y, **step_options)
        ema.update(net)
        step, seen = step + 1, seen + n
        loss_sum, loss_rows = loss_sum + loss * rows, loss_rows + rows
        throughput.images += n
        time_spent = clock.spent()
        finished = seen == total or time_spent >= 1
        signalled = None if finished else preemption.signalled_rank(rank, world, device)  # a SIGTERM somewhere?
        progress.step(loss=loss, rows=rows, images=n, seen=seen, lr=lr, elapsed_s=clock.seconds(),
                      finished=finished)

        if step % tc.log_every_steps == 0 or finished:
            loss_sum, loss_rows = ddp.sum_over_ranks([loss_sum, loss_rows], world, device)
            last = {"loss": loss_sum / loss_rows, "lr": lr, "grad_norm": grad_norm,
                    "images_per_sec": throughput.rate(), "images_seen": seen}
            if logger is not None:
                logger.log_metrics(last, step)
            if reporter is not None:
                reporter.export(seen=seen, rate=last["images_per_sec"], loss=last["loss"], lr=lr,
                                elapsed_s=clock.seconds())
            loss_sum, loss_rows = 0.0, 0
            throughput.restart()

        if logger is not None and (crossed(seen, n, tc.sample_every_images) or finished):
            ema.copy_to(sampler_net)
            logger.log_file(_sample_grid_png(sampler_net, schedule, config, decoder, encoder, job.sample_captions,
                                             clip, job.sample_images),
                            f"samples/images_{seen:012d}.png")
            throughput.restart()
            progress.pause()

        if crossed(seen, n, tc.checkpoint_every_images) or finished or signalled is not None:
            state = TrainingState(step=step, images_seen=seen, train_seconds=clock.seconds(), restarts=state.restarts,
                                  ema_updates=ema.num_updates, mlflow_run_id=job.run_id, world_size=world,
                                  config=config.to_dict(), dataset_fingerprint=job.fingerprint, metrics=last,
                                  cause=checkpoint_cause(signalled, finished))
            if signalled is not None and logger is not None:
                logger.set_tag(f"preempted_{seen:012d}", f"SIGTERM to rank {signalled} of {world}; checkpoint at "
                                                         f"{seen} images, step {step}")
                logger.log_metrics({"preempted": 1}, step)
            closing = finished or signalled is not None
            unlogged = logger.close() if closing and logger is not None else []
            report_checkpoint(state, unlogged, rank=rank, storage=job.storage, name=job.name,
                              endpoint_url=job.endpoint_url, net=net, schedule=schedule, ema=ema,
                              optimizer=optimizer, rng_states=ddp.gather_rng(world, device),
                              prediction_type=tc.prediction_type, class_names=job.class_names,
                              autoencoder=decoder,
                              autoencoder_source=job.autoencoder["source"] if job.autoencoder else None,
                              text_encoder=encoder,
                              text_encoder_source=job.text_encoder["source"] if job.text_encoder else None,
                              image_encoder=clip,
                              image_encoder_source=job.image_encoder["source"] if job.image_encoder else None)
            throughput.restart()
            progress.pause()
            if signalled is not None:
                preemption.checkpoint_written()
                raise preemption.Preempted(f"rank {signalled} got SIGTERM; checkpoint written at {seen} images")
            if armed and seen >= fail_after:
                raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: injected failure on rank {rank} at {seen} images")

    if logger is not None:
        logger.close()  # already closed after the last step, unless this attempt resumed at the very end


def _probe_step(net: UNet, config: Config, device, autocast_dtype) -> None:
    """One forward and backward pass shaped like a training step's (a few rows, the step's autocast), for
    :func:`ddp.match_grad_layout`; the values are zeros: only the layouts of the gradients matter."""
    m = config.model
    rows = 4
    x = torch.zeros(rows, m.in_channels, m.image_size, m.image_size, device=device)  # (B, C, H, W)
    t = torch.zeros(rows, dtype=torch.long, device=device)
    y = Condition(labels=torch.zeros(rows, dtype=torch.long, device=device)) if m.num_classes else None
    if m.text_dim:  # two token states of zeros: the layouts do not depend on the context length
        y = Condition(text=torch.zeros(rows, 2, m.text_dim, device=device),
                      pooled=torch.zeros(rows, m.text_dim, device=device))
    if m.image_dim:
        y = with_image(torch.zeros(rows, m.image_dim, device=device), y)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        out = net(x, t, y)  # (B, C, H, W)
    out.float().square().mean().backward()


def _load_autoencoder(job: WorkerJob, device):
    """The latent dataset's autoencoder (its folder in storage, copied here), on ``device``."""
    with tempfile.TemporaryDirectory(prefix="ddpm-autoencoder-") as folder:
        for entry in store.list_files(job.autoencoder["uri"], job.endpoint_url):
            target = Path(folder) / entry.key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(store.join(job.autoencoder["uri"], entry.key), job.endpoint_url))
        return autoencoder.load(folder, device=device)


def _sample_grid_png(sampler_net: UNet, schedule, config: Config, decoder=None, encoder=None,
                     captions: tuple[str, ...] = (), clip=None, images: np.ndarray | None = None) -> bytes:
    """A PNG grid from ``sampler_net`` (holding the EMA weights): DDIM with few steps, the same seeds every time;
    a latent model's samples decoded by ``decoder``.

    Class-conditional: one row per class (the first 10), ``SAMPLE_COLUMNS`` seeds per row; a text model (its
    ``encoder``): one row per caption, guided, the caption written under its row; unCLIP's decoder (its ``clip``):
    one row per image of ``images``, the image then its variations (with the row's caption too if it reads
    captions), guided; else 8 x 8.
    """
    sampler_net.eval()
    num_classes = config.model.num_classes
    loaded = LoadedModel(sampler_net, schedule, config.train.prediction_type, autoencoder=decoder,
                         text_encoder=encoder, image_encoder=clip)
    steps = min(SAMPLE_STEPS, schedule.num_timesteps)
    if clip is not None:
        grid = sample_grid(loaded, rows=len(images), columns=SAMPLE_COLUMNS - 1, steps=steps, captions=captions,
                           images=images, guidance_scale=SAMPLE_GUIDANCE)
    elif encoder is not None:
        grid = sample_grid(loaded, rows=len(captions), columns=SAMPLE_COLUMNS, steps=steps, captions=captions,
                           guidance_scale=SAMPLE_GUIDANCE)
    else:
        grid = sample_grid(loaded, rows=min(num_classes, SAMPLE_CLASS_ROWS) if num_classes else SAMPLE_COLUMNS,
                           columns=SAMPLE_COLUMNS, steps=steps)
    return encode_png(grid)
