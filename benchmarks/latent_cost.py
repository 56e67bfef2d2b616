"""What latent diffusion saves per training image: pixel-space DDPM against the same U-Net on an autoencoder's
latents (issue 21, "Cost per training image").

    .venv/bin/python benchmarks/latent_cost.py                  # FLOP table + 64x64 images/s, side by side
    .venv/bin/python benchmarks/latent_cost.py --rounds 0       # FLOPs only

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one training step (the loss's forward and backward,
:func:`ddpm.losses.diffusion_loss`) on the meta device, so even the 256x256 model costs nothing to count; a
multiply-add is 2 FLOPs. The U-Net widths are the pixel preset's, unchanged, on the latent's side and channels
(``rgb64`` on 16x16x4 for f = 4 at 64x64; ``lsun256``, the DDPM paper's 256x256 model, on 32x32x4 for f = 8).
The autoencoder's encoder runs once per image when the latents are precomputed (``ddpm encode``); its FLOPs are
listed beside, and the decoder's per generated image. Images/s: training steps of the two 64x64 models at the same
batch, in alternating rounds in this process (a ratio within one run is what means something on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def training_flops(config, batch: int = 1) -> float:
    """FLOPs of one training step's forward and backward per image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm import NoiseSchedule, UNet
    from ddpm.losses import diffusion_loss

    with torch.device("meta"):
        net = UNet(config)
        x_0 = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    schedule = NoiseSchedule.linear(1000)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = _meta_loss(net, schedule, x_0)
        loss.backward()
    return counter.get_total_flops() / batch


def _meta_loss(net, schedule, x_0):
    """L_simple on the meta device (``diffusion_loss`` indexes the schedule with sampled t, which meta cannot do):
    the same network call, one forward per image."""
    import torch

    t = torch.zeros(x_0.shape[0], dtype=torch.long, device=x_0.device)
    eps = torch.randn_like(x_0)
    x_t = 0.5 * x_0 + 0.5 * eps  # the coefficients do not change the count
    return (net(x_t, t) - eps).square().mean()


def autoencoder_flops(preset: str, side: int) -> tuple[float, float]:
    """(encoder FLOPs, decoder FLOPs) per image of side ``side``, forward only, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm import Autoencoder, AutoencoderConfig

    with torch.device("meta"):
        ae = Autoencoder(AutoencoderConfig.preset(preset))
        x = torch.randn(1, 3, side, side)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        z = ae.encode(x)
    encode = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        ae.decode(z)
    return encode, counter.get_total_flops()


def images_per_second(configs: dict, batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median images/s of ``steps`` training steps per round for each config, rounds alternating between them."""
    import torch

    from ddpm import NoiseSchedule, UNet
    from ddpm.training import train_step

    torch.manual_seed(0)
    schedule = NoiseSchedule.linear(1000)
    setups = {}
    for name, config in configs.items():
        net = UNet(config)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        x_0 = torch.randn(batch, config.in_channels, config.image_size, config.image_size)
        train_step(net, optimizer, schedule, x_0, lr=1e-4)  # warm-up: allocations, oneDNN primitives
        setups[name] = (net, optimizer, x_0)
    rates = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (net, optimizer, x_0) in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                train_step(net, optimizer, schedule, x_0, lr=1e-4)
            rates[name].append(steps * batch / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step for the images/s rounds")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (0: FLOPs only)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    args = parser.parse_args()

    import torch

    from ddpm import UNetConfig, count_parameters, UNet

    cases = [  # (label, U-Net config, autoencoder preset or None, image side)
        ("pixel 64x64x3 (rgb64)", UNetConfig.preset("rgb64"), None, 64),
        ("latent f=4 16x16x4 (rgb64 widths)", UNetConfig.preset("rgb64", image_size=16, in_channels=4), "small-f4", 64),
        ("pixel 256x256x3 (lsun256)", UNetConfig.preset("lsun256"), None, 256),
        ("latent f=8 32x32x4 (lsun256 widths)", UNetConfig.preset("lsun256", image_size=32, in_channels=4), "f8", 256),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; FLOPs per image, one training step "
          f"(forward + backward); a multiply-add = 2 FLOPs")
    print()
    print("| model | U-Net params | train GFLOP/image | vs pixel | encode once (GFLOP, AE preset) | "
          "decode per sample (GFLOP) |")
    print("|---|---:|---:|---:|---:|---:|")
    pixel = None
    for label, config, ae_preset, side in cases:
        flops = training_flops(config)
        if ae_preset is None:
            pixel, ratio, ae_cols = flops, "1.00x", "- | -"
        else:
            encode, decode = autoencoder_flops(ae_preset, side)
            ratio = f"{pixel / flops:.1f}x fewer"
            ae_cols = f"{encode / 1e9:.2f} ({ae_preset}) | {decode / 1e9:.2f}"
        print(f"| {label} | {count_parameters(UNet(config)) / 1e6:.1f}M | {flops / 1e9:.1f} | {ratio} | {ae_cols} |")

    if args.rounds:
        configs = {"pixel 64x64x3": cases[0][1], "latent 16x16x4": cases[1][1]}
        rates = images_per_second(configs, args.batch, args.rounds, args.steps)
        print()
        print(f"Training images/s at batch {args.batch}, median of {args.rounds} alternating rounds of "
              f"{args.steps} steps (fp32):")
        print()
        print("| model | images/s | vs pixel |")
        print("|---|---:|---:|")
        base = rates["pixel 64x64x3"]
        for name, rate in rates.items():
            print(f"| {name} | {rate:.2f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
