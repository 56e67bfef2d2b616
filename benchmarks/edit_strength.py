"""What SDEdit's ``strength`` trades: how often an edit reads as the new class, how close it stays to the image it
edits, and what it costs, on a briefly trained class-conditional digits model (8x8, ``configs/digits.yaml``).

Held-out digits (the evaluation classifier's held-out half) are edited toward another class, (label + 1 + i mod 9)
mod 10, with ``ddpm.inpaint_images(..., masks=None, strength=s)`` (what ``ddpm edit`` and ``POST /edit`` run), DDIM
50 steps, guidance 3. For each strength: the share the evaluation classifier reads as the new class (the edit took),
the share it still reads as the old one, the mean absolute pixel distance to the input (0-255), and the seconds per
image. Strength 1 starts from pure noise: it is the baseline, plain class-conditional generation, in the same run;
every ratio is against it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_strength.py [--images 200] [--train-images 40000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="held-out digits edited at each strength")
    parser.add_argument("--train-images", type=int, default=40_000, help="images the digits model trains on")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    from ddpm import checkpoint, from_labels, from_uint8, inpaint_images
    from pipelines.config import load_config
    from pipelines.evaluate.classifier import load_or_train
    from pipelines.evaluate.quality import load_data
    from pipelines.train.local import train_local

    images, labels = load_data("digits", 8)  # (1797, 8, 8, 1) uint8, (1797,)
    clf = load_or_train(images, labels, log=lambda _: None)
    config = load_config("configs/digits.yaml", [
        "model.image_size=8", "model.num_res_blocks=1", f"train.total_images={args.train_images}",
        "train.batch_size=64", "train.lr=2e-3", "train.warmup_images=1280", "train.log_every_steps=1000000"])
    train = clf.train_index
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = train_local(config, from_uint8(images[train]), torch.from_numpy(labels[train]), out_dir=tmp,
                          log=lambda *_: None)
        loaded = checkpoint.load(run.checkpoint)
    train_s = time.perf_counter() - started

    rows = clf.held_out_index[:args.images]
    known, old = images[rows], labels[rows]  # (N, 8, 8, 1) uint8, (N,)
    new = (old + 1 + np.arange(len(rows)) % 9) % 10  # another class for each, every offset equally often
    seeds = list(range(len(rows)))

    @torch.no_grad()
    def read(pixels: np.ndarray) -> np.ndarray:
        return clf.net(from_uint8(pixels)).argmax(dim=1).numpy()

    results = {}
    for s in args.strengths:
        t0 = time.perf_counter()
        edited = inpaint_images(loaded, seeds, from_uint8(known), None, condition=from_labels(new.tolist(), len(rows)),
                                steps=args.steps, guidance_scale=args.guidance_scale, strength=s)  # (N, 8, 8, 1)
        seconds = (time.perf_counter() - t0) / len(rows)
        reading = read(edited)
        distance = np.abs(edited.astype(float) - known.astype(float)).mean()
        results[s] = (float((reading == new).mean()), float((reading == old).mean()), distance, seconds)

    base = results[1.0] if 1.0 in results else None
    print(f"digits model: {args.train_images} training images in {train_s:.0f} s; classifier on the inputs reads "
          f"{float((read(known) == old).mean()):.3f} as their label; {len(rows)} edits per strength, DDIM "
          f"{args.steps}, guidance {args.guidance_scale}")
    print("| strength | model calls | reads as the new class | still the old class | pixel distance to the input "
          "(0-255) | distance / strength 1's | s per image | time / strength 1's |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    from ddpm import strength_steps

    for s, (took, kept, distance, seconds) in results.items():
        ratio_d = f"{distance / base[2]:.2f}" if base else "-"
        ratio_t = f"{seconds / base[3]:.2f}" if base else "-"
        print(f"| {s:g} | {strength_steps(args.steps, s)} | {took:.3f} | {kept:.3f} | {distance:.1f} | {ratio_d} | "
              f"{seconds:.4f} | {ratio_t} |")


if __name__ == "__main__":
    main()
