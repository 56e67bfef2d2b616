"""GPU benchmarks of the core: sampling with captured CUDA graphs, the training step, and GPU-vs-CPU correctness.

    python3 benchmarks/gpu.py                                  # every section (on the GPU machine)
    python3 benchmarks/gpu.py --sections sample --presets cifar10
    python3 benchmarks/gpu.py --smoke                          # tiny sizes, runs on a CPU in seconds

Sections (each prints markdown tables and appends them to ``$OUT/<section>.md`` as rows come in):

- ``correctness``: the GPU's images (bf16 autocast, graphed forward) against the CPU's (fp32) for the same seeds, and
  an image alone against the same image in a mixed batch on the GPU (graphed and eager fixed-shape forward).
- ``sample``: DDIM-50 / DPM-Solver++-20 / DDPM-1000 at batch 64 through ``ddpm.generate_images``: the eager fixed-size
  forward (the baseline, what the engine ran before) against ``ddpm.graphs.graphed_forward`` and variants.
- ``train``: the CIFAR-10 training step at batch 512 and 128: the step as the workers run it, channels-last,
  compiled (the previous table's setting, the baseline for ratios), and a sync-free step captured whole in a CUDA
  graph; one ``torch.profiler`` trace of the compiled step with its kernel time by category.

Random weights throughout (a forward pass costs the same); presets as in ``configs/*.yaml`` (digits: class-
conditional, 10 classes; cifar10: unconditional). Only the core is imported, so this runs without Ray or MLflow.
Every section has a time budget and continues past a failing row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import os
import shutil
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ddpm import (NoiseSchedule, UNet, UNetConfig, checkpoint, count_parameters, fixed_size_forward,  # noqa: E402
                  from_labels, generate_images, noise_from_seeds, sample, to_uint8)
from ddpm.ema import EMA  # noqa: E402
from ddpm.graphs import graphed_forward  # noqa: E402
from ddpm.losses import diffusion_loss  # noqa: E402
from ddpm.training import train_step  # noqa: E402

MODEL_OPTIONS = {"digits": dict(num_classes=10), "cifar10": {}, "tiny": dict(num_classes=3)}
T0 = time.monotonic()


# -- reporting ------------------------------------------------------------------------------------------------------
class Report:
    """Prints markdown and appends it to $OUT/<name>.md as it goes, so a run cut short keeps what it measured."""

    def __init__(self, name: str):
        out = os.environ.get("OUT")
        self.path = os.path.join(out, f"{name}.md") if out else None

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def guarded(report, what):
    """Run a row; on failure print the error (and where) and carry on."""

    def run(fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as exc:  # OOM, a capture or compiler failure: report it, keep the rest of the table
            report(f"<!-- {what}: {type(exc).__name__}: {str(exc)[:300]} -->")
            traceback.print_exc()
            return None

    return run


def build(preset: str, device, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.preset(preset, **MODEL_OPTIONS[preset])).eval().to(device)


def serving_flags(device):
    """What the engine serves with (``deploy.engine.pick_device``): cuDNN's heuristic choice, deterministic."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# -- correctness ----------------------------------------------------------------------------------------------------
def section_correctness(args, device, report: Report):
    report("\n## Correctness: GPU (bf16 autocast, graphed forward) against CPU (fp32), same seeds\n")
    serving_flags(device)
    cpu = torch.device("cpu")
    schedule = NoiseSchedule.linear()
    rows, steps = args.corr_rows, args.corr_steps
    report(f"DDIM-{steps}, {args.corr_images} images, forward rows {rows}; random weights read as x_0 predictions "
           f"(prediction_type 'sample'), so the images are not saturated; digits with class labels and guidance 1.1.")
    report("\n| preset | check | result |\n|---|---|---|")
    run = guarded(report, "correctness")
    for preset in args.presets:
        if preset not in args.presets_available:
            continue
        run(_correctness_preset, preset, args, device, cpu, schedule, rows, steps, report)


