"""``ddpm generate``: images from a registered model (or a checkpoint folder), one seed per image.

Image ``i`` is drawn from seed ``(K + i) mod 2^32`` alone, through the core's one path (``ddpm.generate_images``), so
the same command gives the same images whatever the batch, ``--seed 5 --num-images 1`` is image 5 of ``--seed 0
--num-images 8``, and ``POST /generate`` returns the same pixels for the same seed and settings.

A text model takes ``--prompt`` (and ``--negative-prompt``), or ``--prompts FILE`` for a folder or s3:// output:
``--num-images`` per prompt, image j of prompt k from seed ``(K + j) mod 2^32`` (``pipelines.generate.prompts``),
the bytes of a ``--prompt`` run with that prompt and seed.

Two outputs: ``--out grid.png`` / ``images.npz`` samples in this process and writes one file; ``--output`` a folder or
an ``s3://`` prefix runs the batch job (:mod:`pipelines.generate.batch`): Ray Data sampler actors write shards of PNG
files or Parquet rows with a manifest, at any N, resumable, with the same pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.errors import UserError, flag_error
from pipelines.generate.progress import ProgressLine

HELP = ("generate images from a model (models:/NAME@ALIAS, models:/NAME/VERSION or a folder) into a PNG grid, an "
        ".npz, or shards on Ray Data actors")
EXAMPLE = """example:
  ddpm generate --model models:/digits@production --num-images 64 --sampler ddim --steps 50 --seed 0 --out grid.png
  ddpm generate --model models:/digits/3 --num-images 100 --class-label 7 --guidance-scale 2 --out sevens.npz
  ddpm generate --model .ddpm/local/digits --num-images 16 --sampler dpm++ --steps 20 --out grid.png
  ddpm generate --model models:/cifar@production --num-images 50000 --output s3://bucket/samples/cifar-50k \\
      --labels balanced --format parquet --use-gpu          # one sampler actor per GPU of the Ray cluster

