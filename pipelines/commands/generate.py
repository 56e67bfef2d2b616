"""``ddpm generate``: images from a registered model (or a checkpoint folder), one seed per image.

Image ``i`` is drawn from seed ``(K + i) mod 2^32`` alone, through the core's one path (``ddpm.generate_images``), so
the same command gives the same images whatever the batch, ``--seed 5 --num-images 1`` is image 5 of ``--seed 0
--num-images 8``, and ``POST /generate`` returns the same pixels for the same seed and settings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipelines.errors import UserError, flag_error

HELP = "generate images from a model (models:/NAME@ALIAS, models:/NAME/VERSION or a folder) into a PNG grid or .npz"
EXAMPLE = """example:
  ddpm generate --model models:/digits@production --num-images 64 --sampler ddim --steps 50 --seed 0 --out grid.png
  ddpm generate --model models:/digits/3 --num-images 100 --class-label 7 --guidance-scale 2 --out sevens.npz
  ddpm generate --model .ddpm/local/digits --num-images 16 --sampler dpm++ --steps 20 --out grid.png

--out ending in .png writes one grid; .npz writes the array `images`, uint8 of shape (N, H, W, C).
"""

OUTPUT_SUFFIXES = (".png", ".npz")


MAX_GRID_IMAGES = 4096  # a 64 x 64 grid; more is no longer a picture anyone looks at
MEMORY_SHARE = 0.25  # the largest share of this machine's memory one output file may need


def check_fits_in_memory(num_images: int, image_shape: tuple[int, int, int], out: Path) -> None:
    """Refuse, before sampling, an output that cannot be held: one file holds every image in memory at once."""
    c, h, w = image_shape
    if out.suffix == ".png" and num_images > MAX_GRID_IMAGES:
        raise UserError(f"--num-images {num_images}: a PNG grid holds at most {MAX_GRID_IMAGES} images; "
                        f"write an .npz, or several grids with --seed")
    need = num_images * c * h * w
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > MEMORY_SHARE * have:
        raise UserError(f"--num-images {num_images}: {need / 2**30:.1f} GiB of pixels in one file, more than "
                        f"{MEMORY_SHARE:.0%} of this machine's {have / 2**30:.0f} GiB; generate in parts with --seed")


class ProgressLine:
    """``progress`` for ``ddpm.generate_images``: a line on stderr at most every few seconds, with the rate and the
    time left, and one at the end."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s = total, every_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"generated {done:,}/{self.total:,} images ({rate:.1f} images/s, {left:.0f} s left)", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddpm import FORWARD_ROWS, SAMPLERS

    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local checkpoint folder")
    parser.add_argument("--num-images", type=int, default=16, metavar="N", help="how many images (default: 16)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: ddim")
    parser.add_argument("--steps", type=int, default=None, metavar="S",
                        help="denoising steps (default: the sampler's, 1000/50/20 for ddpm/ddim/dpm++)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="image i uses seed K+i (default: 0)")
    parser.add_argument("--class-label", type=int, default=None, metavar="C",
                        help="class id for a class-conditional model (default: unconditional)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, metavar="W",
                        help="classifier-free guidance weight; 1 = plain conditional (default: 1)")
    parser.add_argument("--batch-size", type=int, default=FORWARD_ROWS, metavar="B",
                        help="rows per forward pass (the endpoint's micro_batch); the same pixels at the same value "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--out", required=True, metavar="FILE", help="grid.png or images.npz")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for models:/ URIs (default: $MLFLOW_TRACKING_URI, else .ddpm/)")


def main(args: argparse.Namespace) -> int:
    from ddpm import checkpoint, encode_png, generate_images, image_seeds, make_grid
    from ddpm.settings import SettingError, check_for_model, check_settings
    from pipelines.registry import resolve_model

    out = Path(args.out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {args.out}: must end in .png (a grid) or .npz (an array)")
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    settings = dict(sampler=args.sampler, steps=args.steps, seed=args.seed, class_label=args.class_label,
                    guidance_scale=args.guidance_scale)
    try:
        check_settings(**settings)  # the rules of POST /generate and the pyfunc model, before anything is loaded
    except SettingError as exc:
        raise flag_error(exc) from None
    resolved = resolve_model(args.model, args.tracking_uri)
    loaded = checkpoint.load(resolved.path, device=args.device)
    try:
        check_for_model(steps=args.steps, class_label=args.class_label, num_classes=loaded.config.num_classes,
                        num_timesteps=loaded.schedule.num_timesteps)
    except SettingError as exc:
        raise flag_error(exc) from None
    check_fits_in_memory(args.num_images, loaded.image_shape, out)
    try:
        images = generate_images(loaded, image_seeds(args.seed, args.num_images), class_labels=args.class_label,
                                 sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale,
                                 forward_rows=args.batch_size, progress=ProgressLine(args.num_images))
    except ValueError as exc:  # e.g. steps outside [1, T]
        raise UserError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        out.write_bytes(encode_png(make_grid(images)))
    else:
        import numpy as np

        np.savez_compressed(out, images=images)
    source = f"{resolved.name} version {resolved.version}" if resolved.name else str(resolved.path)
    print(f"wrote {len(images)} images ({'x'.join(map(str, images.shape[1:]))}) from {source} to {out}")
    return 0
