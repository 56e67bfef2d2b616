"""What the fixed forward size costs, and whether rows differ with it: ``ddpm.generate_images`` at several
``forward_rows`` against the whole batch in one network call (the baseline, measured in the same run).

For each forward size: images/s of DDIM sampling for a batch of images, the ratio to the baseline, and whether the
uint8 images and the raw network outputs are bit-identical to the baseline's (the property ``forward_rows`` buys
across batch compositions holds at equal rows by construction; this table says how much rows matter at all on the
machine at hand).

    .venv/bin/python benchmarks/forward_rows.py [--preset digits] [--images 128] [--steps 10] [--rows 1 8 16 32 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from ddpm import FORWARD_ROWS, NoiseSchedule, UNet, UNetConfig, from_labels, generate_images
from ddpm.checkpoint import LoadedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, FORWARD_ROWS, 32, 64])
    parser.add_argument("--rounds", type=int, default=3, help="timed repeats; the best is reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = dataclasses.replace(UNetConfig.preset(args.preset), num_classes=10)
    loaded = LoadedModel(UNet(config).eval(), NoiseSchedule.linear(1000, 1e-4, 0.02), "sample")
    seeds, labels = list(range(args.images)), [i % 10 for i in range(args.images)]

    def run(rows: int | None) -> tuple[float, torch.Tensor]:
        best, images = float("inf"), None
        for _ in range(args.rounds):
            start = time.perf_counter()
            images = generate_images(loaded, seeds, condition=from_labels(labels, len(seeds)), steps=args.steps,
                                     forward_rows=rows,
                                     batch_size=args.images)
            best = min(best, time.perf_counter() - start)
        return args.images / best, images

    base_rate, base_images = run(None)
    x = torch.randn(args.images, *loaded.sample_shape)
    t = torch.full((args.images,), 500)
    y = torch.tensor(labels)
    with torch.inference_mode():
        base_out = loaded.model(x, t, y)

    print(f"{args.preset} preset, {args.images} images, DDIM-{args.steps}, {torch.get_num_threads()} threads\n")
    print("| forward rows | images/s | vs whole batch | uint8 images identical | network output identical |")
    print("|---:|---:|---:|---|---|")
    print(f"| {args.images} (whole batch, baseline) | {base_rate:.1f} | 1.00x | - | - |")
    for rows in args.rows:
        rate, images = run(rows)
        with torch.inference_mode():
            out = torch.cat([loaded.model(x[i:i + rows], t[i:i + rows], y[i:i + rows])
                             for i in range(0, args.images, rows)])
        same_images = bool((images == base_images).all())
        same_out = bool(torch.equal(out, base_out))
        print(f"| {rows} | {rate:.1f} | {rate / base_rate:.2f}x | {same_images} | {same_out} |")


if __name__ == "__main__":
    main()
