"""What text conditioning costs: FLOPs and CPU time of one U-Net row with cross-attention against the class-conditional
U-Net of the same widths (the baseline, measured in the same run), and of encoding one prompt with the text tower.

The widths are those of configs/shapes-text.yaml (the U-Net) and configs/clip-shapes.yaml (the text tower whose token
states it attends to, context L = model.context_length). FLOPs come from torch's FlopCounterMode (exact for the
matmuls and convolutions, which dominate); times are the best of ``--rounds`` at ``--rows`` rows on this machine's CPU.

    .venv/bin/python benchmarks/text_cost.py [--rows 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from ddpm import UNet, UNetConfig
from ddpm.conditioning import Condition
from ddpm.text import TextConfig, TextTransformer

ROOT = Path(__file__).resolve().parent.parent


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_time(fn, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    unet_yaml = yaml.safe_load((ROOT / "configs/shapes-text.yaml").read_text())["model"]
    clip_yaml = yaml.safe_load((ROOT / "configs/clip-shapes.yaml").read_text())["model"]
    width, context = clip_yaml["text_width"], clip_yaml["context_length"]
    text_config = TextConfig(vocab_size=clip_yaml["vocab_size"], hidden_size=width,
                             intermediate_size=clip_yaml["text_mlp_ratio"] * width,
                             num_hidden_layers=clip_yaml["text_layers"], num_attention_heads=clip_yaml["text_heads"],
                             max_position_embeddings=context, bos_token_id=0, eos_token_id=1, pad_token_id=1)

    torch.manual_seed(0)
    n = args.rows
    x = torch.randn(n, unet_yaml["in_channels"], unet_yaml["image_size"], unet_yaml["image_size"])
    t = torch.randint(0, 1000, (n,))
    base = UNetConfig(**unet_yaml)
    class_net = UNet(dataclasses.replace(base, num_classes=10)).eval()
    text_net = UNet(dataclasses.replace(base, text_dim=width)).eval()
    encoder = TextTransformer(text_config).eval()
    ids = torch.randint(0, clip_yaml["vocab_size"], (n, context))
    with torch.no_grad():
        states, pooled = encoder(ids)
    labels, text = Condition(labels=torch.arange(n) % 10), Condition(text=states, pooled=pooled)

    rows = [
        ("U-Net row, class-conditional (baseline)", lambda: class_net(x, t, labels)),
        ("U-Net row, text (cross-attention + pooled)", lambda: text_net(x, t, text)),
        ("text tower, one prompt", lambda: encoder(ids)),
    ]
    with torch.no_grad():
        measured = [(name, flops(fn) / n, best_time(fn, args.rounds) / n) for name, fn in rows]
    base_flops, base_s = measured[0][1], measured[0][2]
    print(f"{'':44s} {'GFLOP/row':>10s} {'x baseline':>10s} {'ms/row':>8s} {'x baseline':>10s}")
    for name, f, s in measured:
        print(f"{name:44s} {f / 1e9:10.4f} {f / base_flops:10.3f} {s * 1e3:8.2f} {s / base_s:10.3f}")
    print(f"(rows {n}, best of {args.rounds}; threads {torch.get_num_threads()}; U-Net from configs/shapes-text.yaml, "
          f"text tower from configs/clip-shapes.yaml, context {context})")


if __name__ == "__main__":
    main()
