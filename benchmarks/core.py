"""Core benchmarks: training-step throughput and sampling throughput, ours beside diffusers' UNet2DModel.

    python benchmarks/core.py                 # full run (on a GPU: bf16 autocast, channels-last, compiled too)
    python benchmarks/core.py --quick         # a few steps each, for a CPU smoke run

Training: images/s and peak memory of one optimisation step (forward, L_simple, backward, Adam) for the
``digits`` and ``cifar10`` presets, and for diffusers' ``UNet2DModel`` configured to the same architecture (its
parameter count is printed beside ours). On a GPU the table also gives model TFLOP/s (FLOPs from
``torch.utils.flop_counter``) and their fraction of the card's bf16 matmul peak, measured in the same run.
Sampling: images/s of DDPM-1000, DDIM-50 and DPM-Solver++-20 at batch 64 with the ``digits``/``cifar10`` presets.
Only the core is imported (PyTorch alone), so this runs on a GPU machine that has no Ray or MLflow.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ddpm import NoiseSchedule, UNet, UNetConfig, count_parameters, diffusion_loss, sample  # noqa: E402


def diffusers_twin(cfg: UNetConfig):
    """diffusers' UNet2DModel with the same levels, widths, blocks and attention as our preset."""
    from diffusers import UNet2DModel

    levels = len(cfg.channel_mults)
    res = [cfg.image_size // 2**i for i in range(levels)]
    attn = [r in cfg.attention_resolutions for r in res]
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=min(cfg.num_groups, cfg.base_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=cfg.dropout, attention_head_dim=None,
    )


class DiffusersEps(torch.nn.Module):
    """Adapts UNet2DModel's (x, t) -> output.sample to our model callable."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        return self.net(x, t).sample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_peak_tflops(device) -> float:
    """Measured bf16 matmul throughput: 8192^3 products, mean of 10 after 3 warm-ups."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def train_flops_per_image(model, cfg, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    schedule = NoiseSchedule.linear()
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, schedule, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bench_train(model, cfg, device, batch, steps, warmup, bf16, channels_last):
    schedule = NoiseSchedule.linear()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, **({"fused": True} if device.type == "cuda" else {}))
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss = diffusion_loss(model, schedule, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch * steps / dt, peak


def bench_sample(model, cfg, device, sampler, steps, batch, bf16):
    schedule = NoiseSchedule.linear()
    x_T = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        sample(model, schedule, x_T, sampler=sampler, steps=min(steps, 5), generator=g)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        sample(model, schedule, x_T, sampler=sampler, steps=steps, generator=g)
        sync(device)
    return batch / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, small batches (CPU smoke run)")
    parser.add_argument("--presets", default="digits,cifar10")
    parser.add_argument("--batches", default=None, help="comma-separated training batch sizes")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--sampling-presets", default=None)
    parser.add_argument("--sections", default="train,sample", help="which tables to produce")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    peak = bf16_peak_tflops(device) if gpu else None
    if peak:
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")

    steps, warmup = (3, 1) if args.quick or not gpu else (30, 10)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([16] if args.quick else
                                                                             ([128, 512] if gpu else [128]))
    rows = []
    for preset in args.presets.split(",") if "train" in args.sections else []:
        cfg = UNetConfig.preset(preset)
        impls = [("ours", lambda: UNet(cfg))]
        if not args.no_diffusers:
            impls.append(("diffusers UNet2DModel", lambda: DiffusersEps(diffusers_twin(cfg))))
        for impl, build in impls:
            model = build().to(device)
            if gpu:
                model = model.to(memory_format=torch.channels_last)
            params = count_parameters(model)
            flops = train_flops_per_image(model, cfg, device)
            modes = [("eager", model)]
            if gpu and not args.no_compile:
                modes.append(("compiled", torch.compile(model, dynamic=False)))
            for mode, m in modes:
                # Compilation costs a minute per shape, so the compiled model runs at the largest batch only.
                for batch in batches if mode == "eager" else batches[-1:]:
                    try:
                        ips, mem = bench_train(m, cfg, device, batch, steps, warmup if mode == "eager" else 3,
                                               bf16=gpu, channels_last=gpu)
                    except Exception as exc:  # OOM, or a compiler failure: report it and go on with the table
                        print(f"{preset} {impl} {mode} batch {batch}: {type(exc).__name__}: {exc}"[:300])
                        continue
                    tflops = ips * flops / 1e12
                    rows.append((preset, impl, f"{params / 1e6:.2f}M", mode, batch, ips, mem, tflops,
                                 tflops / peak if peak else float("nan")))
                    print(rows[-1], flush=True)
            del model, modes
            if gpu:
                torch.cuda.empty_cache()

    print("\n## Training step (forward + L_simple + backward + Adam)\n")
    print("| preset | model | params | mode | batch | images/s | peak mem GiB | model TFLOP/s | of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:,.0f} | {r[6]:.2f} | {r[7]:.1f} | {r[8]:.1%} |")
    base = {(r[0], r[3], r[4]): r[5] for r in rows if r[1] == "ours"}
    ratios = [(r[0], r[3], r[4], base[(r[0], r[3], r[4])] / r[5]) for r in rows
              if r[1] != "ours" and (r[0], r[3], r[4]) in base]
    if ratios:
        print("\n| preset | mode | batch | ours / diffusers (images/s) |\n|---|---|---|---|")
        for p, m, b, q in ratios:
            print(f"| {p} | {m} | {b} | {q:.2f}x |")

    if "sample" not in args.sections:
        return
    print("\n## Sampling at batch 64\n")
    print("| preset | sampler | steps | images/s |\n|---|---|---|---|")
    presets = (args.sampling_presets or ("digits" if args.quick or not gpu else "digits,cifar10")).split(",")
    plan = [("ddim", 5), ("dpm++", 5)] if args.quick else [("ddpm", 1000), ("ddim", 50), ("dpm++", 20)]
    for preset in presets:
        cfg = UNetConfig.preset(preset)
        model = UNet(cfg).to(device).eval()
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        for sampler, n in plan:
            ips = bench_sample(model, cfg, device, sampler, n, 8 if args.quick else 64, bf16=gpu)
            print(f"| {preset} | {sampler} | {n} | {ips:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
