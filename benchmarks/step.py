"""One training step's bookkeeping on the CPU: per-tensor loops (torch's CPU defaults) against foreach/fused kernels.

    .venv/bin/python benchmarks/step.py                        # digits preset, batch 128, all cores
    .venv/bin/python benchmarks/step.py --threads 1 --rounds 12

After the backward pass a step clips the gradient norm, takes an AdamW step and updates the EMA: three walks over
the U-Net's ~250 parameter tensors. On a GPU torch runs them as foreach kernels by default; on a CPU its defaults
loop in Python, a few small ops per tensor. The shipped step (``ddpm.training.train_step`` with
``TrainConfig.build_optimizer`` and ``ddpm.EMA``) uses foreach clipping, fused AdamW and a foreach EMA update. The
baseline is the same step with torch's CPU defaults, as the project ran it before. Both run in this process on the
same batch, in alternating rounds (the machine is shared: a ratio within one run is what means something), and the
table gives the median round of each and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def baseline_step(net, optimizer, schedule, x_0, y, shadow, ema_decay, options) -> None:
    """The step with torch's CPU defaults: clipping and AdamW loop over the tensors, and so does the EMA update."""
    import torch

    from ddpm.losses import diffusion_loss

    dtype = options["autocast_dtype"]
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        loss = diffusion_loss(net, schedule, x_0, condition=y, prediction_type=options["prediction_type"],
                              min_snr_gamma=options["min_snr_gamma"], timestep_sampling=options["timestep_sampling"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), options["grad_clip"])  # foreach=None: a loop on the CPU
    optimizer.step()
    with torch.no_grad():
        for name, p in net.named_parameters():
            shadow[name].lerp_(p.detach(), 1 - ema_decay)
    loss.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop per round (default: 8)")
    args = parser.parse_args()

    import torch

    from ddpm import EMA, UNet
    from ddpm.training import train_step
    from pipelines.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    tc = config.train
    if tc.class_conditional:
        config = config.with_num_classes(10)
    schedule, options = config.schedule.build(), tc.step_options(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    size, channels, b = config.model.image_size, config.model.in_channels, tc.batch_size
    x_0 = torch.rand(b, channels, size, size, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (b,), generator=generator) if tc.class_conditional else None

    torch.manual_seed(tc.seed)
    base_net = UNet(config.model)
    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    base_opt = opt_cls(base_net.parameters(), lr=tc.lr, betas=(0.9, tc.adam_beta2), weight_decay=tc.weight_decay)
    shadow = {name: p.detach().clone() for name, p in base_net.named_parameters()}
    torch.manual_seed(tc.seed)
    net = UNet(config.model)
    optimizer, ema = tc.build_optimizer(net.parameters()), EMA(net, decay=tc.ema_decay, warmup=False)

    loops = {
        "torch's CPU defaults (per-tensor loops)": lambda: baseline_step(base_net, base_opt, schedule, x_0, y, shadow,
                                                                         tc.ema_decay, options),
        "shipped (foreach clip, fused AdamW, foreach EMA)": lambda: (
            train_step(net, optimizer, schedule, x_0, lr=tc.lr, condition=y, **options), ema.update(net)),
    }
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            step()  # one untimed step: the other loop ran last
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * b / (time.perf_counter() - start))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    first = next(iter(medians.values()))
    print(f"\n{Path(args.config).name}, batch {b}, {torch.get_num_threads()} threads, autocast "
          f"{options['autocast_dtype']}, {args.rounds} alternating rounds of {args.steps} steps\n")
    print("| step | median round, images/s | range | ratio |")
    print("|---|---:|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {medians[name]:.0f} | {min(r):.0f}-{max(r):.0f} | {medians[name] / first:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
