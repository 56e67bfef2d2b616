"""The ``ddpm train`` command line: its flags and worked example, and ``main``, which parses, validates and calls
:func:`pipelines.train.driver.train`. Kept cheap to import: ``ddpm train --help`` loads neither torch nor Ray."""

from __future__ import annotations

import argparse

from pipelines.commands.training_flags import add_training_arguments, run_training

HELP = "train a DDPM on Ray Train (DDP), tracked in MLflow, and register the result as a model version"
EXAMPLE = """example:
  ddpm train --data s3://my-bucket/processed/digits --config configs/digits.yaml \\
      --num-workers 2 --storage s3://my-bucket/runs --name digits-1 --register-as digits
  ddpm train --data .ddpm/data/digits --config configs/digits.yaml --set train.total_images=20000 \\
      --num-workers 1 --storage .ddpm/runs --name quick --register-as digits     # a local folder works too
  ddpm train --data s3://my-bucket/processed/digits --config configs/digits.yaml \\
      --num-workers 2-8 --storage s3://my-bucket/runs --name digits-spot    # elastic: spot nodes come and go

Run the same command again with the same --name to resume from the last checkpoint (raise
--set train.total_images=... to train further). Tracking: --tracking-uri, else $MLFLOW_TRACKING_URI, else the
embedded store in .ddpm/ (local Ray only: workers on other machines need a tracking server).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, preset="configs/digits.yaml", registers="model")


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: both import torch (and the driver Ray), which --help must not pay for.
    from pipelines.config import load_config
    from pipelines.train.driver import train

    return run_training(args, load_config, train)
