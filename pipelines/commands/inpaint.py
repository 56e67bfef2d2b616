"""``ddpm inpaint``: fill the white part of a mask with a model (RePaint), keeping every other pixel exactly.

The library function is :func:`ddpm.inpaint_images` (RePaint, :func:`ddpm.inpaint`); this command reads the two
images, checks them against the model and each other, and writes the result. Image and mask must have the model's size (``--resize`` stretches both to
it, the mask with nearest-neighbour so it stays black and white); the image is converted to the model's channels
(grey or RGB). One seed gives one result, the same as ``POST /inpaint`` returns for that seed and settings. A text
model repaints the masked region to ``--prompt`` (SDEdit/RePaint's "denoising with new conditions").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError, flag_error

HELP = "fill the white part of a mask in an image with a model (RePaint inpainting/outpainting); the rest is kept"
EXAMPLE = """example:
  ddpm inpaint --model models:/digits@production --image digit.png --mask right-half.png --out filled.png
  ddpm inpaint --model .ddpm/local/digits --image photo.png --mask hole.png --resize --seed 3 --out filled.png
  ddpm inpaint --model models:/digits/3 --image digit.png --mask right-half.png --sampler ddpm --steps 250 \\
      --resample-jumps 10 --resample-times 10 --class-label 7 --out seven.png
  ddpm inpaint --model models:/shapes-text@production --image scene.png --mask left-half.png \
      --prompt "a large blue square" --guidance-scale 3 --out repainted.png

The mask is a black-and-white image of the image's size: white (255) = generate, black (0) = keep.
Outpainting: paste the image onto a canvas of the model's size and paint the new border white in the mask.
More resampling (--resample-times) harmonises the filled region with the kept one, at that many times the cost.
"""


def add_arguments(parser: argparse.ArgumentParser, edit: bool = False) -> None:
    """The flags of ``ddpm inpaint``; with ``edit``, those of ``ddpm edit`` (pipelines.commands.edit): the mask
    optional, ``--strength`` 0.8 and no resampling by default."""
    from ddpm import SAMPLERS
    from ddpm.settings import EDIT_STRENGTH, INPAINT_RESAMPLE_TIMES
    from pipelines.commands.generate import add_prior_arguments

    strength, resample_times = (EDIT_STRENGTH, 1) if edit else (1.0, INPAINT_RESAMPLE_TIMES)

    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local checkpoint folder")
    parser.add_argument("--image", required=True, metavar="FILE", help="the image to complete (PNG, JPEG, ...)")
    parser.add_argument("--mask", required=not edit, default=None, metavar="FILE",
                        help="black-and-white image of the same size: white = generate, black = keep"
                             + (" (default: the whole image)" if edit else ""))
    parser.add_argument("--strength", type=float, default=strength, metavar="S",
                        help="in (0, 1]: how far the image is noised before it is denoised with the new condition "
                             "(SDEdit); runs that share of the steps; low keeps the image's layout, 1 starts from "
                             f"pure noise (default: {strength:g})")
    parser.add_argument("--out", required=True, metavar="FILE.png", help="where to write the result (PNG)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: ddim")
    parser.add_argument("--steps", type=int, default=None, metavar="S",
                        help="denoising steps (default: the sampler's, 1000/50/20 for ddpm/ddim/dpm++)")
    parser.add_argument("--eta", type=float, default=0.0, metavar="E",
                        help="DDIM noise: 0 = deterministic steps, 1 = DDPM-like (default: 0)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default: 0)")
    parser.add_argument("--class-label", type=int, default=None, metavar="C",
                        help="class id for a class-conditional model (default: unconditional)")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="what a text model paints into the mask (default: the empty prompt, unconditional)")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="what guidance steers --prompt away from (needs --guidance-scale != 1)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, metavar="W",
                        help="classifier-free guidance weight; 1 = plain conditional (default: 1)")
    add_prior_arguments(parser)
    parser.add_argument("--resample-jumps", type=int, default=1, metavar="J",
                        help="RePaint's jump length j: how many steps each resampling goes back up (default: 1)")
    parser.add_argument("--resample-times", type=int, default=resample_times, metavar="R",
                        help="RePaint's resampling count r; 1 = plain replacement, faster but biased toward "
                             f"the model's prior; cost is about R times the steps (default: {resample_times})")
    parser.add_argument("--resize", action="store_true",
                        help="stretch image and mask to the model's size instead of rejecting another size")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for models:/ URIs (default: $MLFLOW_TRACKING_URI, else .ddpm/)")


def main(args: argparse.Namespace) -> int:
    import torch

    from ddpm import checkpoint, encode_png, from_uint8, inpaint_images
    from ddpm.settings import SettingError, check_settings

    from pipelines.commands.generate import print_warnings, single_prompt
    from pipelines.commands.image_inputs import read_inputs
    from pipelines.registry import resolve_model

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: must end in .png")
    try:  # the rules of POST /inpaint and /edit, before anything is loaded
        check_settings(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                       class_label=args.class_label, guidance_scale=args.guidance_scale,
                       resample_jumps=args.resample_jumps, resample_times=args.resample_times, prompt=args.prompt,
                       negative_prompt=args.negative_prompt, strength=args.strength, prior_steps=args.prior_steps,
                       prior_guidance_scale=args.prior_guidance_scale)
    except SettingError as exc:
        raise flag_error(exc) from None
    resolved = resolve_model(args.model, args.tracking_uri)
    loaded = checkpoint.load(resolved.path, device=args.device)
    channels, size, _ = loaded.image_shape
    try:
        loaded.check_request(steps=args.steps, class_label=args.class_label, prompt=args.prompt,
                             negative_prompt=args.negative_prompt, prior_steps=args.prior_steps,
                             prior_guidance_scale=args.prior_guidance_scale)
    except SettingError as exc:
        raise flag_error(exc) from None
    print_warnings(loaded.prompt_encoder, single_prompt(args))

    image, generate = read_inputs(args.image, args.mask, size, channels, args.resize)

    try:
        known = from_uint8(image[None])  # (1, C, H, W) in [-1, 1]
        mask = torch.as_tensor(generate, dtype=torch.float32)[None, None]  # (1, 1, H, W), 1 = generate
        condition = loaded.condition(1, class_labels=args.class_label, prompts=args.prompt,
                                     negative_prompts=args.negative_prompt)
        filled = inpaint_images(loaded, [args.seed], known, mask, condition=condition, sampler=args.sampler,
                                steps=args.steps, eta=args.eta, guidance_scale=args.guidance_scale,
                                resample_jumps=args.resample_jumps, resample_times=args.resample_times,
                                strength=args.strength, prior_steps=args.prior_steps,
                                prior_guidance_scale=args.prior_guidance_scale)[0]  # (H, W, C)
    except ValueError as exc:  # e.g. steps outside [1, T], eta < 0, resample_jumps >= steps
        raise UserError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(filled))
    source = f"{resolved.name} version {resolved.version}" if resolved.name else str(resolved.path)
    print(f"wrote {out} ({size}x{size}, {int(generate.sum())} of {size * size} pixels generated) from {source}")
    return 0
