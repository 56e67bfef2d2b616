"""The ``ddpm train-clip`` command line: its flags and worked example, and ``main``, which parses, validates and
calls :func:`pipelines.train.clip.train_clip`. Kept cheap to import: ``--help`` loads neither torch nor Ray."""

from __future__ import annotations

import argparse
import os

from pipelines.commands.training_flags import add_training_arguments, workers_from_flags

HELP = "train a small CLIP (image and text towers, contrastive) on captioned data on Ray Train, and register it"
EXAMPLE = """example:
  ddpm data shapes --output .ddpm/data/shapes-raw --size 32 --count 4000
  ddpm preprocess --input .ddpm/data/shapes-raw --output .ddpm/data/shapes --resolution 32 --channels 3 --captions
  ddpm train-clip --data .ddpm/data/shapes --config configs/clip-shapes.yaml \\
      --storage .ddpm/runs --name shapes-clip --register-as shapes-clip

The tokenizer is learned from the training captions and saved with every checkpoint. train.eval_images images are
held out: text -> image retrieval (top-1, top-5; also over one-object captions alone) is logged at every
checkpoint. Run the same command again with the same --name to resume from the last checkpoint (raise
--set train.total_images=... to train further). The registered version is ddpm.clip.save's folder: ddpm.text.load
reads its text tower (text_encoder/ + tokenizer/).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, preset="configs/clip-shapes.yaml", registers="CLIP")


def main(args: argparse.Namespace) -> int:
    # Here, not at the top: both import torch (and the driver Ray), which --help must not pay for.
    from pipelines.train.clip import train_clip
    from pipelines.train.clip_config import load_config

    workers = workers_from_flags(args)
    config = load_config(args.config, args.set)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    result = train_clip(args.data, config, storage=args.storage, name=args.name, num_workers=workers,
                        use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, placement=args.placement,
                        register_as=args.register_as, tracking_uri=args.tracking_uri, experiment=args.experiment,
                        resource_wait_s=args.resource_wait_s)
    scores = ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}" for k, v in sorted(result.retrieval.items()))
    print(f"trained {args.name} to {result.images_seen} images; checkpoint {result.checkpoint}; "
          f"MLflow run {result.run_id}"
          + (f"; models:/{args.register_as}/{result.model_version}" if result.model_version else "")
          + f"; held-out text->image retrieval: {scores or 'not measured'}")
    for item in result.unlogged:
        print(f"warning: not logged to MLflow: {item}")
    return 0
