"""Training throughput: the Ray Train loop against a plain PyTorch loop on the same model and data, in one run.

    .venv/bin/python benchmarks/train.py                       # digits preset, 16x16x1, batch 128
    .venv/bin/python benchmarks/train.py --steps 100 --set train.batch_size=256

Three measurements, one after the other on the same machine:

1. plain PyTorch: one process, all cores, the same per-step work as a Ray worker (uint8 -> [-1, 1], flip if the
   config says so, label dropout, ddpm.training.train_step, EMA update), data already in memory;
2. ``ddpm train`` with one worker that reserves every CPU (so it gets as many threads), the data streamed from
   Ray's object store by ``get_dataset_shard``;
3. the same with two workers (DDP over gloo), the CPUs split between them.

Images per second are steady-state: every loop is timed in windows of ``--window`` steps and the first window
(start-up, first pass over the data) is dropped; Ray Train's own start-up is not counted either. The table shows
the best window and the median window of each loop, and the ratios use the best: on a machine shared with other
work, the fastest window is the one least disturbed by it. The goal is the Ray loop at >= 0.95x the plain loop:
the framework costs nothing that matters once training runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(config, images, labels, steps: int, window: int) -> list[float]:
    """Images/s of each window of ``window`` steps of a single-process loop over shuffled passes of the data."""
    import numpy as np
    import torch

    from ddpm import EMA, UNet, from_uint8
    from ddpm.training import drop_labels, lr_at, random_flip, train_step

    tc = config.train
    torch.manual_seed(tc.seed)
    net = UNet(config.model)
    schedule = config.schedule.build()
    optimizer = tc.build_optimizer(net.parameters())
    ema = EMA(net, decay=tc.ema_decay, warmup=tc.ema_warmup)
    options = tc.step_options(torch.device("cpu"))  # what a worker runs: precision, loss, timestep sampling
    rng = np.random.default_rng(tc.seed)
    order, position, rates = rng.permutation(len(images)), 0, []
    start = time.perf_counter()
    for step in range(steps):
        if position + tc.batch_size > len(order):  # a new pass over the data
            order, position = rng.permutation(len(images)), 0
        index = order[position:position + tc.batch_size]
        position += tc.batch_size
        x_0 = from_uint8(images[index])  # (B, C, H, W) in [-1, 1]
        if tc.random_flip:
            x_0 = random_flip(x_0)
        y = drop_labels(torch.from_numpy(labels[index]), tc.label_dropout) if tc.class_conditional else None
        lr = lr_at(step, base_lr=tc.lr, warmup_steps=tc.warmup_images // tc.batch_size, total_steps=steps,
                   decay=tc.lr_decay)
        train_step(net, optimizer, schedule, x_0, lr=lr, condition=y, **options)
        ema.update(net)
        if (step + 1) % window == 0:
            now = time.perf_counter()
            rates.append(window * tc.batch_size / (now - start))
            start = now
    return rates


def ray_loop(data: str, config, workers: int, steps: int, window: int, storage: str, tracking_uri: str) -> list[float]:
    """Images/s of each logging window of ``ddpm train`` (its ``images_per_sec`` metric, read back from MLflow)."""
    from dataclasses import replace

    from pipelines import tracking
    from pipelines.train.driver import train

    config = replace(config, train=replace(config.train, total_images=steps * config.train.batch_size,
                                           log_every_steps=window, checkpoint_every_images=10**9,
                                           sample_every_images=10**9))
    result = train(data, config, storage=storage, name=f"bench-{workers}w-{time.time_ns()}", num_workers=workers,
                   tracking_uri=tracking_uri, experiment="benchmark")
    history = tracking.client(tracking_uri).get_metric_history(result.run_id, "images_per_sec")
    return [m.value for m in sorted(history, key=lambda m: m.step) if m.step % window == 0]


def steady(rates: list[float]) -> tuple[float, float]:
    """(best, median) images/s over every window but the first."""
    return max(rates[1:]), statistics.median(rates[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement (default: 60)")
    parser.add_argument("--window", type=int, default=5, help="steps per timing window (default: 5)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="niceness of the Ray workers (default: 0, the plain loop's; Ray's own default is 15)")
    args = parser.parse_args()

    import os

    import ray

    from pipelines.config import load_config
    from pipelines.data.digits import write_digits
    from pipelines.data.dataset import load_numpy, read_manifest
    from pipelines.data.preprocess import preprocess
    from pipelines.train.driver import fit_to_dataset

    work = Path(tempfile.mkdtemp(prefix="ddpm-bench-train-"))
    os.environ["DDPM_HOME"] = str(work / "home")
    # Ray starts its workers at niceness 15: every process at the default priority, Ray's own included, then takes
    # the CPU first. By default the same priority as the plain loop, so that only the framework differs.
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    tracking_uri = f"sqlite:///{work / 'home' / 'mlflow.db'}"
    config = load_config(args.config, args.set)
    size, channels = config.model.image_size, config.model.in_channels
    write_digits(str(work / "raw"))
    data = str(work / "processed")
    preprocess(str(work / "raw"), data, resolution=size, channels=channels, small="upscale")
    config = fit_to_dataset(config, read_manifest(data), data)
    images, labels = load_numpy(data)
    cpus = int(ray.cluster_resources()["CPU"])

    plain = steady(plain_loop(config, images, labels, args.steps, args.window))
    print(f"plain PyTorch: best {plain[0]:.0f}, median {plain[1]:.0f} images/s", flush=True)
    one = steady(ray_loop(data, config, 1, args.steps, args.window, str(work / "runs"), tracking_uri))
    print(f"Ray Train, 1 worker: best {one[0]:.0f}, median {one[1]:.0f} images/s", flush=True)
    two = steady(ray_loop(data, config, 2, args.steps, args.window, str(work / "runs"), tracking_uri))

    b = config.train.batch_size
    print(f"\n{len(images)} digits at {size}x{size}x{channels}, model preset from {Path(args.config).name}, "
          f"batch {b}, {args.steps} steps in windows of {args.window}, the first window dropped, {cpus} CPUs\n")
    print("| loop | best window, images/s | median window, images/s | ratio (best) |")
    print("|---|---:|---:|---:|")
    print(f"| plain PyTorch, 1 process, {cpus} threads | {plain[0]:.0f} | {plain[1]:.0f} | 1.00x |")
    print(f"| Ray Train, 1 worker x {cpus} CPUs | {one[0]:.0f} | {one[1]:.0f} | {one[0] / plain[0]:.2f}x plain |")
    print(f"| Ray Train, 2 workers x {cpus // 2} CPU (DDP, gloo) | {two[0]:.0f} | {two[1]:.0f} | "
          f"{two[0] / one[0]:.2f}x 1 worker |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
