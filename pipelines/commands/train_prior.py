"""The ``ddpm train-prior`` command line: its flags and worked example, and ``main``, which parses, validates and
calls :func:`pipelines.train.prior.train_prior`. Kept cheap to import: ``--help`` loads neither torch nor Ray."""

from __future__ import annotations

import argparse

from pipelines.commands.training_flags import add_training_arguments, run_training

HELP = "train unCLIP's prior (captions -> CLIP image embeddings) on captioned data and a CLIP, on Ray Train"
EXAMPLE = """example:
  ddpm train-clip --data .ddpm/data/shapes --config configs/clip-shapes.yaml \\
      --storage .ddpm/runs --name shapes-clip --register-as shapes-clip
  ddpm train-prior --data .ddpm/data/shapes --clip models:/shapes-clip/1 --config configs/prior-shapes.yaml \\
      --storage .ddpm/runs --name shapes-prior --register-as shapes-prior

The CLIP is frozen: each step embeds its images with the CLIP's image tower and the prior learns to sample that
embedding from the caption's token states (caption dropout trains the empty caption, for guidance). At every
checkpoint, on train.eval_images held-out images: the cosine similarity of a sampled embedding to the true one,
against the caption's own CLIP text embedding (unCLIP's baseline), and how often each finds its image (top-1).
Run the same command again with the same --name to resume; every checkpoint pins the CLIP (model/clip/).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, preset="configs/prior-shapes.yaml", registers="prior")
    parser.add_argument("--clip", default=None, metavar="URI",
                        help="the CLIP (models:/NAME/VERSION from ddpm train-clip, or its folder); train.clip")


def main(args: argparse.Namespace) -> int:
    from pipelines.train.prior import train_prior
    from pipelines.train.prior_config import load_config

    def load(path, overrides):
        return load_config(path, overrides + ([f"train.clip={args.clip}"] if args.clip else []))

    def summary(result) -> str:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.scores.items()))
        return f"; held-out: {scores or 'not measured'}"

    return run_training(args, load, train_prior, summary)
