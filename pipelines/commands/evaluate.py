"""``ddpm evaluate``: how good are a model's samples? FD-cls beside its floor, precision/recall, FID, a sampler report;
for a text model also alignment with its prompts, a CLIP score and a guidance sweep.

Parses and validates the flags, then calls :func:`pipelines.evaluate.quality.evaluate`, which says what is measured
and how.
"""

from __future__ import annotations

import argparse

from pipelines.errors import UserError
from pipelines.evaluate.quality import METRICS, SCALE_FROM, EvalSettings, evaluate

HELP = ("measure a model's sample quality: FD-cls beside its real-vs-real floor, precision/recall, FID, sampler "
        "report; a text model's alignment and CLIP score")
EXAMPLE = """example:
  ddpm evaluate --model models:/digits@production --data .ddpm/data/digits --num-samples 500
  ddpm evaluate --model .ddpm/local/digits --data digits --report --out .ddpm/eval/digits
  ddpm evaluate --model models:/cifar@staging --data s3://bucket/processed/cifar10 --num-samples 10000 \\
      --inception-weights ~/models/pt_inception-2015-12-05.pt --metric fid --tracking-uri http://mlflow:5000
  ddpm evaluate --model models:/shapes-text@production --data .ddpm/data/shapes-text --guidance-scale 3 \
      --clip models:/shapes-clip/1 --guidance-sweep 1,2,3,5,7 --out .ddpm/eval/shapes-text

--data is a preprocessed dataset (manifest.json + shards), or `digits` for scikit-learn's digits exactly as
`ddpm train-local` reads them. FD-cls trains a small classifier on the data's labels once (cached in .ddpm/).
Numbers go to MLflow when --tracking-uri, --run-id or $MLFLOW_TRACKING_URI is given; files go to --out.
A text model is evaluated on captioned data (ddpm preprocess --captions): FD-cls prompts it with the held-out
captions, alignment reads its images for fixed prompts of the shapes grammar (align_seen_*, align_held_out_*), and a
registered CLIP scores image-prompt similarity (clip_score, beside clip_score_real for real images).
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
    text = parser.add_argument_group("text models")
    text.add_argument("--clip", default=None, metavar="URI",
                      help="the CLIP for the CLIP score, models:/NAME/VERSION or a folder (default: the CLIP the "
                           "model's text encoder came from, when its checkpoint names one; else no CLIP score)")
    text.add_argument("--images-per-prompt", type=int, default=None, metavar="N",
                      help="images per evaluation prompt for alignment (default: 8)")
    text.add_argument("--guidance-sweep", default=None, metavar="W,W,...",
                      help="evaluate at each guidance scale (e.g. 1,2,3,5,7) and plot alignment against FD-cls "
                           "(ignores --guidance-scale)")
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
    sweep = parse_sweep(args.guidance_sweep) if args.guidance_sweep is not None else None
    if sweep and args.report:
        raise UserError("--guidance-sweep and --report are two reports: ask for one at a time")
    if args.images_per_prompt is not None and args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}")
    settings = EvalSettings(args.num_samples, args.sampler, args.steps, args.guidance_scale, args.seed, args.weights)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.cpus_per_actor < 1:
        raise UserError(f"--cpus-per-actor must be at least 1, got {args.cpus_per_actor}")
    evaluations, report = evaluate(args.model, args.data, settings, report=args.report,
                                   inception_weights=args.inception_weights, out=args.out,
                                   tracking_uri=tracking_uri, run_id=args.run_id, experiment=args.experiment,
                                   device=args.device, num_actors=args.num_actors,
                                   cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu, clip=args.clip,
                                   images_per_prompt=args.images_per_prompt, guidance_sweep=sweep)
    if report is not None:
        print(report.markdown, end="")
    else:
        m = evaluations[0].metrics
        print(f"{settings.row}: {args.metric} {m[args.metric]:.4f} (floor {m[args.metric + '_floor']:.4f}, "
              f"ratio {m[args.metric + '_ratio']:.2f}), precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
              f"{m['images_per_s']:.1f} images/s, n={settings.num_samples}")
        text = [f"{k} {v:.3f}" for k, v in m.items() if k.startswith("align_")]
        if "clip_score" in m:
            text.append(f"clip_score {m['clip_score']:.2f} (real images {m['clip_score_real']:.2f})")
        if text:
            print(f"{settings.row}: " + ", ".join(text))
    if args.out:
        print(f"wrote {args.out}/evaluation.json")
    return 0


def parse_sweep(text: str) -> list[float]:
    """``--guidance-sweep 1,2,3,5,7`` -> [1.0, 2.0, 3.0, 5.0, 7.0]; each scale checked like --guidance-scale."""
    from ddpm.settings import SettingError, check_settings

    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--guidance-sweep {text!r}: a comma-separated list of guidance scales, e.g. 1,2,3,5,7") \
            from None
    for w in scales:
        try:
            check_settings(guidance_scale=w, prompt="an evaluation prompt")  # every one is non-empty
        except SettingError as exc:
            raise UserError(f"--guidance-sweep {w:g}: {exc.reason}") from None
    if len(set(scales)) != len(scales):
        raise UserError(f"--guidance-sweep {text!r}: a scale appears twice")
    return scales
