"""The serving engine where it will run: ``deploy.engine.run_batch`` on the GPU, no Ray, a simulated request stream.

    python3 benchmarks/engine_gpu.py                  # on the GPU machine
    python3 benchmarks/engine_gpu.py --smoke          # tiny sizes, runs on a CPU

``concurrency`` clients each keep one request in flight (closed loop, as benchmarks/serve.py's HTTP clients do,
without the network): a client sends its next request the moment its last one is answered. The engine takes the
requests that queued while it ran, in arrival order, up to 64 images (the Serve runner's ``max_batch_images``), and
runs them through ``run_batch`` with a fixed-shape forward of ``micro_batch`` rows. Requests are mixed: 1, 2 or 4
images, DDIM-50 (3 in 4) or DPM-Solver++-20, and for the class-conditional digits model half with a class label and
guidance 1.1; jobs with different settings share a batch but not a sampler call. Latency = queueing + sampling (no
HTTP, no PNG encoding). The engine's network call on a GPU is the captured CUDA graph (``ddpm.graphs``); the eager
fixed-shape forward it replaced is measured on the same request streams for the ratio. Random weights (the cost is
the same); presets as in configs/*.yaml.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deploy.engine as engine  # noqa: E402
from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, fixed_size_forward  # noqa: E402
from deploy.engine import Job, Queued, ServedModel, run_batch  # noqa: E402

PRESETS = {"digits": (dict(num_classes=10), "v_prediction"), "cifar10": ({}, "epsilon"),
           "tiny": (dict(num_classes=3), "epsilon")}
MAX_IMAGES = 64


def report_to(name):
    out = os.environ.get("OUT")
    path = os.path.join(out, f"{name}.md") if out else None

    def report(line=""):
        print(line, flush=True)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")

    return report


def served_model(preset: str, device: torch.device) -> ServedModel:
    options, prediction_type = PRESETS[preset]
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset(preset, **options)).eval().to(device)
    return ServedModel(checkpoint.LoadedModel(model, NoiseSchedule.linear(), prediction_type), device, preset, None,
                       None)


class Requests:
    """A reproducible stream of mixed requests."""

    def __init__(self, seed: int, num_classes: int, steps_scale: float = 1.0):
        self.rng = np.random.default_rng(seed)
        self.num_classes, self.scale = num_classes, steps_scale

    def next(self) -> Job:
        r = self.rng
        n = int(r.choice([1, 1, 1, 2, 4]))
        sampler, steps = ("ddim", 50) if r.random() < 0.75 else ("dpm++", 20)
        steps = max(1, round(steps * self.scale))
        label = int(r.integers(self.num_classes)) if self.num_classes and r.random() < 0.5 else None
        return Job(num_images=n, sampler=sampler, steps=steps, eta=0.0, seed=int(r.integers(2**32)),
                   class_label=label, guidance_scale=1.1 if label is not None else 1.0)


def simulate(served, concurrency, micro_batch, seconds, seed, steps_scale, min_batches=2):
    """Closed loop: returns images/s, requests/s, p50/p95 latency (ms), mean requests per batch."""
    stream = Requests(seed, served.loaded.config.num_classes, steps_scale)
    start = time.monotonic()
    queue = collections.deque(Queued(stream.next(), start) for _ in range(concurrency))
    latencies, images, batches, requests = [], 0, 0, 0
    while time.monotonic() - start < seconds or batches < min_batches:
        take, count = [], 0
        while queue and (not take or count + queue[0].job.num_images <= MAX_IMAGES):
            item = queue.popleft()
            take.append(item)
            count += item.job.num_images
        outcomes = run_batch(served, take, micro_batch)
        done = time.monotonic()
        for item, outcome in zip(take, outcomes):
            if not hasattr(outcome, "images"):
                raise RuntimeError(f"request rejected: {outcome}")
            latencies.append(done - item.received)
            images += item.job.num_images
        queue.extend(Queued(stream.next(), done) for _ in take)
        batches += 1
        requests += len(take)
    elapsed = time.monotonic() - start
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return images / elapsed, requests / elapsed, 1000 * statistics.median(lat), 1000 * p95, requests / batches


def warm_up(served, micro_batch, steps_scale):
    """One batch with every kind of job, so the capture (one graph per micro-batch) happens outside the timing."""
    jobs = [Job(1, "ddim", max(1, round(50 * steps_scale)), 0.0, 1, None, 1.0),
            Job(2, "dpm++", max(1, round(20 * steps_scale)), 0.0, 2, None, 1.0)]
    if served.loaded.config.num_classes:
        jobs.append(Job(1, "ddim", max(1, round(50 * steps_scale)), 0.0, 3, 1, 1.1))
    now = time.monotonic()
    run_batch(served, [Queued(j, now) for j in jobs], micro_batch)


def eager_network_call(served, micro_batch):
    """The engine's network call before CUDA graphs: the eager fixed-shape forward."""
    return served.loaded.model if micro_batch is None else fixed_size_forward(served.loaded.model, micro_batch)


def _images(outcome):
    if not hasattr(outcome, "images"):
        raise RuntimeError(f"request rejected: {outcome}")
    return outcome.images


