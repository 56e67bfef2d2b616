"""How well a trained unCLIP prior predicts image embeddings, at several guidance scales and step counts, against
unCLIP's baseline (the caption's own CLIP text embedding used as the image embedding), on its run's held-out images.

The held-out split is the run's own (``pipelines.train.held_out``, ``train.eval_images`` and ``train.seed`` as
trained); the figures are ``pipelines.train.prior_worker.evaluate``'s, what the run logs at every checkpoint.

    .venv/bin/python benchmarks/prior_quality.py --prior models:/shapes-prior/1 --data .ddpm/data/shapes \\
        [--tracking-uri URI] [--eval-images 256] [--guidance 1 2 4] [--steps 20 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the run's train.seed")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args()

    from ddpm import clip, prior
    from pipelines.data.dataset import read_columns, read_manifest
    from pipelines.registry import resolve_clip
    from pipelines.train.held_out import held_out_keys
    from pipelines.train.prior_worker import caption_conditions, evaluate

    clip_root = resolve_clip(args.prior, args.tracking_uri).path  # the CLIP the prior pins, model/clip/
    loaded, clip_net = prior.load(clip_root.parent), clip.load(clip_root)
    manifest = read_manifest(args.data)
    keys = held_out_keys(args.data, manifest, args.eval_images, args.seed)
    table = read_columns(args.data, manifest["shards"], ["sha256", "caption", "image"], None)
    rows = {k: i for i, k in enumerate(table.column("sha256").to_pylist())}
    pick = [rows[k] for k in keys]
    captions = [str(c) for c in np.asarray(table.column("caption").to_pylist(), dtype=object)[pick]]
    images = np.stack([np.frombuffer(table.column("image")[i].as_py(), dtype=np.uint8).reshape(manifest["image_shape"])
                       for i in pick])  # (N, H, W, C)
    distinct = sorted(set(captions))
    index = np.array([distinct.index(c) for c in captions], dtype=np.int64)
    states = caption_conditions(clip_net.model, clip_net.tokenizer.tokenize(distinct + [""]), "cpu")
    held = {"images": images, "caption_index": index, "caption_ids": clip_net.tokenizer.tokenize(captions).numpy()}
    device = torch.device("cpu")
    print(f"prior {args.prior}: {len(captions)} held-out images ({len(distinct)} distinct captions), CLIP embeddings "
          f"of {loaded.model.config.embed_dim}")
    print("| sampler | guidance | prior cosine | text-embedding cosine | prior top-1 | text top-1 | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        for w in args.guidance:
            started = time.perf_counter()
            scores = evaluate(loaded.model, loaded.schedule, clip_net.model, states, held, device, steps=steps,
                              guidance_scale=w)
            print(f"| DDIM-{steps} | {w:g} | {scores['prior_cosine']:.3f} | {scores['text_cosine']:.3f} | "
                  f"{scores['prior_top1']:.3f} | {scores['text_top1']:.3f} | {time.perf_counter() - started:.1f} |")


if __name__ == "__main__":
    main()
