"""``ddpm data``: write a small, real image dataset as image files, the input ``ddpm preprocess`` expects.

Two datasets ship inside installed packages, so nothing is downloaded:

- ``digits``: scikit-learn's 1,797 handwritten digits, 8x8 grey, one folder per digit (``pipelines/data/digits.py``);
- ``photos``: random crops of scikit-image's colour photographs, RGB at ``--size``, one folder per photo
  (``pipelines/data/photos.py``);
- ``shapes``: synthetic captioned scenes of coloured shapes, each image with its caption in ``NAME.txt`` beside it
  and ``shapes.json`` at the root (``pipelines/data/shapes.py``).
"""

from __future__ import annotations

import argparse

from pipelines.data.digits import FORMATS
from pipelines.errors import UserError

HELP = "write a built-in image dataset as image files, one folder per class (digits, or crops of colour photos)"
EXAMPLE = """examples:
  ddpm data digits --output s3://my-bucket/raw/digits
  ddpm preprocess --input s3://my-bucket/raw/digits --output s3://my-bucket/processed/digits \\
      --resolution 16 --channels 1 --small upscale
  ddpm data photos --output s3://my-bucket/raw/photos --size 64 --count 2000 --seed 0
  ddpm preprocess --input s3://my-bucket/raw/photos --output s3://my-bucket/processed/photos --resolution 64
  ddpm data shapes --output s3://my-bucket/raw/shapes --size 32 --count 10000 --seed 0
"""

# flag -> the dataset it belongs to (the others refuse it rather than ignore it)
_ONLY_FOR = {"limit": ("digits",), "size": ("photos", "shapes"), "count": ("photos", "shapes"),
             "seed": ("photos", "shapes")}
PHOTO_DEFAULTS = {"size": 64, "count": 2000, "seed": 0}
SHAPE_DEFAULTS = {"size": 32, "count": 10_000, "seed": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=["digits", "photos", "shapes"],
                        help="digits: scikit-learn's handwritten digits; photos: crops of scikit-image's photos; "
                             "shapes: captioned scenes of coloured shapes")
    parser.add_argument("--output", required=True, metavar="URI", help="s3://bucket/prefix or a local folder")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png", help="image file format (default: png)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="digits: write only the first N images")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help=f"photos, shapes: side of the square images in pixels (default: {PHOTO_DEFAULTS['size']}, "
                             f"shapes {SHAPE_DEFAULTS['size']})")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help=f"photos, shapes: how many images (default: {PHOTO_DEFAULTS['count']}, "
                             f"shapes {SHAPE_DEFAULTS['count']})")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help=f"photos, shapes: the seed, the same files for a seed (default: {PHOTO_DEFAULTS['seed']})")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    wrong = [f"--{flag}" for flag, dataset in _ONLY_FOR.items()
             if getattr(args, flag) is not None and args.dataset not in dataset]
    if wrong:
        raise UserError(f"{', '.join(wrong)} does not apply to {args.dataset}")
    if args.dataset == "digits":
        from pipelines.data.digits import write_digits

        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        n = write_digits(args.output, fmt=args.format, limit=args.limit, endpoint_url=args.endpoint_url)
        print(f"wrote {n} {args.format.upper()} images to {args.output}, one folder per class")
        return 0
    if args.dataset == "shapes":
        from pipelines.data.shapes import write_shapes

        settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in SHAPE_DEFAULTS.items()}
        made = write_shapes(args.output, fmt=args.format, endpoint_url=args.endpoint_url, **settings)
        print(f"wrote {settings['count']} captioned {args.format.upper()} scenes of {settings['size']}x"
              f"{settings['size']} (seed {settings['seed']}; {made['scenes']['one_object']} with one object, "
              f"{made['scenes']['two_objects']} with two) to {args.output}, each caption in a .txt beside its "
              f"image, the held-out pairs and vocabulary in shapes.json")
        return 0

    from pipelines.data.photos import write_photos

    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in PHOTO_DEFAULTS.items()}
    per_photo = write_photos(args.output, fmt=args.format, endpoint_url=args.endpoint_url, **settings)
    print(f"wrote {sum(per_photo.values())} {args.format.upper()} crops of {settings['size']}x{settings['size']} "
          f"(seed {settings['seed']}) to {args.output}, one folder per photo: "
          + ", ".join(f"{name} {n}" for name, n in per_photo.items()))
    return 0
