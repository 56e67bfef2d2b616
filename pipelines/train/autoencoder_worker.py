"""The loop every Ray Train worker of ``ddpm train-autoencoder`` runs: build or restore the autoencoder, take this
worker's rows (:class:`pipelines.train.rows.Rows`, the same order as ``ddpm train``'s: a function of images seen),
train exactly the run's images in DDP, and on rank 0 measure the held-out PSNR and the scaling factor, log to MLflow
and write the checkpoints. Its input is one :class:`AutoencoderJob`, from :mod:`pipelines.train.autoencoder`.

The objective (LDM's KL autoencoder, Rombach et al. 2022, appendix G, without its perceptual and adversarial terms:
LPIPS and the patch discriminator need downloaded weights, which this platform does not fetch)::

    z ~ q(z | x) = N(mean, exp(logvar))                   the reparameterised posterior sample; x in [-1, 1]
    rec  = mean over the C*H*W pixels and the batch of |x - D(z)|      (train.loss l1; l2: squared error)
    kl   = mean over the batch of KL(q(z | x) || N(0, I))              summed over the latent's elements (nats)
    loss = rec + train.kl_weight * kl / (C * H * W)

That is LDM's loss (its pixel term and its KL are *summed* over each image's elements and averaged over the batch,
with kl_weight 1e-6) divided by the image's C*H*W pixels, so ``kl_weight`` means what it means in LDM's configs and
1e-6 is the default: a KL that keeps the posterior from collapsing to points or drifting to large values without
costing reconstruction quality. The latents are then not unit-scaled (Stable Diffusion's std is about 5.5): that is
what the measured ``scaling_factor`` (1 / std of the latent means, stored in the model) corrects for the diffusion
model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ddpm import autoencoder, encode_png, from_uint8, make_grid, to_uint8
from ddpm.autoencoder import Autoencoder, kl_divergence, measure_scaling_factor
from ddpm.training import autocast_dtype, lr_at, random_flip
from pipelines.tracking import RunLogger
from pipelines.train import ddp, preemption
from pipelines.train.checkpoints import (MODEL_DIR, TrainingState, read_training_state, report_checkpoint,
                                         resume_from, write_training_state)
from pipelines.train.progress import Progress, Reporter
from pipelines.train.rows import Blocks, Rows
from pipelines.train.worker import Throughput, TrainingClock, checkpoint_cause, crossed

GRID_COLUMNS = 8  # held-out images shown in the grid: originals above their reconstructions
EVAL_BATCH = 64  # images per forward pass when measuring PSNR and the scaling factor


@dataclass(frozen=True)
class AutoencoderJob:
    """What the driver hands every worker (inside Ray Train's ``train_loop_config``, which is pickled)."""

    config: object  # pipelines.train.autoencoder_config.AutoencoderRunConfig, fitted to the dataset
    fingerprint: str  # the dataset's
    run_id: str  # the MLflow run rank 0 logs to
    tracking_uri: str
    storage: str  # checkpoints go to STORAGE/NAME/
    name: str
    endpoint_url: str | None  # the driver's S3 endpoint, so every worker reads and writes the same store
    blocks: Blocks  # the training rows (held-out rows removed) in Ray's object store
    held_out: object  # ObjectRef of the held-out images, (eval_images, H, W, C) uint8; rank 0 reads it
    progress: object | None = None  # the driver's progress actor (pipelines.train.progress.printing)

    def loop_config(self) -> dict:
        return {"job": self}


# ---------------------------------------------------------------------------------------------------------------
# The math (plain torch)


def autoencoder_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *,
                     loss: str = "l1", kl_weight: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rec, kl) of the module docstring for images x and reconstructions (B, C, H, W) and the posterior's
    (mean, logvar) (B, c, h, w); rec is per pixel, kl per image (nats), loss = rec + kl_weight * kl / (C*H*W)."""
    diff = recon.float() - x.float()  # (B, C, H, W)
    rec = diff.abs().mean() if loss == "l1" else diff.square().mean()
    kl = kl_divergence(mean.float(), logvar.float()).mean()  # (B,) -> ()
    return rec + kl_weight * kl / x[0].numel(), rec, kl


def psnr(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (B, C, H, W) on the [0, 1] scale (255 = 1 on the 8-bit scale):
    10 log10(1 / MSE) with both mapped by (v + 1) / 2 and the reconstruction clamped to [0, 1]; (B,)."""
    a = (x.float() + 1) / 2
    b = ((recon.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).square().flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


@torch.no_grad()
def evaluate(net: Autoencoder, held_out: np.ndarray, device) -> tuple[float, np.ndarray]:
    """(mean held-out PSNR in dB, grid of originals above reconstructions as (H', W', C) uint8).

    The reconstruction decodes the posterior mean (no sampling): what encoding a dataset for a diffusion model does.
    """
    net.eval()
    values, shown = [], []
    for start in range(0, len(held_out), EVAL_BATCH):
        x = from_uint8(held_out[start:start + EVAL_BATCH]).to(device)  # (b, C, H, W)
        recon, _, _ = net(x, sample_posterior=False)
        values.append(psnr(x, recon).cpu())
        if start == 0:
            shown = to_uint8(recon[:GRID_COLUMNS])  # (n, H, W, C)
    net.train()
    originals = held_out[:len(shown)]
    return float(torch.cat(values).mean()), make_grid(np.concatenate([originals, shown]), ncols=len(shown))


def measure_scaling(net: Autoencoder, images: np.ndarray, device) -> float:
    """:func:`ddpm.autoencoder.measure_scaling_factor` on ``images`` (N, H, W, C) uint8, in batches."""
    net.eval()
    batches = (from_uint8(images[i:i + EVAL_BATCH]) for i in range(0, len(images), EVAL_BATCH))
    factor = measure_scaling_factor(net, batches) if len(images) else 1.0
    net.train()
    return factor


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint: pipelines.train.checkpoints' layout with an autoencoder in model/


def write_autoencoder_checkpoint(folder: Path, *, state: TrainingState, net: Autoencoder, optimizer,
                                 rng_states: dict[str, torch.Tensor]) -> None:
    """model/ (``ddpm.autoencoder.save``: a usable autoencoder, scaling factor included), then the training state."""
    autoencoder.save(folder / MODEL_DIR, net, metadata={"images_seen": state.images_seen, "step": state.step,
                                                        "mlflow_run_id": state.mlflow_run_id})
    write_training_state(folder, state=state, optimizer=optimizer, rng_states=rng_states)


def read_autoencoder_checkpoint(folder: Path) -> tuple[TrainingState, dict, Autoencoder, dict]:
    """(state, optimizer state_dict, the autoencoder, RNG states) from a checkpoint folder, on the CPU."""
    state, optimizer, rng = read_training_state(folder)
    return state, optimizer, autoencoder.load(folder / MODEL_DIR), rng


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train_autoencoder_worker(loop_config: dict) -> None:
    """The loop every Ray Train worker runs (``loop_config``: :meth:`AutoencoderJob.loop_config`).

    Every step takes min(batch_size, images left) images, split across the workers as in ``ddpm train`` (rank r
    trains on its contiguous part; DDP's gradient is weighted by each rank's share), so the run sees exactly
    ``train.total_images`` images in the same steps whatever the number of workers.
    """
    with preemption.handling_sigterm():
        _train(loop_config["job"])


def _train(job: AutoencoderJob) -> None:
    config = job.config
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = Autoencoder(config.model)
    state = TrainingState()
    restored = resume_from(ray.train.get_checkpoint(), storage=job.storage, name=job.name,
                           endpoint_url=job.endpoint_url, rank=rank, world=world)
    optimizer_state = rng = None
    if restored is not None:
        with restored.as_directory() as folder:
            state, optimizer_state, saved, rng = read_autoencoder_checkpoint(Path(folder))
        net.load_state_dict(saved.state_dict())
        net.set_scaling_factor(saved.config.scaling_factor, saved.config.shift_factor)
        state = replace(state, restarts=state.restarts + 1)
    dtype = autocast_dtype(device, tc.precision)
    net.to(device)
    if world > 1:  # DDP's gradient buckets then take every gradient in place (ddp.match_grad_layout)
        ddp.match_grad_layout(net, lambda: _probe_step(net, config, device, dtype))
    model = ray.train.torch.prepare_model(net)  # on the device; wrapped in DDP when world > 1
    optimizer = tc.build_optimizer(net.parameters())
    if restored is not None:
        optimizer.load_state_dict(optimizer_state)
        ddp.restore_rng(rng, rank, device)
    else:
        torch.manual_seed(tc.seed * 1_000_003 + rank)  # each rank its own posterior noise and flips
    share = ddp.BatchShare()
    if world > 1:
        model.register_comm_hook(share, ddp.weighted_allreduce)

    step, seen, total = state.step, state.images_seen, tc.total_images
    clock = TrainingClock(state.train_seconds, tc, world, device)
    rows_of = Rows(job.blocks, seed=tc.seed)  # position = images seen (pipelines.train.rows)
    total_steps, warmup_steps = math.ceil(total / tc.batch_size), tc.warmup_images // tc.batch_size

    logger = RunLogger(job.run_id, job.tracking_uri) if rank == 0 else None
    held_out = scaling_rows = None
    reporter = None
    if rank == 0:
        held_out = ray.get(job.held_out)  # (eval_images, H, W, C) uint8
        # a fixed set: the first scaling_images positions of the training order
        scaling_rows = rows_of.take(0, min(tc.scaling_images, job.blocks.num_rows))[0]
        logger.set_tag("ray.num_workers", world)
        logger.log_metrics({"world_size": world}, step)
        logger.set_tag("train.autocast", "bf16" if dtype is not None else "fp32")
        if restored is not None:
            logger.set_tag("restarts", state.restarts)
            logger.log_metrics({"restarts": state.restarts, "resumed_at_images": seen}, step)
        reporter = Reporter(job.progress, total=total, run=job.name,
                            budget_s=tc.max_minutes * 60 if tc.max_minutes is not None else None)
    progress = Progress(reporter, world, device)  # a line after the first step, then every 30 s
    throughput, sums, last = Throughput(), [0.0, 0.0, 0.0, 0], dict(state.metrics)
    time_spent = clock.spent()

    while seen < total and time_spent < 1:
        # This step's images: n of them, rank r trains on rows [r*m, r*m + m) of the global batch.
        n = min(tc.batch_size, total - seen)
        m = math.ceil(n / world)
        rows = min(max(n - rank * m, 0), m)
        used = max(rows, 1)  # a rank with no rows still runs (DDP needs every rank), with weight 0
        images, _ = rows_of.take(seen + min(rank * m, n - 1), used)  # (used, H, W, C) uint8
        x = from_uint8(images).to(device)  # (used, C, H, W) in [-1, 1]
        if tc.random_flip:
            x = random_flip(x)
        share.weight = rows / n
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=warmup_steps, total_steps=total_steps, decay=tc.lr_decay,
                   time_spent=time_spent)
        loss, rec, kl, grad_norm = _step(model, optimizer, x, lr=lr, tc=tc, dtype=dtype)
        step, seen = step + 1, seen + n
        sums = [sums[0] + loss * rows, sums[1] + rec * rows, sums[2] + kl * rows, sums[3] + rows]
        throughput.images += n
        time_spent = clock.spent()
        finished = seen == total or time_spent >= 1
        signalled = None if finished else preemption.signalled_rank(rank, world, device)
        progress.step(loss=loss, rows=rows, images=n, seen=seen, lr=lr, elapsed_s=clock.seconds(),
                      finished=finished)

        if step % tc.log_every_steps == 0 or finished:
            loss_sum, rec_sum, kl_sum, count = ddp.sum_over_ranks(sums, world, device)
            last.update({"loss": loss_sum / count, "rec_loss": rec_sum / count, "kl": kl_sum / count, "lr": lr,
                         "grad_norm": grad_norm, "images_per_sec": throughput.rate(), "images_seen": seen})
            if logger is not None:
                logger.log_metrics({k: last[k] for k in ("loss", "rec_loss", "kl", "lr", "grad_norm",
                                                         "images_per_sec", "images_seen")}, step)
            if reporter is not None:
                reporter.export(seen=seen, rate=last["images_per_sec"], loss=last["loss"], lr=lr,
                                elapsed_s=clock.seconds())
            sums = [0.0, 0.0, 0.0, 0]
            throughput.restart()

        checkpoint_now = crossed(seen, n, tc.checkpoint_every_images) or finished or signalled is not None
        if logger is not None and (checkpoint_now or crossed(seen, n, tc.sample_every_images)):
            # Rank 0 only, before the checkpoint is written: its model carries the scaling factor measured now.
            value, grid = evaluate(net, held_out, device)
            factor = measure_scaling(net, scaling_rows, device)
            net.set_scaling_factor(factor)
            last.update({"psnr_heldout": value, "scaling_factor": factor})
            logger.log_metrics({"psnr_heldout": value, "scaling_factor": factor}, step)
            logger.log_file(encode_png(grid), f"reconstructions/images_{seen:012d}.png")
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
                              endpoint_url=job.endpoint_url, write=write_autoencoder_checkpoint, net=net,
                              optimizer=optimizer, rng_states=ddp.gather_rng(world, device))
            throughput.restart()
            progress.pause()
            if signalled is not None:
                preemption.checkpoint_written()
                raise preemption.Preempted(f"rank {signalled} got SIGTERM; checkpoint written at {seen} images")

    if logger is not None:
        logger.close()


def _step(model, optimizer, x: torch.Tensor, *, lr: float, tc, dtype) -> tuple[float, float, float, float]:
    """Forward (a posterior sample), loss, backward, clip, step: (loss, rec, kl, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast = (torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with autocast:
        recon, mean, logvar = model(x)  # (B, C, H, W), (B, c, h, w) x 2
    loss, rec, kl = autoencoder_loss(x, recon, mean, logvar, loss=tc.loss, kl_weight=tc.kl_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = tc.grad_clip if tc.grad_clip else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    optimizer.step()
    return loss.item(), rec.item(), kl.item(), float(grad_norm)


def _probe_step(net: Autoencoder, config, device, dtype) -> None:
    """One forward and backward pass shaped like a training step's, for :func:`ddp.match_grad_layout` (zeros: only
    the gradients' layouts matter)."""
    f = config.model.downsample_factor
    x = torch.zeros(2, config.model.in_channels, 2 * f, 2 * f, device=device)  # (B, C, H, W)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    with autocast:
        recon, mean, logvar = net(x, sample_posterior=False)
    (recon.float().square().mean() + mean.float().square().mean() + logvar.float().square().mean()).backward()
