"""unCLIP (prior + decoder) against a direct text-conditioned model on the same captioned shapes, the same prompts and
the same evaluation: Ramesh et al. 2022's claims, that the two stages give more diverse images at similar fidelity
and alignment, and bind attributes to objects worse ("a red cube on top of a blue cube").

For each model (a registered version or a checkpoint folder), through the core's one generation path:

- FD-cls, its floor ratio, precision and recall on ``--samples`` images prompted with held-out captions
  (``ddpm evaluate``'s numbers, ``pipelines.evaluate.quality.evaluate_model``);
- alignment on the fixed evaluation prompts x ``--images-per-prompt`` (the shapes reader), split into one-object and
  two-object prompts, seen and held-out compositions: the two-object rows are the binding test;
- diversity for a fixed prompt: ``--diversity-seeds`` images of each of the one-object seen prompts, the mean
  pairwise Euclidean distance of their FD-cls classifier features, averaged over prompts; beside it the same number
  for the real images of the dataset that carry that caption (position and jitter vary there too).

    .venv/bin/python benchmarks/unclip_vs_text.py --model shapes-unclip=models:/shapes-unclip/1 \\
        --model shapes-text=models:/shapes-text/1 --data .ddpm/data/shapes [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def pairwise_mean(features: np.ndarray) -> float:
    """Mean Euclidean distance over the n (n - 1) / 2 pairs of rows of (n, D) ``features``."""
    d = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    n = len(features)
    return float(d[np.triu_indices(n, 1)].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=URI")
    parser.add_argument("--data", required=True)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--diversity-seeds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ddpm import checkpoint, generate_images, image_seeds
    from pipelines.evaluate import alignment
    from pipelines.evaluate.classifier import split
    from pipelines.evaluate.quality import EvalSettings, evaluate_model, prepare_reference, text_captions
    from pipelines.evaluate.real import RealData, load_data
    from pipelines.evaluate.text_eval import prepare_text, prompt_rows
    from pipelines.registry import resolve_model

    models = dict(item.split("=", 1) for item in args.model)
    first = resolve_model(next(iter(models.values())), args.tracking_uri).path
    side = checkpoint.load(first).image_shape[1]
    images, labels = load_data(args.data, side)
    captions = text_captions(args.data)
    reference = prepare_reference(images, labels, num_samples=args.samples, captions=captions, log=lambda _: None)
    text = prepare_text(RealData.in_memory(images, labels), captions, reference.fingerprint,
                        split(len(images))[1][:args.samples], images_per_prompt=args.images_per_prompt,
                        checkpoint_path=first, tracking_uri=args.tracking_uri, log=lambda _: None)
    settings = EvalSettings(num_samples=args.samples, sampler="ddim", steps=args.steps,
                            guidance_scale=args.guidance, seed=args.seed)
    features = reference.extractors["fd_cls"]
    one_seen = [p for p in alignment.evaluation_prompts() if alignment.canonical(p)["count"] == "one"
                and not alignment.is_held_out(p)]
    real_diversity = [pairwise_mean(features(images[[i for i, c in enumerate(captions) if c == p]]))
                      for p in one_seen if sum(c == p for c in captions) >= 2]
    print(f"data {args.data}: {len(images)} images; {args.samples} samples, DDIM-{args.steps}, guidance "
          f"{args.guidance:g}; alignment {len(text.prompts)} prompts x {args.images_per_prompt}; diversity "
          f"{len(one_seen)} one-object prompts x {args.diversity_seeds} seeds (real: {len(real_diversity)} captions "
          f"with 2+ images, mean {np.mean(real_diversity):.3f})")
    rows = []
    for name, uri in models.items():
        loaded = checkpoint.load(resolve_model(uri, args.tracking_uri).path)
        started = time.perf_counter()
        evaluation = evaluate_model(loaded, reference, settings, log=lambda _: None)
        m = dict(evaluation.metrics)
        prompts, seeds = prompt_rows(text, args.seed)
        made = generate_images(loaded, seeds, condition=loaded.condition(len(prompts), prompts=prompts),
                               steps=args.steps, guidance_scale=args.guidance)
        for count in ("one", "two"):
            pick = [i for i, p in enumerate(prompts) if alignment.canonical(p)["count"] == count]
            scored = alignment.score(text.reader, made[pick], [prompts[i] for i in pick])
            m |= {f"{count}_{k.removeprefix('align_')}": v for k, v in scored.items()}
        spread = []
        for k, prompt in enumerate(one_seen):
            seeds = image_seeds(10_000 * (k + 1), args.diversity_seeds)
            varied = generate_images(loaded, seeds, condition=loaded.condition(len(seeds), prompts=prompt),
                                     steps=args.steps, guidance_scale=args.guidance)
            spread.append(pairwise_mean(features(varied)))
        m["diversity"] = float(np.mean(spread))
        m["seconds"] = time.perf_counter() - started
        rows.append((name, m))
        print(f"{name}: done in {m['seconds']:.0f} s", flush=True)

    columns = [("FD-cls", "fd_cls"), ("ratio to floor", "fd_cls_ratio"), ("precision", "precision"),
               ("recall", "recall"), ("one-object seen: all", "one_seen_all"),
               ("one-object held-out: all", "one_held_out_all"), ("two-object seen: all", "two_seen_all"),
               ("two-object seen: relation", "two_seen_relation"), ("two-object held-out: all", "two_held_out_all"),
               ("diversity (real " + f"{np.mean(real_diversity):.3f})", "diversity")]
    print("| model | " + " | ".join(c for c, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, m in rows:
        print(f"| {name} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for _, k in columns) + " |")


if __name__ == "__main__":
    main()