def _correctness_preset(preset, args, device, cpu, schedule, rows, steps, report):
    cpu_model = build(preset, cpu)
    gpu_model = copy.deepcopy(cpu_model).to(device)
    conditional = cpu_model.config.num_classes > 0
    n = args.corr_images
    seeds = list(range(1000, 1000 + n))
    labels = [i % cpu_model.config.num_classes for i in range(n)] if conditional else None
    guidance = 1.1 if conditional else 1.0
    settings = dict(condition=from_labels(labels, n), sampler="ddim", steps=steps, guidance_scale=guidance)
    cpu_loaded = checkpoint.LoadedModel(cpu_model, schedule, "sample")
    gpu_loaded = checkpoint.LoadedModel(gpu_model, schedule, "sample")
    graphed = graphed_forward(gpu_model, rows)

    # One network call at t = 500: bf16 GPU against fp32 CPU, relative to the output's spread.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, *cpu_loaded.sample_shape, generator=g)
    t = torch.full((rows,), 500, dtype=torch.long)
    y = torch.arange(rows) % cpu_model.config.num_classes if conditional else None
    with torch.no_grad():
        ref = fixed_size_forward(cpu_model, rows)(x, t, y)
        with _autocast(device):
            got = graphed(x.to(device), t.to(device), None if y is None else y.to(device)).float().cpu()
    rel = float((got - ref).abs().max() / ref.std())
    report(f"| {preset} | one forward at t=500: max abs diff / std of output | {rel:.2e} |")

    t0 = time.perf_counter()
    cpu_images = generate_images(cpu_loaded, seeds, forward_rows=rows, **settings)
    cpu_s = time.perf_counter() - t0
    gpu_images = generate_images(gpu_loaded, seeds, forward=graphed, **settings)
    eager_images = generate_images(gpu_loaded, seeds, forward_rows=rows, **settings)
    d = np.abs(cpu_images.astype(np.int16) - gpu_images.astype(np.int16))
    report(f"| {preset} | images, GPU graphed vs CPU: max / mean abs diff (levels of 255) | {d.max()} / {d.mean():.3f} |")
    report(f"| {preset} | images, GPU graphed vs CPU: pixels differing at all / by more than 2 levels | "
           f"{(d > 0).mean():.2%} / {(d > 2).mean():.2%} |")
    e = np.abs(eager_images.astype(np.int16) - gpu_images.astype(np.int16))
    report(f"| {preset} | images, GPU graphed vs GPU eager fixed-size: identical / max diff | "
           f"{bool((e == 0).all())} / {e.max()} |")
    report(f"| {preset} | CPU reference time ({n} images) | {cpu_s:.1f} s |")

    # Seed independence on the GPU: image k alone, and inside a mixed batch (other seeds, labels, more than `rows`).
    k = 3
    others = [77, 78, seeds[k], *range(5000, 5000 + rows + 2)]
    classes = cpu_model.config.num_classes
    other_labels = None if labels is None else [1, 2, labels[k], *[(i * 7) % classes for i in range(rows + 2)]]
    for name, fwd in (("graphed", graphed), ("eager fixed-size", None)):
        extra = dict(forward=fwd) if fwd is not None else dict(forward_rows=rows)
        alone = generate_images(gpu_loaded, [seeds[k]], **{**settings, "condition": from_labels(
            None if labels is None else labels[k:k + 1], 1)}, **extra)
        mixed = generate_images(gpu_loaded, others, **{**settings, "condition": from_labels(other_labels, len(others))},
                                **extra)[2]
        report(f"| {preset} | GPU {name}: image alone == same seed in a mixed batch of {len(others)} | "
               f"{bool(np.array_equal(alone[0], mixed))} |")


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# -- sampling -------------------------------------------------------------------------------------------------------
def trajectory_graph(model, schedule, rows, shape, sampler, steps, device):
    """The whole sampler run (every step's network call and update) captured as one CUDA graph, for deterministic
    samplers at a fixed batch shape: x_T in, x_0 out. Benchmark-only: measures what capturing the update adds."""
    x_T = torch.zeros((rows, *shape), device=device)

    def net(x, t, y=None):
        return model(x, t)

    cast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), cast:
            sample(net, schedule, x_T, sampler=sampler, steps=steps)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), cast:
            out = sample(net, schedule, x_T, sampler=sampler, steps=steps)

    def generate(seeds):
        with torch.inference_mode():
            noise, _ = noise_from_seeds(seeds, shape, device)
            x_T.zero_()
            x_T[:len(seeds)].copy_(noise)
            graph.replay()
            return to_uint8(out[:len(seeds)])

    return generate