def independence(served, micro_batch, report, label):
    """A request alone and inside a mixed batch of more than ``micro_batch`` images: the same bytes."""
    steps = 10
    conditional = served.loaded.config.num_classes > 0
    target = Job(1, "ddim", steps, 0.0, 123456, 1 if conditional else None, 1.1 if conditional else 1.0)
    others = [Job(3, "ddim", steps, 0.0, 9, 1 if conditional else None, 1.1 if conditional else 1.0),
              Job(micro_batch, "ddim", steps, 0.0, 77, 0 if conditional else None, 1.1 if conditional else 1.0),
              Job(2, "ddim", steps, 0.0, 5, None, 1.0)]
    now = time.monotonic()
    alone = _images(run_batch(served, [Queued(target, now)], micro_batch)[0])
    mixed = _images(run_batch(served, [Queued(j, now) for j in others[:2] + [target] + others[2:]], micro_batch)[2])
    same = bool(np.array_equal(alone, mixed))
    report(f"| {served.name} | {label} | {micro_batch} | request alone == same request in a mixed batch of "
           f"{sum(j.num_images for j in others) + 1} images | {same} |")
    return alone


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (the CPU check of this script)")
    parser.add_argument("--presets", default=None)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--micro-batches", default="8,16,32,64")
    parser.add_argument("--eager-micro-batches", default="64", help="the eager baseline's micro-batches")
    parser.add_argument("--seconds", type=float, default=1.5, help="per configuration")
    parser.add_argument("--budget", type=float, default=92.0, help="seconds for the whole run")
    args = parser.parse_args()
    steps_scale = 1.0
    if args.smoke:
        args.presets = args.presets or "tiny"
        args.concurrency, args.micro_batches, args.eager_micro_batches = "1,8", "4,8", "8"
        args.seconds, steps_scale = 0.5, 0.1
    presets = (args.presets or "digits,cifar10").split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    micro_batches = [int(m) for m in args.micro_batches.split(",")]
    eager_mbs = [int(m) for m in args.eager_micro_batches.split(",")]
    end = time.monotonic() + args.budget

    device = engine.pick_device()  # what a replica does: deterministic cuDNN on a GPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    report = report_to("engine")
    report("\n## The engine on the device: `deploy.engine.run_batch`, no Ray, simulated closed-loop clients\n")
    report(f"Mixed requests (1/2/4 images; DDIM-50 or DPM-Solver++-20; digits: half with a class label and guidance "
           f"1.1), batches of up to {MAX_IMAGES} images, {args.seconds:g} s per row after a warm-up batch; latency is "
           f"queueing + sampling, no HTTP or PNG encoding. Forward: the engine's network call (captured CUDA graph "
           f"on a GPU) or, for the ratio, the eager fixed-shape forward it replaced, on the same request stream.")

    report("\n| preset | forward | micro_batch | check | result |\n|---|---|---|---|---|")
    for preset in presets:
        try:
            served = served_model(preset, device)
            graphed = independence(served, micro_batches[0], report, "engine")
            engine.network_call, original = eager_network_call, engine.network_call
            try:
                eager = independence(served, micro_batches[0], report, "eager fixed-shape")
            finally:
                engine.network_call = original
            report(f"| {preset} | engine vs eager | {micro_batches[0]} | same bytes | "
                   f"{bool(np.array_equal(graphed, eager))} (max diff "
                   f"{int(np.abs(graphed.astype(int) - eager.astype(int)).max())}) |")
        except Exception as exc:
            report(f"<!-- independence {preset}: {type(exc).__name__}: {str(exc)[:300]} -->")
            traceback.print_exc()

    report("\n| preset | clients | forward | micro_batch | images/s | requests/s | p50 ms | p95 ms | requests per batch "
           "| vs eager |\n|---|---|---|---|---|---|---|---|---|---|")
    best: dict[tuple, tuple] = {}
    for preset in presets:
        served = served_model(preset, device)
        warmed: set[tuple] = set()
        for c in concurrency:
            eager_rate: dict[int, float] = {}
            for label in ("eager fixed-shape", "engine"):
                for mb in (eager_mbs if label.startswith("eager") else micro_batches):
                    if time.monotonic() > end - args.seconds:
                        report(f"<!-- engine: budget spent at {preset} c={c} {label} mb={mb} -->")
                        break
                    try:
                        if label.startswith("eager"):
                            engine.network_call, original = eager_network_call, engine.network_call
                        try:
                            if (label, mb) not in warmed:  # the engine's first batch at a micro-batch captures it
                                warm_up(served, mb, steps_scale)
                                warmed.add((label, mb))
                            ips, rps, p50, p95, per_batch = simulate(served, c, mb, args.seconds, seed=c,
                                                                     steps_scale=steps_scale)
                        finally:
                            if label.startswith("eager"):
                                engine.network_call = original
                    except Exception as exc:
                        report(f"<!-- {preset} c={c} {label} mb={mb}: {type(exc).__name__}: {str(exc)[:300]} -->")
                        traceback.print_exc()
                        continue
                    if label.startswith("eager"):
                        eager_rate[mb] = ips
                    elif ips > best.get((preset, c), (0,))[0]:
                        best[(preset, c)] = (ips, mb, p50, p95)
                    ratio = f"{ips / eager_rate[mb]:.2f}x" if label == "engine" and mb in eager_rate else "-"
                    report(f"| {preset} | {c} | {label} | {mb} | {ips:,.1f} | {rps:,.1f} | {p50:,.0f} | {p95:,.0f} | "
                           f"{per_batch:.1f} | {ratio} |")
        del served
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report("\n| preset | clients | best micro_batch (images/s) | images/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|")
    for (preset, c), (ips, mb, p50, p95) in best.items():
        report(f"| {preset} | {c} | {mb} | {ips:,.1f} | {p50:,.0f} | {p95:,.0f} |")


if __name__ == "__main__":
    main()
