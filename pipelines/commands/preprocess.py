"""``ddpm preprocess``: the command line of :func:`pipelines.data.preprocess.preprocess` (image files -> shards)."""

from __future__ import annotations

import argparse

HELP = "decode, crop and resize a bucket of images into Parquet shards with a manifest (Ray Data)"
EXAMPLE = """example:
  ddpm data digits --output s3://my-bucket/raw/digits
  ddpm preprocess --input s3://my-bucket/raw/digits --output s3://my-bucket/processed/digits \\
      --resolution 16 --channels 1 --small upscale
  ddpm data shapes --output s3://my-bucket/raw/shapes
  ddpm preprocess --input s3://my-bucket/raw/shapes --output s3://my-bucket/processed/shapes \
      --resolution 32 --captions required

  The output holds manifest.json (counts, class names, skipped objects and why, fingerprint) and Parquet shards
  with columns image (uint8 H*W*C bytes), label, key and sha256, plus caption with --captions. Unreadable
  objects are skipped and reported, not fatal. A local folder works in place of either URI.

  --captions reads each image's caption from NAME.txt beside it, or from a metadata.jsonl of file_name + text
  in its folder or above (metadata.jsonl wins when both exist). An image without a caption is kept with the
  empty caption (--captions, i.e. --captions keep) or quarantined (--captions required); both are listed in
  manifest.json. A caption that is not UTF-8 or is over 1,000 bytes quarantines its image.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipelines.data.captions import POLICIES
    from pipelines.data.preprocess import SMALL_POLICIES

    parser.add_argument("--input", required=True, metavar="URI", help="images: s3://bucket/prefix or a local folder")
    parser.add_argument("--output", required=True, metavar="URI", help="where shards and manifest.json go")
    parser.add_argument("--resolution", type=int, required=True, metavar="N", help="side of the square output images")
    parser.add_argument("--channels", type=int, choices=[1, 3], default=3, help="1 = grey, 3 = RGB (default: 3)")
    parser.add_argument("--labels-from-dirs", action=argparse.BooleanOptionalAction, default=True,
                        help="label each image by its top-level folder (default: on)")
    parser.add_argument("--small", choices=SMALL_POLICIES, default="skip",
                        help="images smaller than the resolution: skip and report them, or upscale (default: skip)")
    parser.add_argument("--captions", nargs="?", const="keep", default=None, choices=POLICIES,
                        help="read captions into a caption column; an image without one is kept with the empty "
                             "caption (keep, the default when the flag is given) or quarantined (required)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="images per Ray task and per shard (default: about 4 tasks per CPU, <= 64 MiB each)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    from pipelines.data.dataset import MANIFEST
    from pipelines.data.preprocess import preprocess

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    manifest = preprocess(
        args.input, args.output, resolution=args.resolution, channels=args.channels,
        labels_from_dirs=args.labels_from_dirs, small=args.small, captions=args.captions, batch_size=args.batch_size,
        endpoint_url=args.endpoint_url,
    )
    counts, (h, w, c) = manifest["counts"], manifest["image_shape"]
    classes = f", {len(manifest['class_names'])} classes" if manifest["class_names"] else ""
    print(f"wrote {counts['rows']} images ({h}x{w}x{c}{classes}) to {args.output} "
          f"in {len(manifest['shards'])} shards; fingerprint {manifest['fingerprint'][:12]}")
    if "captions" in manifest:  # a captioned run
        found, missing = manifest["captions"]["found"], len(manifest["captions"]["uncaptioned"])
        fate = "quarantined" if args.captions == "required" else "kept with the empty caption"
        print(f"captions: {found['txt']} from NAME.txt, {found['metadata.jsonl']} from metadata.jsonl; "
              f"{missing} images without one ({fate})")
    elif counts.get("sidecars"):
        print(f"left {counts['sidecars']} caption or manifest files unread; pass --captions to read captions")
    if manifest["skipped"]:
        print(f"skipped {counts['skipped']} objects (all listed in {MANIFEST}):")
        for item in manifest["skipped"][:5]:
            print(f"  {item['key']}: {item['reason']}")
        if counts["skipped"] > 5:
            print(f"  ... and {counts['skipped'] - 5} more")
    return 0