def time_generate(fn, reps):
    """Median wall time of ``reps`` calls (each ends with the images on the host, hence synchronised)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section_sample(args, device, report: Report, budget: Budget):
    gpu = device.type == "cuda"
    serving_flags(device)
    batch = args.sample_batch
    report(f"\n## Sampling at batch {batch}: eager fixed-size forward against captured CUDA graphs\n")
    report(f"Through `ddpm.generate_images` (noise from per-image CPU generators, uint8 out), bf16 autocast on the "
           f"GPU, the engine's cuDNN settings (deterministic, no autotuning) unless the row says otherwise; forward "
           f"rows = batch = {batch}; median of {args.reps} runs after a warm-up run that also captures the graph.")
    report("\n| preset | sampler | steps | forward | images/s | ms per step | vs eager |\n|---|---|---|---|---|---|---|")
    run = guarded(report, "sample")
    schedule = NoiseSchedule.linear()
    plan = [("ddim", 50), ("dpm++", 20), ("ddpm", 1000)] if not args.smoke else [("ddim", 5), ("dpm++", 4)]
    plan = [(s, n) for s, n in plan if s in args.samplers]
    short = not args.all_variants  # only the eager and graphed rows (and the compiled one, if asked for)
    for preset in args.presets:
        if budget.left() < 10:
            report(f"<!-- sample: budget spent before {preset} -->")
            break
        model = build(preset, device)
        loaded = checkpoint.LoadedModel(model, schedule, "epsilon")
        seeds = list(range(batch))
        variants = [("eager, fixed-size", lambda: fixed_size_forward(model, batch)),
                    ("graphed", lambda: graphed_forward(model, batch))]
        if gpu and not short:
            cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            bf = copy.deepcopy(model).to(torch.bfloat16)
            variants += [("graphed, channels-last input", lambda: graphed_forward(model, batch, channels_last=True)),
                         ("graphed, channels-last weights (copy)",
                          lambda: graphed_forward(cl, batch, channels_last=True)),
                         ("graphed, bf16 weights (copy)", lambda: graphed_forward(bf, batch))]
        eager_ips = {}
        for sampler, steps in plan:
            for name, make in variants:
                if sampler != "ddim" and name not in ("eager, fixed-size", "graphed"):
                    continue
                if sampler == "ddpm" and name == "eager, fixed-size" and gpu:
                    continue  # 1000 eager steps take long on the device; the DDIM rows give the ratio
                if budget.left() < 5:
                    break
                ips = run(_sample_row, loaded, seeds, sampler, steps, make, args.reps if steps <= 50 else 1)
                if ips is None:
                    continue
                if name.startswith("eager"):
                    eager_ips[sampler] = ips
                ratio = f"{ips / eager_ips[sampler]:.2f}x" if sampler in eager_ips else "-"
                report(f"| {preset} | {sampler} | {steps} | {name} | {ips:,.1f} | {1000 * batch / ips / steps:.2f} "
                       f"| {ratio} |")
        if gpu and not short and budget.left() > 10:
            # The whole DDIM trajectory in one graph (network calls and updates).
            def whole():
                generate = trajectory_graph(model, schedule, batch, loaded.sample_shape, "ddim", 50, device)
                generate(seeds)
                dt = time_generate(lambda: generate(seeds), args.reps)
                same = np.array_equal(generate(seeds), generate_images(loaded, seeds, steps=50,
                                                                      forward=graphed_forward(model, batch)))
                return batch / dt, same

            got = run(whole)
            if got:
                ips, same = got
                report(f"| {preset} | ddim | 50 | whole trajectory graphed (same bytes as graphed: {same}) | "
                       f"{ips:,.1f} | {1000 * batch / ips / 50:.2f} | {ips / eager_ips.get('ddim', ips):.2f}x |")
        if gpu and not short and budget.left() > 10:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
            tuned = copy.deepcopy(model)
            ips = run(_sample_row, loaded, seeds, "ddim", 50, lambda: graphed_forward(tuned, batch), args.reps)
            serving_flags(device)
            if ips:
                report(f"| {preset} | ddim | 50 | graphed, cudnn.benchmark on | {ips:,.1f} | "
                       f"{1000 * batch / ips / 50:.2f} | {ips / eager_ips.get('ddim', ips):.2f}x |")
        if gpu and preset in args.compile_sampling and budget.left() > 45:
            compiled = torch.compile(copy.deepcopy(model), dynamic=False)
            t0 = time.perf_counter()
            ips = run(_sample_row, loaded, seeds, "ddim", 50,
                      lambda: graphed_forward(compiled, batch, conditional=model.config.num_classes > 0), args.reps)
            if ips:
                report(f"| {preset} | ddim | 50 | compiled + graphed (compile+capture {time.perf_counter() - t0:.0f} s)"
                       f" | {ips:,.1f} | {1000 * batch / ips / 50:.2f} | {ips / eager_ips.get('ddim', ips):.2f}x |")
        del model, loaded, variants
        if gpu:
            torch.cuda.empty_cache()


def _sample_row(loaded, seeds, sampler, steps, make_forward, reps):
    forward = make_forward()
    # generate_images uses loaded.model only for its device; the forward carries the network (a copy, for variants).
    generate_images(loaded, seeds, sampler=sampler, steps=min(steps, 3), forward=forward)  # warm-up, capture
    dt = time_generate(lambda: generate_images(loaded, seeds, sampler=sampler, steps=steps, forward=forward), reps)
    return len(seeds) / dt


# -- training -------------------------------------------------------------------------------------------------------
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


def train_flops_per_image(model, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model, NoiseSchedule.linear(), x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


class Trainer:
    """One model and optimizer per training variant; ``step()`` runs one optimisation step."""

    def __init__(self, model, batch, device, *, channels_last, compiled=None, graphed=False, sync_free=False):
        self.model, self.device = model, device
        self.net = compiled if compiled is not None else model
        cfg = model.config
        self.x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device).clamp(-1, 1)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.schedule = NoiseSchedule.linear()
        gpu = device.type == "cuda"
        extra = dict(fused=True, capturable=graphed) if gpu else {}
        self.opt = torch.optim.Adam(model.parameters(), lr=2e-4, **extra)
        self.ema = EMA(model, decay=0.9999, warmup=False)
        self.params = list(model.parameters())
        self.shadow = [self.ema.shadow[n] for n, _ in model.named_parameters()]
        self.ab = self.schedule.alphas_cumprod.to(device, torch.float32)  # (T,) on the device: no copy per step
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=gpu)
        self.sync_free, self.graph = sync_free or graphed, None
        if graphed:
            self._capture()

    def _worker_step(self):
        """What a training worker runs: ddpm.training.train_step (its loss and norm come back as Python floats),
        then the EMA update."""
        train_step(self.net, self.opt, self.schedule, self.x, lr=2e-4,
                   autocast_dtype=torch.bfloat16 if self.device.type == "cuda" else None)
        self.ema.update(self.model)

    def _sync_free_step(self):
        """The same work (L_simple with eps targets, uniform t; clip at 1; Adam; EMA) with the schedule's table on the
        device and nothing read back: no host-device sync, so it can be captured in a CUDA graph."""
        x_0 = self.x
        b = x_0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (b,), device=x_0.device)
        eps = torch.randn_like(x_0)
        ab = self.ab[t].reshape(b, 1, 1, 1)
        x_t = ab.sqrt() * x_0 + (1 - ab).sqrt() * eps
        with torch.autocast(**self.autocast):
            pred = self.net(x_t, t)
        loss = (pred.float() - eps).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        torch._foreach_lerp_(self.shadow, self.params, 1 - 0.9999)
        return loss

    def _capture(self):
        # Warm up on a side stream (compiles, cuDNN autotuning, optimizer state), then record one whole step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._sync_free_step()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates the grads from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._sync_free_step()

    def step(self):
        if self.graph is not None:
            self.graph.replay()
        elif self.sync_free:
            self.opt.zero_grad(set_to_none=True)
            self._sync_free_step()
        else:
            self._worker_step()

    def rate(self, steps, warmup):
        for _ in range(warmup):
            self.step()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")
        return self.x.shape[0] * steps / dt, peak


KERNEL_CATEGORIES = [  # first match wins; lower-case substrings of kernel names
    ("layout transforms (NCHW <-> NHWC)", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("attention (flash / mem-efficient / math)", ("flash", "fmha", "attention", "efficient_attention", "softmax")),
    ("convolution (cuDNN)", ("conv", "cudnn", "xmma", "implicit", "dgrad", "wgrad", "fprop", "nhwc", "nchw")),
    ("matmul (cuBLAS / CUTLASS)", ("gemm", "cutlass", "nvjet", "cublas", "sm90_")),
    ("group norm", ("group_norm", "groupnorm", "rowwisemoments", "compute_stats", "norm")),
    ("optimizer, clip, EMA (foreach / fused)", ("adam", "multi_tensor", "foreach", "lerp", "fused_adam")),
    ("Triton (compiled fusions)", ("triton",)),
    ("copies, casts, concatenation", ("copy", "cast", "cat", "memcpy", "memset")),
]


def kernel_breakdown(prof, report: Report, steps: int):
    """Device time per kernel category, and the top kernels, from a profiler run of ``steps`` steps."""
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0
              and str(getattr(e, "device_type", "")).endswith("CUDA")]
    total = sum(e.self_device_time_total for e in events)
    if not total:
        report("(no device kernels recorded)")
        return
    by_cat: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other elementwise")
        by_cat[cat] = by_cat.get(cat, 0.0) + e.self_device_time_total
    report(f"\nKernel time per step: {total / steps / 1000:.1f} ms (sum of kernel durations)\n")
    report("| category | ms per step | share |\n|---|---|---|")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        report(f"| {cat} | {us / steps / 1000:.2f} | {us / total:.1%} |")
    report("\n| top kernels | calls per step | ms per step | share |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        report(f"| `{e.key[:90]}` | {e.count / steps:.0f} | {e.self_device_time_total / steps / 1000:.2f} | "
               f"{e.self_device_time_total / total:.1%} |")


def section_train(args, device, report: Report, budget: Budget):
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset = args.train_preset
    peak = bf16_peak_tflops(device) if gpu else None
    model = build(preset, device).train()
    flops = train_flops_per_image(model, device)
    report(f"\n## Training step: {preset} ({count_parameters(model) / 1e6:.2f}M parameters), bf16 autocast, fused "
           f"Adam, clip 1.0, EMA\n")
    if peak:
        report(f"Measured bf16 matmul peak in this run: {peak:.0f} TFLOP/s; model FLOPs per image (forward + "
               f"backward, `torch.utils.flop_counter`): {flops / 1e9:.1f} GFLOP. cudnn.benchmark on, TF32 allowed.")
    report(f"{args.train_steps} timed steps after warm-up.\n")
    report("| batch | step | images/s | peak mem GiB | model TFLOP/s | of bf16 peak | vs compiled |")
    report("|---|---|---|---|---|---|---|")
    run = guarded(report, "train")
    rates: dict[tuple[int, str], float] = {}
    baseline = "compiled, channels-last, worker step (baseline)"

    def row(batch, name, trainer_fn, min_left=None, warmup=3):
        if budget.left() < (min_left or args.train_min_left):
            report(f"<!-- train: too little time left ({budget.left():.0f} s) for batch {batch}, {name} -->")
            return None
        t0 = time.perf_counter()
        trainer = trainer_fn()
        ips, mem = trainer.rate(args.train_steps, warmup)
        setup = time.perf_counter() - t0 - batch * args.train_steps / ips
        rates[(batch, name)] = ips
        tflops = ips * flops / 1e12
        ratio = f"{ips / rates[(batch, baseline)]:.2f}x" if (batch, baseline) in rates else "-"
        report(f"| {batch} | {name} | {ips:,.0f} | {mem:.2f} | {tflops:.1f} | {tflops / peak:.1%} | {ratio} |"
               if peak else f"| {batch} | {name} | {ips:,.0f} | - | - | - | {ratio} |")
        print(f"  ({name}: set-up, warm-up and compile {setup:.0f} s)", flush=True)
        return trainer, ips

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last) if gpu else model
    compiled = torch.compile(cl_model, dynamic=False) if gpu and not args.no_compile else None
    compile_left = args.train_compile_left
    every = args.all_steps
    for i, batch in enumerate(args.train_batches):
        # At the first batch the previous table's setting (compiled) comes first: the ratios' baseline and the
        # profile. At the next batches the compiled rows come last: each new shape compiles again.
        if compiled is not None and i == 0:
            got = run(row, batch, baseline, lambda: Trainer(cl_model, batch, device, channels_last=True,
                                                            compiled=compiled), compile_left)
            if got and args.profile:
                run(profile_step, got[0], report, args)
        got = run(row, batch, "eager, worker step (what the workers run)",
                  lambda: Trainer(model, batch, device, channels_last=False))
        if compiled is None and i == 0 and got and args.profile:  # no compiler here (CPU): profile the eager step
            run(profile_step, got[0], report, args)
        if not gpu:
            run(row, batch, "eager, sync-free step", lambda: Trainer(model, batch, device, channels_last=False,
                                                                     sync_free=True))
            continue
        if every:
            run(row, batch, "eager, channels-last, worker step", lambda: Trainer(cl_model, batch, device,
                                                                                   channels_last=True))
            run(row, batch, "eager, channels-last, sync-free step in a CUDA graph",
                lambda: Trainer(cl_model, batch, device, channels_last=True, graphed=True))
        if compiled is None:
            continue
        if every:
            if i > 0:
                run(row, batch, baseline, lambda: Trainer(cl_model, batch, device, channels_last=True,
                                                          compiled=compiled), compile_left)
            run(row, batch, "compiled, channels-last, sync-free step",
                lambda: Trainer(cl_model, batch, device, channels_last=True, compiled=compiled, sync_free=True))
        run(row, batch, "compiled, channels-last, sync-free step in a CUDA graph",
            lambda: Trainer(cl_model, batch, device, channels_last=True, compiled=compiled, graphed=True),
            compile_left if i > 0 and not every else None)
        if i > 0 and not every:  # compiled at this shape now: the baseline costs no second compile
            run(row, batch, baseline, lambda: Trainer(cl_model, batch, device, channels_last=True, compiled=compiled))
        torch.cuda.empty_cache()
    if rates:
        report("\n| batch | step | vs compiled worker step at that batch |\n|---|---|---|")
        for (batch, name), ips in rates.items():
            if (batch, baseline) in rates:
                report(f"| {batch} | {name} | {ips / rates[(batch, baseline)]:.2f}x |")


def profile_step(trainer: Trainer, report: Report, args):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    steps = 3
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        sync(trainer.device)
    report(f"\n### Profile of the {'compiled' if trainer.net is not trainer.model else 'eager'} step at batch "
           f"{trainer.x.shape[0]} ({steps} steps, torch.profiler)")
    if trainer.device.type == "cuda":
        kernel_breakdown(prof, report, steps)
    else:
        report("```\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10) + "\n```")
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "train_trace.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
        report(f"\nTrace: `train_trace.json.gz` ({os.path.getsize(path + '.gz') / 2**20:.1f} MiB, chrome://tracing).")
    report("\n| batch | step | images/s | peak mem GiB | model TFLOP/s | of bf16 peak | vs compiled |")
    report("|---|---|---|---|---|---|---|")


# -- main -----------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="correctness,sample,train")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU check of this script)")
    parser.add_argument("--presets", default=None, help="default: digits,cifar10 (smoke: tiny)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for each section (default per section)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samplers", default="ddim,dpm++,ddpm", help="sampling rows to run")
    parser.add_argument("--all-variants", action="store_true",
                        help="sampling: also channels-last, bf16-weight, whole-trajectory and cudnn.benchmark rows")
    parser.add_argument("--compile-sampling", default="",
                        help="presets whose network is also torch.compile'd and graphed, time permitting ('' for none)")
    parser.add_argument("--corr-images", type=int, default=16)
    parser.add_argument("--corr-rows", type=int, default=8)
    parser.add_argument("--corr-steps", type=int, default=20)
    parser.add_argument("--train-preset", default=None)
    parser.add_argument("--train-batches", default="512,128")
    parser.add_argument("--train-steps", type=int, default=15)
    parser.add_argument("--train-min-left", type=float, default=15, help="skip a training row with less time left")
    parser.add_argument("--train-compile-left", type=float, default=90, help="the same, for rows that compile")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--all-steps", action="store_true",
                        help="training: also the eager channels-last rows and the compiled sync-free step without a graph")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args()
    if args.smoke:
        args.presets = args.presets or "tiny"
        args.sample_batch, args.reps, args.corr_images, args.corr_rows, args.corr_steps = 4, 1, 4, 2, 3
        args.train_preset = args.train_preset or "tiny"
        args.train_batches, args.train_steps = "4", 2
    args.presets = (args.presets or "digits,cifar10").split(",")
    args.compile_sampling = [p for p in args.compile_sampling.split(",") if p]
    args.samplers = args.samplers.split(",")
    args.presets_available = set(MODEL_OPTIONS)
    args.train_preset = args.train_preset or "cifar10"
    args.train_batches = [int(b) for b in args.train_batches.split(",")]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; cuda {torch.version.cuda}; cudnn "
          f"{torch.backends.cudnn.version() if device.type == 'cuda' else '-'}", flush=True)
    budgets = {"correctness": 30, "sample": 50, "train": 255}
    for section in args.sections.split(","):
        report = Report(section)
        t0 = time.monotonic()
        budget = Budget(args.budget or budgets[section])
        try:
            if section == "correctness":
                section_correctness(args, device, report)
            elif section == "sample":
                section_sample(args, device, report, budget)
            elif section == "train":
                section_train(args, device, report, budget)
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as exc:
            report(f"<!-- {section} failed: {type(exc).__name__}: {str(exc)[:300]} -->")
            traceback.print_exc()
        print(f"[{section}: {time.monotonic() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
