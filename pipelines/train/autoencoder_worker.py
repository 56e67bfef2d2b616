"""``ddpm train-autoencoder``'s part of the worker loop (:mod:`pipelines.train.loop`, which takes the rows, runs the
DDP steps, logs and checkpoints): the autoencoder, its loss, and on rank 0 the held-out PSNR and the scaling factor.
The driver (:mod:`pipelines.train.autoencoder`) hands the loop an :class:`AutoencoderTask`.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from ddpm import autoencoder, encode_png, from_uint8, make_grid, to_uint8
from ddpm.autoencoder import Autoencoder, kl_divergence, measure_scaling_factor
from ddpm.training import random_flip
from pipelines.train.checkpoints import MODEL_DIR, TrainingState, read_training_state, write_training_state
from pipelines.train.loop import LoopTask

GRID_COLUMNS = 8  # held-out images shown in the grid: originals above their reconstructions
EVAL_BATCH = 64  # images per forward pass when measuring PSNR and the scaling factor


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
# The task


@dataclass
class AutoencoderTask(LoopTask):
    """The autoencoder's part of :func:`pipelines.train.loop.train_loop_worker`."""

    config: object  # pipelines.train.autoencoder_config.AutoencoderRunConfig
    held_out: object  # ObjectRef of the held-out images, (eval_images, H, W, C) uint8; rank 0 reads it
    held_images: np.ndarray | None = None  # rank 0, after start
    scaling_rows: np.ndarray | None = None  # rank 0: the first scaling_images positions of the training order

    def build(self, config) -> Autoencoder:
        return Autoencoder(config.model)

    def restore(self, net: Autoencoder, folder: Path):
        state, optimizer, saved, rng = read_autoencoder_checkpoint(folder)
        net.load_state_dict(saved.state_dict())
        net.set_scaling_factor(saved.config.scaling_factor, saved.config.shift_factor)
        return state, optimizer, rng

    def probe(self, net: Autoencoder, device, dtype) -> None:
        _probe_step(net, self.config, device, dtype)

    def start(self, *, rank: int, rows, device) -> None:
        if rank == 0:
            self.held_images = ray.get(self.held_out)
            self.scaling_rows = rows.take(0, min(self.config.train.scaling_images, rows.blocks.num_rows))[0]

    def loss(self, model, images, labels, *, rows, n, world, device, autocast):
        """The module docstring's loss on a posterior sample of ``images`` in [-1, 1], mirrored at random."""
        tc = self.config.train
        x = from_uint8(images).to(device)  # (used, C, H, W) in [-1, 1]
        if tc.random_flip:
            x = random_flip(x)
        with autocast():
            recon, mean, logvar = model(x)  # (B, C, H, W), (B, c, h, w) x 2
        loss, rec, kl = autoencoder_loss(x, recon, mean, logvar, loss=tc.loss, kl_weight=tc.kl_weight)
        return loss, {"loss": loss.item(), "rec_loss": rec.item(), "kl": kl.item()}

    def evaluate(self, net: Autoencoder, device, logger, *, seen: int, step: int) -> dict[str, float]:
        """Held-out PSNR and its grid; the scaling factor, measured now and set on the model the checkpoint saves."""
        value, grid = evaluate(net, self.held_images, device)
        factor = measure_scaling(net, self.scaling_rows, device)
        net.set_scaling_factor(factor)
        logger.log_file(encode_png(grid), f"reconstructions/images_{seen:012d}.png")
        return {"psnr_heldout": value, "scaling_factor": factor}

    def write(self, folder: Path, *, state: TrainingState, net, optimizer, rng_states: dict) -> None:
        write_autoencoder_checkpoint(folder, state=state, net=net, optimizer=optimizer, rng_states=rng_states)


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
