"""The ``ddpm train-autoencoder`` command line: its flags and worked example, and ``main``, which parses, validates
and calls :func:`pipelines.train.autoencoder.train_autoencoder`. Kept cheap to import: ``--help`` loads neither torch
nor Ray."""

from __future__ import annotations

import argparse

from pipelines.commands.training_flags import add_training_arguments, run_training

HELP = "train latent diffusion's KL autoencoder on Ray Train (DDP), tracked in MLflow, and register it"
EXAMPLE = """example:
  ddpm data photos --output .ddpm/data/photos-raw --size 64 --count 2000
  ddpm preprocess --input .ddpm/data/photos-raw --output .ddpm/data/photos --resolution 64 --channels 3
  ddpm train-autoencoder --data .ddpm/data/photos --config configs/autoencoder-f4.yaml \\
      --storage .ddpm/runs --name photos-ae --register-as photos-ae
  ddpm train-autoencoder --data s3://my-bucket/processed/photos --config configs/autoencoder-f8.yaml \\
      --num-workers 2 --storage s3://my-bucket/runs --name photos-ae-f8 --register-as photos-ae-f8 \\
      --set train.total_images=400000

Run the same command again with the same --name to resume from the last checkpoint (raise
--set train.total_images=... to train further). The first train.eval_images images (after a seeded shuffle) are
held out: their PSNR is logged at every checkpoint, with a grid of originals above reconstructions. Every
checkpoint's model/ is a usable autoencoder with its measured scaling factor; the registered version is what
ddpm encode --autoencoder models:/NAME/VERSION takes.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, preset="configs/autoencoder-f4.yaml", registers="autoencoder")


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: both import torch (and the driver Ray), which --help must not pay for.
    from pipelines.train.autoencoder import train_autoencoder
    from pipelines.train.autoencoder_config import load_config

    def summary(result) -> str:
        psnr = f"{result.psnr_heldout:.2f} dB" if result.psnr_heldout is not None else "not measured"
        return f"; held-out PSNR {psnr}; scaling factor {result.scaling_factor:.4g}"

    return run_training(args, load_config, train_autoencoder, summary)
