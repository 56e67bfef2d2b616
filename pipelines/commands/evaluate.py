"""``ddpm evaluate``: how good are a model's samples? FD-cls beside its floor, precision/recall, FID, a sampler report.

Parses and validates the flags, then calls :func:`pipelines.evaluate.quality.evaluate`, which says what is measured
and how.
"""

from __future__ import annotations

import argparse

from pipelines.errors import UserError
from pipelines.evaluate.quality import METRICS, SCALE_FROM, EvalSettings, evaluate

HELP = "measure a model's sample quality: FD-cls beside its real-vs-real floor, precision/recall, FID, sampler report"
EXAMPLE = """example:
  ddpm evaluate --model models:/digits@production --data .ddpm/data/digits --num-samples 500
  ddpm evaluate --model .ddpm/local/digits --data digits --report --out .ddpm/eval/digits
  ddpm evaluate --model models:/cifar@staging --data s3://bucket/processed/cifar10 --num-samples 10000 \\
      --inception-weights ~/models/pt_inception-2015-12-05.pt --metric fid --tracking-uri http://mlflow:5000

--data is a preprocessed dataset (manifest.json + shards), or `digits` for scikit-learn's digits exactly as
`ddpm train-local` reads them. FD-cls trains a small classifier on the data's labels once (cached in .ddpm/).
Numbers go to MLflow when --tracking-uri, --run-id or $MLFLOW_TRACKING_URI is given; files go to --out.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddpm import SAMPLERS
    from pipelines.actors import add_actor_arguments

    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local checkpoint folder")
    parser.add_argument("--data", required=True, metavar="URI",
                        help="a preprocessed dataset (s3://... or a folder with manifest.json), or 'digits'")
    parser.add_argument("--num-samples", type=int, default=EvalSettings.num_samples, metavar="N",
                        help="samples, reference and held-out images per comparison (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=EvalSettings.sampler,
                        help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=EvalSettings.steps, metavar="S", help="default: %(default)s")
    parser.add_argument("--guidance-scale", type=float, default=EvalSettings.guidance_scale, metavar="W",
                        help="classifier-free guidance for class-conditional models (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=EvalSettings.seed, metavar="K",
                        help="sample i uses seed K+i (default: %(default)s)")
    parser.add_argument("--weights", choices=("ema", "model"), default=EvalSettings.weights,
                        help="which weights to sample with (default: %(default)s)")
    parser.add_argument("--metric", choices=METRICS, default="fd_cls",
                        help="the headline number; fid needs --inception-weights (default: %(default)s)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="TorchScript Inception-v3 file (e.g. pt_inception-2015-12-05.pt): adds FID")
    parser.add_argument("--report", action="store_true",
                        help="compare DDPM-1000, DDIM-10/20/50/100 and DPM-Solver++-10/20 (ignores --sampler/--steps)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write evaluation.json, sample grids, report")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server to log to (default: $MLFLOW_TRACKING_URI; unset: no logging)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run (e.g. the training run)")
    parser.add_argument("--experiment", default="evaluation", help="MLflow experiment for a new run")
    parser.add_argument("--device", default="cpu", help="torch device in this process (default: cpu)")
    scale = parser.add_argument_group(
        f"at scale (from {SCALE_FROM:,} samples, more than the data's halves hold, or when asked with "
        f"--num-actors/--use-gpu): samples and features on Ray Data actors")
    add_actor_arguments(scale, "sampler (and feature) actors")


def main(args: argparse.Namespace) -> int:
    import os

    if args.metric == "fid" and not args.inception_weights:
        raise UserError("--metric fid needs Inception-v3 weights: pass --inception-weights PATH "
                        "(a TorchScript file such as pt_inception-2015-12-05.pt)")
    if args.num_samples < 2:
        raise UserError(f"--num-samples must be at least 2, got {args.num_samples}")
    settings = EvalSettings(args.num_samples, args.sampler, args.steps, args.guidance_scale, args.seed, args.weights)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.cpus_per_actor < 1:
        raise UserError(f"--cpus-per-actor must be at least 1, got {args.cpus_per_actor}")
    evaluations, report = evaluate(args.model, args.data, settings, report=args.report,
                                   inception_weights=args.inception_weights, out=args.out,
                                   tracking_uri=tracking_uri, run_id=args.run_id, experiment=args.experiment,
                                   device=args.device, num_actors=args.num_actors,
                                   cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu)
    if report is not None:
        print(report.markdown, end="")
    else:
        m = evaluations[0].metrics
        print(f"{settings.row}: {args.metric} {m[args.metric]:.4f} (floor {m[args.metric + '_floor']:.4f}, "
              f"ratio {m[args.metric + '_ratio']:.2f}), precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
              f"{m['images_per_s']:.1f} images/s, n={settings.num_samples}")
    if args.out:
        print(f"wrote {args.out}/evaluation.json")
    return 0
