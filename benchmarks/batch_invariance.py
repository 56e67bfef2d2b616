"""Which layers give a row the same bits whatever the number of rows beside it, on the machine at hand (issue 36).

The engine pads every forward pass to ``ddpm.FORWARD_ROWS`` rows so that an image never depends on its batch-mates;
a lone request pays for the padding. A network whose every layer is batch-invariant would need no padding. This
runs each layer the U-Net uses, and the whole U-Net, on the first N of 16 random rows and compares them, bit for
bit, with the same rows of the 16-row call: ``yes`` = identical for that N. Eval mode, no gradients, fp32.

    .venv/bin/python benchmarks/batch_invariance.py [--threads 1 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm import UNet, UNetConfig, from_labels  # noqa: E402

SIZES = (1, 2, 3, 4, 8, 12)
REFERENCE = 16


def cases() -> list[tuple[str, object, object]]:
    """(name, f(x) -> y, make(n) -> x): each layer at a shape the digits U-Net runs it at, then whole U-Nets."""
    torch.manual_seed(0)
    out = [
        ("conv 3x3, 32->32 at 16x16", nn.Conv2d(32, 32, 3, padding=1), lambda n: torch.randn(n, 32, 16, 16)),
        ("conv 3x3, 64->64 at 4x4", nn.Conv2d(64, 64, 3, padding=1), lambda n: torch.randn(n, 64, 4, 4)),
        ("conv 3x3, 1->32 at 16x16 (stem)", nn.Conv2d(1, 32, 3, padding=1), lambda n: torch.randn(n, 1, 16, 16)),
        ("conv 1x1, 64->32 at 8x8 (skip)", nn.Conv2d(64, 32, 1), lambda n: torch.randn(n, 64, 8, 8)),
        ("linear 128->512, one row per image", nn.Linear(128, 512), lambda n: torch.randn(n, 128)),
        ("linear 64->192 on 64 tokens", nn.Linear(64, 192), lambda n: torch.randn(n, 64, 64)),
        ("group norm, 8 groups", nn.GroupNorm(8, 64), lambda n: torch.randn(n, 64, 8, 8)),
        ("scaled dot-product attention", lambda x: F.scaled_dot_product_attention(x, x, x),
         lambda n: torch.randn(n, 4, 64, 16)),
    ]
    for preset, classes in (("tiny", 0), ("digits", 10)):
        torch.manual_seed(0)
        net = UNet(UNetConfig.preset(preset, num_classes=classes)).eval()
        c, s = net.config.in_channels, net.config.image_size
        rows = torch.randn(REFERENCE, c, s, s)
        t = torch.randint(0, 1000, (REFERENCE,))
        labels = torch.randint(0, max(classes, 1), (REFERENCE,)).tolist()

        def unet(x, net=net, t=t, labels=labels, classes=classes):
            n = x.shape[0]
            return net(x, t[:n], from_labels(labels[:n], n) if classes else None)

        out.append((f"U-Net '{preset}' ({s}x{s}x{c})", unet, lambda n, rows=rows: rows[:n]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"PyTorch {torch.__version__}; rows 0..N-1 of an N-row call against the same rows of a {REFERENCE}-row call")
    print("\n| threads | layer | " + " | ".join(f"N={n}" for n in SIZES) + " | largest difference |")
    print("|---:|---|" + "---|" * len(SIZES) + "---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, fn, make in cases():
            with torch.no_grad():
                x = make(REFERENCE)
                reference = fn(x)
                got = {n: fn(x[:n]) for n in SIZES}
            same = " | ".join("yes" if torch.equal(got[n], reference[:n]) else "no" for n in SIZES)
            worst = max(float((got[n] - reference[:n]).abs().max()) for n in SIZES)
            print(f"| {threads} | {name} | {same} | {worst:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
