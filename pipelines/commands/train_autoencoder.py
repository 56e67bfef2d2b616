"""The ``ddpm train-autoencoder`` command line: its flags and worked example, and ``main``, which parses, validates
and calls :func:`pipelines.train.autoencoder.train_autoencoder`. Kept cheap to import: ``--help`` loads neither torch
nor Ray."""

from __future__ import annotations

import argparse
import os


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
    parser.add_argument("--data", required=True, metavar="URI", help="output of ddpm preprocess (has manifest.json)")
    parser.add_argument("--config", required=True, metavar="YAML", help="a preset, e.g. configs/autoencoder-f4.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.total_images=20000; repeatable")
    parser.add_argument("--num-workers", default="1", metavar="N|MIN-MAX",
                        help="Ray Train workers (default: 1), or an elastic range such as 1-4")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=int, default=None, metavar="K",
                        help="CPUs reserved per worker, which also sets its thread count "
                             "(default: the cluster's CPUs / N, at most one node's)")
    parser.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default=None,
                        help="where the workers go (default: SPREAD on CPU, PACK on GPU)")
    parser.add_argument("--storage", required=True, metavar="URI",
                        help="checkpoints go to URI/NAME/: s3://bucket/prefix or a folder all nodes share")
    parser.add_argument("--name", required=True, help="run name; the same name resumes from its last checkpoint")
    parser.add_argument("--register-as", default=None, metavar="AE_NAME",
                        help="register the final autoencoder as a new version of AE_NAME")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    parser.add_argument("--experiment", default="ddpm", help="MLflow experiment (default: ddpm)")
    parser.add_argument("--resource-wait-s", type=float, default=None, metavar="S",
                        help="how long to wait for the workers' CPUs/GPUs before failing (default: 30 on a local "
                             "Ray, 600 on a cluster)")


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: both import torch (and the driver Ray), which --help must not pay for.
    from pipelines.train.autoencoder import train_autoencoder
    from pipelines.train.autoencoder_config import load_config
    from pipelines.train.resources import workers_from_flags

    workers = workers_from_flags(args)
    config = load_config(args.config, args.set)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    result = train_autoencoder(args.data, config, storage=args.storage, name=args.name, num_workers=workers,
                               use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                               placement=args.placement, register_as=args.register_as,
                               tracking_uri=args.tracking_uri, experiment=args.experiment,
                               resource_wait_s=args.resource_wait_s)
    psnr = f"{result.psnr_heldout:.2f} dB" if result.psnr_heldout is not None else "not measured"
    print(f"trained {args.name} to {result.images_seen} images; checkpoint {result.checkpoint}; "
          f"MLflow run {result.run_id}"
          + (f"; models:/{args.register_as}/{result.model_version}" if result.model_version else "")
          + f"; held-out PSNR {psnr}; scaling factor {result.scaling_factor:.4g}")
    for item in result.unlogged:
        print(f"warning: not logged to MLflow: {item}")
    return 0
