"""``ddpm unclip``: register a prior and a decoder trained on the same CLIP as one unCLIP model
(:func:`pipelines.registry.unclip.register_unclip`). Kept cheap to import: ``--help`` loads neither torch nor MLflow."""

from __future__ import annotations

import argparse

HELP = "register a prior and a decoder on the same CLIP as one unCLIP (DALL-E 2) model that takes prompts"
EXAMPLE = """example:
  ddpm train-prior --data .ddpm/data/shapes --clip models:/shapes-clip/1 --config configs/prior-shapes.yaml \\
      --storage .ddpm/runs --name shapes-prior --register-as shapes-prior
  ddpm train --data .ddpm/data/shapes --config configs/shapes-decoder.yaml --storage .ddpm/runs \\
      --name shapes-decoder --register-as shapes-decoder
  ddpm unclip --prior models:/shapes-prior/1 --decoder models:/shapes-decoder/1 --register-as shapes-unclip \\
      --alias production
  ddpm generate --model models:/shapes-unclip@production --prompt "a small red circle" --guidance-scale 3 \\
      --prior-steps 20 --out grid.png

The version carries the decoder's weights, its CLIP and the prior (one ddpm checkpoint), and its tags name both
parts. Registering the same two parts again reuses their version. A prompt then runs prompt -> CLIP text tower ->
prior (--prior-steps, --prior-guidance-scale) -> decoder (--steps, --guidance-scale) on every door.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", required=True, metavar="URI",
                        help="the prior: models:/NAME/VERSION (or @ALIAS) from ddpm train-prior, or its folder")
    parser.add_argument("--decoder", required=True, metavar="URI",
                        help="the decoder: models:/NAME/VERSION from ddpm train with train.image_encoder, or a "
                             "checkpoint folder")
    parser.add_argument("--register-as", required=True, metavar="NAME", help="the registered model's name")
    parser.add_argument("--alias", default=None, metavar="ALIAS",
                        help="point models:/NAME@ALIAS at the version (e.g. production; its canary is recorded)")
    parser.add_argument("--experiment", default="ddpm", help="MLflow experiment of the registering run")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else .ddpm/)")


def main(args: argparse.Namespace) -> int:
    from pipelines import tracking
    from pipelines.registry.unclip import register_unclip

    register_unclip(args.prior, args.decoder, args.register_as, tracking_uri=args.tracking_uri or
                    tracking.tracking_uri(), experiment=args.experiment, alias=args.alias)
    return 0
