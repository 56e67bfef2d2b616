"""The ``ddpm train-clip`` command line: its flags and worked example, and ``main``, which parses, validates and
calls :func:`pipelines.train.clip.train_clip`. Kept cheap to import: ``--help`` loads neither torch nor Ray."""

from __future__ import annotations

import argparse

from pipelines.commands.training_flags import add_training_arguments, run_training

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

    def summary(result) -> str:
        scores = ", ".join(f"{k.removeprefix('retrieval_')} {v:.3f}" for k, v in sorted(result.retrieval.items()))
        return f"; held-out text->image retrieval: {scores or 'not measured'}"

    return run_training(args, load_config, train_clip, summary)
