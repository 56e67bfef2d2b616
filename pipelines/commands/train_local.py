"""``ddpm train-local``: train on scikit-learn's digits in this process and write a sample grid
(``pipelines.train.local``). Imports sit inside the functions: ``ddpm train-local --help`` must not load torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError

HELP = "train a model on scikit-learn's digits in one process (core only) and write a sample grid"
EXAMPLE = """example:
  ddpm train-local --config configs/digits.yaml --minutes 3 --out .ddpm/local/digits --samples samples.png
  ddpm train-local --set train.lr=2e-3 --set train.batch_size=256 --minutes 1
"""

DIGITS_PRESET = Path(__file__).resolve().parents[2] / "configs" / "digits.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML preset (default: the project's configs/digits.yaml, wherever the command runs)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value; repeatable")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop after this many minutes of training (sets train.max_minutes)")
    parser.add_argument("--out", default=".ddpm/local/digits", help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--samples", default=None, metavar="FILE.png",
                        help="where to write the sample grid (default: samples.png in the --out folder)")


def main(args: argparse.Namespace) -> int:
    from ddpm import encode_png

    from pipelines.config import load_config, readable
    from pipelines.train.local import digits_dataset, sample_grid, train_local

    if args.minutes is not None and not args.minutes > 0:  # 0 is not "no limit": leave --minutes out for that
        raise UserError(f"--minutes must be positive, got {args.minutes:g}")
    config = load_config(args.config or DIGITS_PRESET, args.set + ([f"train.max_minutes={args.minutes}"] if args.minutes else []))
    print(readable(config.to_dict()))
    images, labels = digits_dataset(config.model.image_size)
    run = train_local(config, images, labels, out_dir=args.out, class_names=[str(i) for i in range(10)])
    print(f"trained {run.steps} steps, {run.images_seen} images in {run.seconds:.0f} s; "
          f"loss {run.first_loss:.4f} -> {run.last_loss:.4f}; checkpoint {run.checkpoint}")
    samples = Path(args.samples) if args.samples else Path(run.checkpoint) / "samples.png"
    samples.write_bytes(encode_png(sample_grid(run.checkpoint)))
    print(f"samples: {samples}")
    return 0
