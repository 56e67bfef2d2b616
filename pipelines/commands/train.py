"""The ``ddpm train`` command line: its flags and worked example, and ``main``, which parses, validates and calls
:func:`pipelines.train.driver.train`. Kept cheap to import: ``ddpm train --help`` loads neither torch nor Ray."""

from __future__ import annotations

import argparse
import os


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
    parser.add_argument("--data", required=True, metavar="URI", help="output of ddpm preprocess (has manifest.json)")
    parser.add_argument("--config", required=True, metavar="YAML", help="a preset, e.g. configs/digits.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.total_images=20000; repeatable")
    parser.add_argument("--num-workers", default="1", metavar="N|MIN-MAX",
                        help="Ray Train workers (default: 1), or an elastic range such as 1-4: training starts with "
                             "what the cluster holds and resizes as nodes come and go (docs/training.md)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=int, default=None, metavar="K",
                        help="CPUs reserved per worker, which also sets its thread count "
                             "(default: the cluster's CPUs / N, at most one node's)")
    parser.add_argument("--placement", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], default=None,
                        help="where the workers go (default: SPREAD on CPU, PACK on GPU)")
    parser.add_argument("--storage", required=True, metavar="URI",
                        help="checkpoints go to URI/NAME/: s3://bucket/prefix or a folder all nodes share")
    parser.add_argument("--name", required=True, help="run name; the same name resumes from its last checkpoint")
    parser.add_argument("--register-as", default=None, metavar="MODEL",
                        help="register the final model as a new version of MODEL")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    parser.add_argument("--experiment", default="ddpm", help="MLflow experiment (default: ddpm)")
    parser.add_argument("--resource-wait-s", type=float, default=None, metavar="S",
                        help="how long to wait for the workers' CPUs/GPUs before failing (default: 30 on a local "
                             "Ray, where a request the nodes cannot hold fails at once; 600 on a cluster, where an "
                             "autoscaler may add nodes)")


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: both import torch (and the driver Ray), which --help must not pay for.
    from pipelines.config import load_config
    from pipelines.train.driver import train
    from pipelines.train.resources import workers_from_flags

    workers = workers_from_flags(args)
    config = load_config(args.config, args.set)
    # The driver's MLflow calls fail in seconds, not after MLflow's default minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    result = train(args.data, config, storage=args.storage, name=args.name, num_workers=workers,
                   use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, placement=args.placement,
                   register_as=args.register_as, tracking_uri=args.tracking_uri, experiment=args.experiment,
                   resource_wait_s=args.resource_wait_s)
    print(f"trained {args.name} to {result.images_seen} images; checkpoint {result.checkpoint}; "
          f"MLflow run {result.run_id}" + (f"; models:/{args.register_as}/{result.model_version}"
                                           if result.model_version else ""))
    for item in result.unlogged:
        print(f"warning: not logged to MLflow: {item}")
    return 0
