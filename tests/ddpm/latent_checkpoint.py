"""A small latent model whose latents leave [-1, 1] the way a trained autoencoder's do, for the latent tests of the
core (test_latent.py), the command (tests/pipelines/test_inpaint_command.py) and the engine
(tests/deploy/test_engine_latent.py).

A trained autoencoder's scaling factor is 1 / std of its latents on the training data
(``ddpm.autoencoder.measure_scaling_factor``, what ``ddpm train-autoencoder`` stores), so the scaled latents have
unit standard deviation and about a third of their values lie outside [-1, 1] (the new-user run saw
[-1.82, 1.39]). A random autoencoder with an arbitrary scaling factor does not: its latents can stay inside +-1,
and then a pixel-range check applied to the latents by mistake goes unnoticed. Here the factor is measured the
same way, on random images; :func:`latent_extent` lets a test assert that its latents really leave [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm import Autoencoder, AutoencoderConfig, NoiseSchedule, UNet, UNetConfig, checkpoint, from_uint8
from ddpm.autoencoder import measure_scaling_factor

IMAGE_SIZE, LATENT_SIZE = 32, 8  # the ``tiny`` autoencoder has f = 4


def random_pixels(count: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """(count, size, size, 3) uint8 noise images."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def save_latent_checkpoint(path: str | Path, seed: int = 0) -> tuple[Path, Autoencoder]:
    """A latent checkpoint at ``path``: a tiny U-Net on (4, 8, 8) latents behind the ``tiny`` autoencoder, so
    3x32x32 RGB images, random weights from ``seed``, the scaling factor measured on 16 random images."""
    torch.manual_seed(seed)
    ae = Autoencoder(AutoencoderConfig.preset("tiny")).eval()
    ae.set_scaling_factor(measure_scaling_factor(ae, [from_uint8(random_pixels(16, seed))]))
    unet = UNet(UNetConfig(image_size=LATENT_SIZE, in_channels=4, base_channels=16, channel_mults=(1, 2),
                           num_res_blocks=1, attention_resolutions=(), num_groups=8))
    path = checkpoint.save(path, unet, NoiseSchedule.linear(1000), autoencoder=ae,
                           autoencoder_source={"uri": "models:/photos-ae/3", "name": "photos-ae", "version": "3"})
    return path, ae


@torch.no_grad()
def latent_extent(ae: Autoencoder, pixels: np.ndarray) -> float:
    """max |z| of the scaled latents of (N, H, W, 3) uint8 ``pixels``."""
    return float(ae.encode(from_uint8(pixels)).abs().max())
