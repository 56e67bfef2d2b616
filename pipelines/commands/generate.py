"""``ddpm generate``: images from a registered model (or a checkpoint folder), one seed per image.

Image ``i`` is drawn from seed ``K + i`` alone (``ddpm.noise_from_seeds``: one generator per image), so the same
command gives the same images on any machine and whatever the batch size, and ``--seed 5 --num-images 1`` is
image 5 of ``--seed 0 --num-images 8``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError

HELP = "generate images from a model (models:/NAME@ALIAS, models:/NAME/VERSION or a folder) into a PNG grid or .npz"
EXAMPLE = """example:
  ddpm generate --model models:/digits@production --num-images 64 --sampler ddim --steps 50 --seed 0 --out grid.png
  ddpm generate --model models:/digits/3 --num-images 100 --class-label 7 --guidance-scale 2 --out sevens.npz
  ddpm generate --model .ddpm/local/digits --num-images 16 --sampler dpm++ --steps 20 --out grid.png

--out ending in .png writes one grid; .npz writes the array `images`, uint8 of shape (N, H, W, C).
"""

OUTPUT_SUFFIXES = (".png", ".npz")


def generate_images(loaded, seeds: list[int], *, sampler: str = "ddim", steps: int | None = None,
                    class_label: int | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
                    device: str = "cpu"):
    """(len(seeds), H, W, C) uint8 images from a ``ddpm.checkpoint.LoadedModel``, ``batch_size`` at a time.

    Batching only bounds memory: every image has its own generator, so the result does not depend on it.
    """
    import numpy as np
    import torch

    from ddpm import noise_from_seeds, sample, to_uint8

    model = loaded.model.to(device)
    chunks = []
    for start in range(0, len(seeds), batch_size):
        part = seeds[start:start + batch_size]
        x_T, generators = noise_from_seeds(part, loaded.image_shape, device)  # (B, C, H, W)
        labels = None
        if class_label is not None:
            labels = torch.full((len(part),), class_label, dtype=torch.long, device=device)
        x_0 = sample(model, loaded.schedule, x_T, sampler=sampler, steps=steps, prediction_type=loaded.prediction_type,
                     class_labels=labels, guidance_scale=guidance_scale, generator=generators)
        chunks.append(to_uint8(x_0))  # (B, H, W, C)
    return np.concatenate(chunks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddpm import SAMPLERS

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
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--out", required=True, metavar="FILE", help="grid.png or images.npz")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for models:/ URIs (default: $MLFLOW_TRACKING_URI, else .ddpm/)")


def main(args: argparse.Namespace) -> int:
    from ddpm import checkpoint, encode_png, make_grid
    from pipelines.registry import resolve_model

    out = Path(args.out)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise UserError(f"--out {args.out}: must end in .png (a grid) or .npz (an array)")
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    resolved = resolve_model(args.model, args.tracking_uri)
    loaded = checkpoint.load(resolved.path, device=args.device)
    num_classes = loaded.config.num_classes
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise UserError(f"--class-label {args.class_label}: the model has "
                        f"{f'classes 0..{num_classes - 1}' if num_classes else 'no classes (unconditional)'}")
    seeds = list(range(args.seed, args.seed + args.num_images))
    try:
        images = generate_images(loaded, seeds, sampler=args.sampler, steps=args.steps, class_label=args.class_label,
                                 guidance_scale=args.guidance_scale, batch_size=args.batch_size, device=args.device)
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
