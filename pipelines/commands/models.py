"""``ddpm models``: list registered models and their versions, or point an alias (staging, production) at a version
(a DDPM's or an autoencoder's). The registry itself is :mod:`pipelines.registry`."""

from __future__ import annotations

import argparse

from pipelines.registry import ALIASES, CANARY_TAG, list_models, promote

HELP = "list registered models and their versions, or point an alias (staging, production) at a version"
EXAMPLE = """example:
  ddpm models list                         # every registered model, its latest version and aliases
  ddpm models list digits                  # the versions of one model, with lineage tags and metrics
  ddpm models promote digits 3 --alias production
  ddpm models promote photos-ae 1 --alias production   # an autoencoder, for ddpm encode's --autoencoder
  ddpm generate --model models:/digits@production --num-images 16 --out grid.png

The registry is the tracking server's: $MLFLOW_TRACKING_URI, or the embedded store in .ddpm/ when unset.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    listing = actions.add_parser("list", help="registered models, or the versions of MODEL")
    listing.add_argument("model", nargs="?", help="a registered model's name")
    promoting = actions.add_parser("promote", help="point an alias at a version")
    promoting.add_argument("model", help="a registered model's name")
    promoting.add_argument("version", help="the version number to promote")
    promoting.add_argument("--alias", required=True, choices=ALIASES, help="the alias to set")
    for action in (listing, promoting):
        action.add_argument("--tracking-uri", default=None, metavar="URI",
                            help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")


def main(args: argparse.Namespace) -> int:
    if args.action == "promote":
        promote(args.model, args.version, args.alias, args.tracking_uri)
        print(f"models:/{args.model}@{args.alias} -> version {args.version}")
        return 0
    rows = list_models(args.model, args.tracking_uri)
    if args.model is None:
        print(f"{'model':<30} {'latest':>6}  aliases")
        for r in rows:
            aliases = ", ".join(f"{a}={v}" for a, v in sorted(r["aliases"].items()))
            print(f"{r['name']:<30} {r['latest'] or '-':>6}  {aliases}")
        return 0
    print(f"{'version':>7}  {'aliases':<20} {'run id':<32}  lineage")
    for r in rows:
        tags = {k: v for k, v in r["tags"].items() if not k.startswith("canary.")}  # the canary's data is long
        if CANARY_TAG in r["tags"]:
            tags["canary"] = "recorded"
        lineage = "  ".join(f"{k}={tags[k][:12] if k.endswith(('fingerprint', 'hash')) else tags[k]}"
                            for k in sorted(tags))
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['run_id'] or '-':<32}  {lineage}")
    return 0
