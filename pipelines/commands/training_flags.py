"""The flags every training command shares (``ddpm train``, ``ddpm train-autoencoder``, ``ddpm train-clip``): the
data, the preset, the workers and where they run, the run's name and storage, MLflow. One place, so that every
trainer reads the same."""

from __future__ import annotations

import argparse

from pipelines.errors import UserError


def add_training_arguments(parser: argparse.ArgumentParser, *, preset: str, registers: str) -> None:
    """Add the shared flags; ``preset`` is an example config file, ``registers`` what ``--register-as`` makes a new
    version of (e.g. "model", "autoencoder")."""
    parser.add_argument("--data", required=True, metavar="URI", help="output of ddpm preprocess (has manifest.json)")
    parser.add_argument("--config", required=True, metavar="YAML", help=f"a preset, e.g. {preset}")
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
    parser.add_argument("--register-as", default=None, metavar="NAME",
                        help=f"register the final {registers} as a new version of NAME")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    parser.add_argument("--experiment", default="ddpm", help="MLflow experiment (default: ddpm)")
    parser.add_argument("--resource-wait-s", type=float, default=None, metavar="S",
                        help="how long to wait for the workers' CPUs/GPUs before failing (default: 30 on a local "
                             "Ray, where a request the nodes cannot hold fails at once; 600 on a cluster, where an "
                             "autoscaler may add nodes)")


def workers_from_flags(args: argparse.Namespace):
    """``--num-workers`` parsed (:class:`pipelines.train.resources.Workers`), ``--cpus-per-worker`` and
    ``--resource-wait-s`` checked, each fault one line naming its flag."""
    from pipelines.train.resources import Workers

    workers = Workers.parse(args.num_workers, "--num-workers")
    if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
        raise UserError("--cpus-per-worker must be at least 1")
    if args.resource_wait_s is not None and not args.resource_wait_s >= 0:
        raise UserError(f"--resource-wait-s must be at least 0, got {args.resource_wait_s}")
    return workers


def run_training(args: argparse.Namespace, load_config, trainer, summary=lambda result: "") -> int:
    """The body of every training command: check the flags, read the config (``load_config(path, overrides)``), run
    ``trainer(data, config, storage=, name=, ...)`` (a :func:`pipelines.train.stage.run_stage` driver) and print one
    line, ``summary(result)`` appending what the stage measured."""
    import os

    workers = workers_from_flags(args)
    config = load_config(args.config, args.set)
    # The driver's MLflow calls fail in seconds, not after MLflow's default minutes of backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    result = trainer(args.data, config, storage=args.storage, name=args.name, num_workers=workers,
                     use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, placement=args.placement,
                     register_as=args.register_as, tracking_uri=args.tracking_uri, experiment=args.experiment,
                     resource_wait_s=args.resource_wait_s)
    print(f"trained {args.name} to {result.images_seen} images; checkpoint {result.checkpoint}; "
          f"MLflow run {result.run_id}"
          + (f"; models:/{args.register_as}/{result.model_version}" if result.model_version else "")
          + summary(result))
    for item in result.unlogged:
        print(f"warning: not logged to MLflow: {item}")
    return 0