--out ending in .png writes one grid; .npz writes the array `images`, uint8 of shape (N, H, W, C); both sample in
this process. Any other --out/--output is a folder or s3:// prefix: Ray Data actors write images/seed-000123.png files
(or data/*.parquet rows: image bytes, seed, label) in shards, then manifest.json (model, settings, seeds,
fingerprint). Rerunning the same command resumes: only shards not yet committed are generated.

--prompts FILE: one prompt a line, or JSONL of {"prompt": ..., "negative_prompt": ...}; each prompt gets
--num-images images, image j of prompt k (counting prompts from 0) from seed K+j, written as
images/p<k, 5 digits>-seed-<K+j>.png (Parquet: key and caption columns). A prompt past the text encoder's context
is truncated as CLIP does, and words its tokenizer never saw are kept as pieces: both are printed as warnings.
"""

OUTPUT_SUFFIXES = (".png", ".npz")
# Names that look like a file the user meant, not a folder: refused rather than turned into a folder of shards.
FILE_LIKE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".npy", ".parquet", ".json")


MAX_GRID_IMAGES = 4096  # a 64 x 64 grid; more is no longer a picture anyone looks at
MEMORY_SHARE = 0.25  # the largest share of this machine's memory one output file may need


def check_fits_in_memory(num_images: int, image_shape: tuple[int, int, int], out: Path) -> None:
    """Refuse, before sampling, an output that cannot be held: one file holds every image in memory at once."""
    c, h, w = image_shape
    if out.suffix == ".png" and num_images > MAX_GRID_IMAGES:
        raise UserError(f"--num-images {num_images}: a PNG grid holds at most {MAX_GRID_IMAGES} images; "
                        f"write an .npz, or give --out a folder or s3:// prefix for one PNG per image")
    need = num_images * c * h * w
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > MEMORY_SHARE * have:
        raise UserError(f"--num-images {num_images}: {need / 2**30:.1f} GiB of pixels in one file, more than "
                        f"{MEMORY_SHARE:.0%} of this machine's {have / 2**30:.0f} GiB; give --out a folder or "
                        f"s3:// prefix instead: shards on Ray Data actors, in bounded memory at any N")


def add_arguments(parser: argparse.ArgumentParser, vary: bool = False) -> None:
    """The flags of ``ddpm generate``; with ``vary``, those of ``ddpm vary`` (pipelines.commands.vary): ``--image``
    required, and ``--resize``."""
    from ddpm import FORWARD_ROWS, SAMPLERS
    from pipelines.actors import add_actor_arguments
    from pipelines.generate.job import FORMATS, SHARD_IMAGES

    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local checkpoint folder")
    if vary:
        parser.add_argument("--image", required=True, metavar="FILE",
                            help="the image to vary (PNG, JPEG, ...), of the size the model's CLIP reads")
        parser.add_argument("--resize", action="store_true",
                            help="stretch the image(s) to the CLIP's size instead of rejecting another size")
        parser.add_argument("--toward", default=None, metavar="FILE",
                            help="a second image: vary the slerp of the two images' CLIP embeddings (unCLIP's "
                                 "interpolations)")
        parser.add_argument("--mix", type=float, default=None, metavar="T",
                            help="with --toward: 0 = the image's embedding, 1 = the second's (default: 0.5)")
    parser.add_argument("--num-images", type=int, default=16, metavar="N",
                        help="how many images, per prompt with --prompts (default: 16)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: ddim")
    parser.add_argument("--steps", type=int, default=None, metavar="S",
                        help="denoising steps (default: the sampler's, 1000/50/20 for ddpm/ddim/dpm++)")
    parser.add_argument("--eta", type=float, default=0.0, metavar="E",
                        help="DDIM's noise: 0 deterministic, 1 DDPM-like (default: 0)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="image i uses seed K+i (default: 0)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-label", type=int, default=None, metavar="C",
                        help="class id for a class-conditional model (default: unconditional)")
    labels.add_argument("--labels", choices=("balanced",), default=None,
                        help="balanced: image i gets class i mod (number of classes), equal counts per class")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="what a text model draws (default: the empty prompt, unconditional)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="a text model's prompts, one a line or JSONL ({\"prompt\": ..., \"negative_prompt\": "
                             "...}), --num-images each; for a folder or s3:// output")
    parser.add_argument("--negative-prompt", default=None, metavar="TEXT",
                        help="what guidance steers --prompt away from (needs --guidance-scale != 1)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, metavar="W",
                        help="classifier-free guidance weight; 1 = plain conditional (default: 1)")
    add_prior_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=FORWARD_ROWS, metavar="B",
                        help="rows per forward pass (the endpoint's micro_batch); the same pixels at the same value "
                             "(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for a .png/.npz output, e.g. cuda "
                                                        "(default: cpu)")
    parser.add_argument("--out", "--output", dest="out", required=True, metavar="URI",
                        help="grid.png or images.npz (this process), or a folder / s3:// prefix (Ray Data shards)")
    shards = parser.add_argument_group("folder or s3:// output (Ray Data)")
    shards.add_argument("--format", choices=FORMATS, default="png",
                        help="png: images/seed-000123.png files; parquet: data/shard-*.parquet rows of image bytes, "
                             "seed and label, readable as a dataset (default: png)")
    add_actor_arguments(shards)
    shards.add_argument("--shard-size", type=int, default=SHARD_IMAGES, metavar="S",
                        help="images per shard, the unit of work and of resumption (default: %(default)s)")
    shards.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for models:/ URIs (default: $MLFLOW_TRACKING_URI, else .ddpm/)")


def add_prior_arguments(parser: argparse.ArgumentParser) -> None:
    """A whole unCLIP model's prior settings (ddpm unclip), for every command that takes a prompt."""
    from ddpm.settings import PRIOR_GUIDANCE_SCALE, PRIOR_STEPS

    parser.add_argument("--prior-steps", type=int, default=None, metavar="S",
                        help=f"a whole unCLIP model's prior: DDIM steps from the prompt to its image embedding "
                             f"(default: {PRIOR_STEPS})")
    parser.add_argument("--prior-guidance-scale", type=float, default=None, metavar="W",
                        help=f"a whole unCLIP model's prior: classifier-free guidance weight (default: "
                             f"{PRIOR_GUIDANCE_SCALE:g})")


def is_file_output(out: str) -> bool:
    """``grid.png`` / ``images.npz``: one file, sampled in this process; anything else is a folder or prefix."""
    name = out.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    if out.endswith("/") or "://" in out and not suffix:
        return False
    if suffix in OUTPUT_SUFFIXES and not out.endswith("/"):
        return True
    if suffix in FILE_LIKE_SUFFIXES:
        raise UserError(f"--out {out}: a file name must end in .png (a grid) or .npz (an array); for one image "
                        f"file per seed give a folder or an s3:// prefix")
    return False


def main(args: argparse.Namespace) -> int:
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    if args.prompts is not None and (args.prompt is not None or args.class_label is not None or args.labels):
        raise UserError("--prompts: gives every image its prompt; leave out --prompt, --class-label and --labels")
    if args.prompts is not None and args.negative_prompt is not None:
        raise UserError("--negative-prompt: goes with --prompt; in a --prompts file give each prompt its own as "
                        "JSONL {\"prompt\": ..., \"negative_prompt\": ...}")
    mix = getattr(args, "mix", None)  # ddpm vary's
    if mix is not None and (getattr(args, "toward", None) is None or not 0 <= mix <= 1):
        raise UserError(f"--mix {mix}: " + ("in [0, 1]" if args.toward is not None else "goes with --toward FILE"))
    if is_file_output(args.out):
        if args.prompts is not None:
            raise UserError(f"--prompts: writes one image per prompt and seed; give --out a folder or s3:// prefix, "
                            f"not {args.out}")
        return generate_file(args)
    if getattr(args, "image", None) is not None:
        raise UserError(f"--out {args.out}: variations are written to one file here (grid.png or images.npz); "
                        f"the Ray Data batch job takes no --image yet")
    return generate_shards(args)


def single_prompt(args: argparse.Namespace):
    """--prompt (and --negative-prompt) as the job's Prompts, or none."""
    from pipelines.generate.prompts import Prompts

    return Prompts.none() if args.prompt is None else Prompts.one(args.prompt, args.negative_prompt)


def print_warnings(tokenizer, prompts, flag: str = "--prompt") -> None:
    """What tokenizing the prompts lost, one line each on stderr (a text model only)."""
    from pipelines.generate.prompts import prompt_warnings

    if tokenizer is not None:
        for line in prompt_warnings(tokenizer, prompts, flag):
            print(line, file=sys.stderr)


def generate_shards(args: argparse.Namespace) -> int:
    """A folder or s3:// prefix: the Ray Data batch job (pipelines.generate.batch)."""
    from ddpm.settings import SettingError, check_settings
    from pipelines.generate.batch import generate_to
    from pipelines.generate.job import Labels, Plan, Sampling
    from pipelines.generate.model_source import ModelSource
    from pipelines.generate.prompts import read_prompts

    try:  # the flags alone first, before the registry is asked
        check_settings(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                       class_label=0 if args.labels else args.class_label,
                       guidance_scale=args.guidance_scale if args.prompts is None else 1.0,  # the file's, below
                       prompt=args.prompt, negative_prompt=args.negative_prompt)
    except SettingError as exc:
        raise flag_error(exc) from None
    if args.prompts is not None:
        prompts = read_prompts(args.prompts, args.guidance_scale, args.endpoint_url)
        plan = Plan(args.seed, args.num_images * len(prompts), args.shard_size, per_prompt=args.num_images)
    else:
        prompts, plan = single_prompt(args), Plan(args.seed, args.num_images, args.shard_size)
    if args.shard_size < 1 or args.cpus_per_actor < 1:
        raise UserError("--shard-size and --cpus-per-actor must be at least 1")
    if args.device != "cpu":
        raise UserError("--device applies to .png/.npz outputs; for a folder or s3:// prefix use --use-gpu "
                        "(one GPU per sampler actor)")
    source = ModelSource.resolve(args.model, args.tracking_uri)
    if args.labels == "balanced":
        labels = Labels.balanced(source.num_classes) if source.num_classes else Labels("balanced")
    elif args.class_label is not None:
        labels = Labels.one(args.class_label)
    else:
        labels = Labels.none()
    sampling = Sampling(args.sampler, args.steps, args.eta, args.guidance_scale, args.batch_size, args.prior_steps,
                        args.prior_guidance_scale)
    print_warnings(source.tokenizer, prompts, "--prompt" if args.prompts is None else f"--prompts {args.prompts}")
    manifest = generate_to(args.out, source, plan, sampling, labels, fmt=args.format, num_actors=args.num_actors,
                           cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu, endpoint_url=args.endpoint_url,
                           log=lambda line: print(line, file=sys.stderr), prompts=prompts)
    where = ("images/p*-seed-*.png" if plan.per_prompt else "images/seed-*.png") if args.format == "png" \
        else "data/*.parquet"
    name = f"{source.name} version {source.version}" if source.name else str(source.path)
    print(f"wrote {manifest['counts']['rows']:,} images ({'x'.join(map(str, source.image_shape))}) from {name} to "
          f"{args.out} ({where}, manifest.json); fingerprint {manifest['fingerprint'][:16]}")
    return 0


def generate_file(args: argparse.Namespace) -> int:
    """grid.png or images.npz: every image in this process's memory, sampled here."""
    from ddpm import checkpoint, encode_png, generate_images, image_seeds, make_grid
    from ddpm.graphs import graphed_forward
    from ddpm.settings import SettingError, check_settings
    from pipelines.registry import resolve_model

    out = Path(args.out)
    if args.labels:
        raise UserError("--labels balanced is for a folder or s3:// output; give --class-label C for a grid or .npz")
    settings = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                    class_label=args.class_label, guidance_scale=args.guidance_scale, prompt=args.prompt,
                    negative_prompt=args.negative_prompt, image=getattr(args, "image", None),
                    prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance_scale)
    try:
        check_settings(**settings)  # the rules of POST /generate and the pyfunc model, before anything is loaded
    except SettingError as exc:
        raise flag_error(exc) from None
    resolved = resolve_model(args.model, args.tracking_uri)
    loaded = checkpoint.load(resolved.path, device=args.device)
    image = getattr(args, "image", None)  # ddpm vary's
    try:
        loaded.check_request(steps=args.steps, class_label=args.class_label, prompt=args.prompt,
                             negative_prompt=args.negative_prompt, image=image, prior_steps=args.prior_steps,
                             prior_guidance_scale=args.prior_guidance_scale)
    except SettingError as exc:
        raise flag_error(exc) from None
    check_fits_in_memory(args.num_images, loaded.image_shape, out)
    print_warnings(loaded.prompt_encoder, single_prompt(args))
    embedding = None
    if image is not None:  # unCLIP's variations: the image's CLIP embedding through the decoder, a seed each
        from pipelines.commands.image_inputs import read_inputs

        cfg = loaded.image_encoder.model.config
        image, _ = read_inputs(args.image, None, cfg.image_size, cfg.in_channels, args.resize)  # (H, W, C) uint8
        if args.toward is not None:  # the slerp of the two images' embeddings, the one every image varies
            import numpy as np

            from ddpm import from_uint8
            from ddpm.conditioning import embed_images, slerp

            toward, _ = read_inputs(args.toward, None, cfg.image_size, cfg.in_channels, args.resize)
            z = embed_images(loaded.image_encoder.model, from_uint8(np.stack([image, toward])))  # (2, E)
            embedding, image = slerp(z[0], z[1], 0.5 if args.mix is None else args.mix), None
    try:
        # The endpoint's network call (a CUDA graph on a GPU, the fixed-shape forward on the CPU): the same bytes.
        images = generate_images(loaded, image_seeds(args.seed, args.num_images),
                                 condition=loaded.condition(args.num_images, class_labels=args.class_label,
                                                            prompts=args.prompt,
                                                            negative_prompts=args.negative_prompt, images=image,
                                                            image_embeddings=embedding),
                                 sampler=args.sampler, steps=args.steps, eta=args.eta,
                                 guidance_scale=args.guidance_scale, prior_steps=args.prior_steps,
                                 prior_guidance_scale=args.prior_guidance_scale,
                                 forward=graphed_forward(loaded.model, args.batch_size),
                                 progress=ProgressLine(args.num_images))
    except ValueError as exc:  # e.g. steps outside [1, T]
        raise UserError(str(exc)) from None
    if out.suffix == ".png":
        data = encode_png(make_grid(images))
    else:
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images)
        data = buffer.getvalue()
    from pipelines import storage

    storage.write_bytes(args.out, data)  # a local file or an s3:// object, written whole
    out = args.out
    source = f"{resolved.name} version {resolved.version}" if resolved.name else str(resolved.path)
    print(f"wrote {len(images)} images ({'x'.join(map(str, images.shape[1:]))}) from {source} to {out}")
    return 0
