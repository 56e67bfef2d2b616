"""``ddpm encode``: the command line of :func:`pipelines.data.encode.encode` (a processed dataset -> latents)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "encode a processed dataset into an autoencoder's latents with Ray Data actors (latent diffusion)"
EXAMPLE = """example:
  ddpm preprocess --input s3://my-bucket/raw/photos --output s3://my-bucket/processed/photos \\
      --resolution 64 --channels 3
  ddpm encode --data s3://my-bucket/processed/photos --autoencoder models:/photos-ae@production \\
      --output s3://my-bucket/latents/photos --flip

  The output holds Parquet shards of float32 latents (h, w, c), label, key and sha256, a copy of the autoencoder
  (autoencoder/) and manifest.json, written last. --flip also stores each image's left-right mirror (2N rows).
  --autoencoder also takes a local folder: ours, or a downloaded diffusers AutoencoderKL (converted).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.data.encode import CPUS_PER_ACTOR, DEFAULT_BATCH_SIZE

    parser.add_argument("--data", required=True, metavar="URI",
                        help="a processed dataset (the --output of ddpm preprocess): s3://bucket/prefix or a folder")
    parser.add_argument("--autoencoder", required=True, metavar="URI",
                        help="models:/NAME/VERSION, models:/NAME@ALIAS, or a local autoencoder folder (ours or a "
                             "diffusers AutoencoderKL)")
    parser.add_argument("--output", required=True, metavar="URI", help="where the latent shards and manifest go")
    parser.add_argument("--num-actors", type=int, default=None, metavar="A",
                        help=f"encoder actors (default: one per GPU with --use-gpu, else one per {CPUS_PER_ACTOR} "
                             f"CPUs of the cluster); each loads the autoencoder once and gets its share of the CPUs "
                             f"as torch threads")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="B",
                        help=f"images per encoder call, fixed (the last chunk is padded), so that a latent never "
                             f"depends on its batch-mates (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--flip", action="store_true",
                        help="also store each image's left-right mirror's latent (2N rows): flips cannot be applied "
                             "to latents at training time")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server for a models:/ URI (default: $MLFLOW_TRACKING_URI, else the embedded "
                             "store)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    from pipelines.data.encode import encode

    manifest = encode(args.data, args.autoencoder, args.output, num_actors=args.num_actors, use_gpu=args.use_gpu,
                      batch_size=args.batch_size, flip=args.flip, tracking_uri=args.tracking_uri,
                      endpoint_url=args.endpoint_url)
    ae: dict[str, Any] = manifest["autoencoder"]
    which = f"{ae['name']} version {ae['version']}" if ae["name"] else ae["uri"]
    print(f"wrote {manifest['counts']['rows']} latents ({'x'.join(map(str, manifest['image_shape']))}) of {which} "
          f"to {args.output} in {len(manifest['shards'])} shards; fingerprint {manifest['fingerprint'][:12]}")
    return 0
