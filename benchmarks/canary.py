"""What the canary's score (``pipelines.registry.check_canary``) reads for honest and for wrong weights: the evidence
behind its tolerance (``CANARY_TOLERANCE``, 4 pixel levels).

The reference is made as ``ddpm models promote`` makes it (CPU, fp32, the core's fixed 16-row forward). Then the
same seeds are sampled again in ways an honest replica might differ (threads, forward rows, bf16 arithmetic as on a
GPU replica) and with weights that are not the promoted ones (another checkpoint, small noise on every weight, one
layer zeroed, as a corrupted download would). Torch and the core only: no Ray, no MLflow.

    .venv/bin/python benchmarks/canary.py CHECKPOINT [OTHER_CHECKPOINT]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm import checkpoint, fixed_size_forward  # noqa: E402
from pipelines.registry import (CANARY_TOLERANCE, canary_images, canary_score, canary_settings,  # noqa: E402
                                canary_summary)


def bf16_forward(model, rows: int):
    """The fixed-shape forward under bf16 autocast on the CPU: the precision a GPU replica samples in."""
    inner = fixed_size_forward(model, rows)

    def forward(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args).float()

    return forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the promoted model (a checkpoint folder)")
    parser.add_argument("other", nargs="?", help="another checkpoint of the same shape: the wrong weights")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=1.1)
    args = parser.parse_args()

    torch.set_num_threads(2)
    loaded = checkpoint.load(args.checkpoint, weights="ema")
    gate = {"settings": {"sampler": "ddim", "steps": args.steps, "guidance_scale": args.guidance_scale}}
    settings = canary_settings(gate, loaded.config.num_classes)
    reference = canary_summary(canary_images(loaded, settings)).round().clip(0, 255)

    def score(model_loaded, forward=None, threads: int = 2) -> float:
        torch.set_num_threads(threads)
        try:
            return canary_score(canary_summary(canary_images(model_loaded, settings, forward)), reference)
        finally:
            torch.set_num_threads(2)

    def perturbed(scale: float):
        other = copy.deepcopy(loaded)
        with torch.no_grad():
            for p in other.model.parameters():
                p.add_(torch.randn_like(p) * p.abs().mean() * scale)
        return other

    def zeroed():
        other = copy.deepcopy(loaded)
        with torch.no_grad():
            name, p = [(n, p) for n, p in other.model.named_parameters() if p.ndim == 4][-1]
            p.zero_()
        return other, name

    rows = []
    torch.manual_seed(0)
    rows.append(("same weights, same forward (what a CPU replica runs)", score(loaded)))
    rows.append(("same weights, 1 thread instead of 2", score(loaded, threads=1)))
    rows.append(("same weights, 8-row forward instead of 16", score(loaded, fixed_size_forward(loaded.model, 8))))
    rows.append(("same weights, bf16 arithmetic (as a GPU replica)", score(loaded, bf16_forward(loaded.model, 16))))
    rows.append(("weights + 0.1% noise", score(perturbed(1e-3))))
    rows.append(("weights + 1% noise", score(perturbed(1e-2))))
    zero, name = zeroed()
    rows.append((f"one layer zeroed ({name})", score(zero)))
    if args.other:
        rows.append((f"another checkpoint ({Path(args.other).name})", score(checkpoint.load(args.other, weights="ema"))))

    print(f"canary: {len(settings['seeds'])} seeds, DDIM {settings['steps']} steps, guidance {args.guidance_scale:g}, "
          f"{args.checkpoint}\n")
    print(f"| weights and arithmetic | score (mean abs. difference, 0-255 levels) | within {CANARY_TOLERANCE:g}? |")
    print("|---|---:|---|")
    for what, value in rows:
        print(f"| {what} | {value:.3f} | {'yes' if value <= CANARY_TOLERANCE else 'no: refused'} |")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
