"""Quality ablation on scikit-learn's digits (16x16 grey): what gets FD-cls closest to its floor in 5 minutes?

    python benchmarks/quality.py --threads 1                      # every run (skips runs already measured)
    python benchmarks/quality.py --runs base,cosine --threads 1   # some of them
    python benchmarks/quality.py --table                          # print the table from the saved results
    python benchmarks/quality.py --speed --runs base,patch2_narrow --threads 1   # training images/s, no training
    python benchmarks/quality.py --threads 1 --data .ddpm/data/digits --out .ddpm/quality-pipeline \
        --runs minsnr,patch2_narrow                               # on the pipeline's own processed digits

Each run trains with ``pipelines.train.local.train_local`` (one process, the step function the Ray loop uses) on
the digits exactly as ``ddpm train-local`` reads them (bilinear 8 -> 16 resize), or with ``--data`` on a processed
dataset such as the one ``make quickstart`` writes to ``.ddpm/data/digits`` (LANCZOS resize, what the pipeline trains
on; its own classifier, so its ratios are comparable only with each other), then scores the EMA weights with
``pipelines.evaluate.quality``: DDIM-50 (trailing spacing), n = 500 samples (seeds 0..499) against 500 train-half images,
beside the floor of 500 held-out images against the same 500 (FD-cls in the cached digits classifier's features).

Fair under a shared, noisy CPU: a run's length is a fixed *compute budget*, not minutes. "5 minutes on the 2-core
machine" is 300 s x 432 images/s x 0.38 GFLOP/image (FACTS.md: a 1.1M U-Net's training step measured at 432
images/s on the quiet machine, 0.38 GFLOP/image by ``torch.utils.flop_counter``) = 49.2 TFLOP; a run trains on
49.2 TFLOP / (its own model's GFLOP per image) images, rounded to whole batches. Wall-clock and CPU seconds are
printed too, but they depend on what else the machine was doing. FLOPs are not seconds: a narrow network runs at
fewer FLOP/s on this CPU (the 32-channel 2x2-patch U-Net: about 0.7x the digits U-Net's), so the FLOP budget gives it
more CPU time than the others; the CPU-seconds column shows how much.

Results (and checkpoints) go to ``--out`` (default ``.ddpm/quality``), one folder per run; a run whose
``result.json`` exists is not trained again unless ``--force``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BUDGET_GFLOP = 300 * 432 * 0.38  # 5 minutes of the quiet 2-core machine, in training FLOPs
NUM_SAMPLES = 500
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"

# The textbook recipe: the project's digits U-Net, DDPM's linear schedule, eps-prediction with L_simple,
# AdamW at 1e-3 after a 50-step warm-up, constant, batch 128, EMA 0.999 with the (1+k)/(10+k) warm-up.
TEXTBOOK = {
    "model": {"preset": "digits"},
    "schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1.0e-4, "beta_end": 0.02},
    "train": {"batch_size": 128, "lr": 1.0e-3, "lr_decay": "constant", "warmup_images": 6400, "optimizer": "adamw",
              "grad_clip": 1.0, "ema_decay": 0.999, "ema_warmup": True, "prediction_type": "epsilon",
              "min_snr_gamma": None, "class_conditional": False, "random_flip": False, "log_every_steps": 100,
              "precision": "fp32"},
}

# name -> (what changes, overrides on TEXTBOOK). Each run keeps the best changes before it (a greedy forward
# selection: with one run per idea there is no budget for a full grid) and lists all of its overrides, so it
# reproduces on its own. "digits.yaml" is the tuned preset as shipped (TEXTBOOK is not applied to it).
COSINE = ["train.lr_decay=cosine"]
COND = COSINE + ["train.class_conditional=true"]
VPRED = COND + ["train.prediction_type=v_prediction"]
MINSNR = VPRED + ["train.min_snr_gamma=5"]
BF16 = MINSNR + ["train.precision=bf16"]
IMPORTANCE = BF16 + ["train.timestep_sampling=importance"]
SHORT = ["train.total_images=64000"]  # about what 5 minutes through the pipeline train on a busy day
LR2_64K = SHORT + ["train.lr=2e-3"]
SMALL_85K = ["model.num_res_blocks=1", "train.total_images=85120"]
# The U-Net on 2x2 patches (8x8 grid, 4 channels): levels at 8, 4, 2 with attention at 4x4; 64 base channels keep
# the FLOPs per image of the 16x16 digits U-Net.
PATCH2 = ["model.patch_size=2", "model.base_channels=64", "model.attention_resolutions=[4]"]


def seeds(name: str, description: str, overrides: list[str], short: str) -> dict[str, tuple[str, list[str]]]:
    """A run and its repeats with training seeds 1 and 2 (``NAME_seed1``, ``NAME_seed2``): the spread of one row."""
    runs = {name: (description, overrides)}
    for seed in (1, 2):
        runs[f"{name}_seed{seed}"] = (f"{short}, training seed {seed}", overrides + [f"train.seed={seed}"])
    return runs


RUNS: dict[str, tuple[str, list[str]]] = {
    "base": ("textbook recipe", []),
    "cosine": ("+ cosine LR decay to 0", COSINE),
    "cond": ("+ class-conditional (label dropout 0.1)", COND),
    "vpred": ("+ v-prediction", VPRED),
    "minsnr": ("+ min-SNR-5 loss weighting", MINSNR),
    "small": ("+ 1 residual block per level (1.11M): 1.47x the images", MINSNR + ["model.num_res_blocks=1"]),
    "batch64": ("+ batch 64: twice the optimizer steps", MINSNR + ["train.batch_size=64"]),
    "cosine_schedule": ("+ cosine noise schedule (instead of batch 64)", MINSNR + ["schedule.kind=cosine"]),
    "lr2e-3": ("+ lr 2e-3 (instead of batch 64)", MINSNR + ["train.lr=2e-3"]),
    "patch2": ("+ 2x2 patches, 64 channels (6.5M): the same FLOPs on an 8x8 grid", MINSNR + PATCH2),
    "patch2_narrow": ("+ 2x2 patches, 32 channels (1.6M): 4x the images", MINSNR + PATCH2 + ["model.base_channels=32"]),
    "minsnr_seed1": ("minsnr, training seed 1 (the spread of one row)", MINSNR + ["train.seed=1"]),
    "minsnr_seed2": ("minsnr, training seed 2", MINSNR + ["train.seed=2"]),
    **seeds("minsnr_bf16", "minsnr, bf16 autocast (AMX)", BF16, "minsnr, bf16 autocast"),
    **seeds("importance", "minsnr, bf16, + timesteps drawn by importance", IMPORTANCE, "importance"),
    **seeds("importance_64k", "importance, 64,000 images", IMPORTANCE + SHORT, "importance, 64,000 images"),
    **seeds("lr2e-3_64k", "importance, lr 2e-3, 64,000 images", IMPORTANCE + LR2_64K, "lr 2e-3, 64,000 images"),
    # One residual block per level trains 1.33x the images per second in bf16 (1 thread, alternating): the same
    # compute as the 64,000-image runs.
    **seeds("small_85k", "importance, 1 residual block per level (1.11M), 85,120 images", IMPORTANCE + SMALL_85K,
            "small, 85,120 images"),
    # Where the importance-sampled draws go: min-SNR-2 moves them toward noisier timesteps (the SNR at which
    # min(SNR, gamma)/(SNR + 1) peaks is gamma).
    **seeds("gamma2_64k", "importance, min-SNR-2, 64,000 images", IMPORTANCE + SHORT + ["train.min_snr_gamma=2"],
            "min-SNR-2, 64,000 images"),
    # Label dropout trains the unconditional branch, which only guidance (w != 1) uses; without it every image
    # trains the conditional model that the evaluation samples.
    "nodrop_64k": ("importance, no label dropout, 64,000 images", IMPORTANCE + SHORT + ["train.label_dropout=0"]),
    # DDPM's and ADM's initialisation: the last layer of every residual and attention branch, and the output, at 0.
    **seeds("zeroinit_64k", "importance, zero-initialised branches, 64,000 images",
            IMPORTANCE + SHORT + ["model.zero_init=true"], "zero-init, 64,000 images"),
    **seeds("zeroinit_lr2e-3_64k", "zero-init, lr 2e-3, 64,000 images", IMPORTANCE + LR2_64K + ["model.zero_init=true"],
            "zero-init, lr 2e-3, 64,000 images"),
    # Adam's second moment over ~100 steps instead of ~1,000: a 5-minute run takes about 500 steps, so with 0.999
    # the normalisation still remembers the first steps' large gradients at the end.
    **seeds("beta2_64k", "importance, Adam beta2 0.99, 64,000 images", IMPORTANCE + SHORT + ["train.adam_beta2=0.99"],
            "beta2 0.99, 64,000 images"),
    "digits.yaml": ("configs/digits.yaml as shipped", []),
}

# Guidance 2 is scored once, on the first conditional run (it raised FD-cls there); later runs score w = 1 only.
GUIDANCE = {"cond": (1.0, 2.0)}
# Runs added since the gate scores at w = 1.1 (configs/digits.yaml, pipeline.eval_guidance_scale) score both.
GUIDANCE |= {name: (1.0, 1.1) for name in RUNS if name.startswith("beta2_64k")}


def build_config(name: str, overrides: list[str]):
    """(the run's Config with its compute-matched ``total_images``, its GFLOP per training image)."""
    import yaml

    from pipelines.config import apply_overrides, from_dict

    raw = yaml.safe_load(CONFIG.read_text()) if name == "digits.yaml" else TEXTBOOK
    raw = apply_overrides(raw, overrides)
    config = from_dict(raw, name)
    batch = config.train.batch_size
    gflop = gflop_per_image(config)
    if any(o.startswith("train.total_images=") for o in overrides):  # a run that fixes its images keeps them
        return config, gflop
    total = int(BUDGET_GFLOP / gflop // batch * batch)
    return from_dict(apply_overrides(raw, [f"train.total_images={total}"]), name), gflop


def model_config(config):
    """The run's UNetConfig, with the digits' 10 classes when the run is class-conditional."""
    return (config.with_num_classes(10) if config.train.class_conditional else config).model


def gflop_per_image(config) -> float:
    """Training FLOPs (forward + backward) per image of one L_simple step, by torch.utils.flop_counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm import UNet, diffusion_loss

    model_cfg = model_config(config)
    net, schedule = UNet(model_cfg), config.schedule.build()
    x = torch.zeros(8, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    y = torch.zeros(8, dtype=torch.long) if config.train.class_conditional else None
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(net, schedule, x, condition=y, prediction_type=config.train.prediction_type).backward()
    return counter.get_total_flops() / 8 / 1e9


def run(name: str, out: Path, reference, images, labels) -> dict:
    import torch

    from ddpm import checkpoint, count_parameters, encode_png, make_grid
    from pipelines.evaluate.quality import EvalSettings, evaluate_model
    from pipelines.train.local import train_local

    description, overrides = RUNS[name]
    config, gflop = build_config(name, overrides)
    print(f"== {name}: {description}; {config.train.total_images:,} images", flush=True)
    cpu, wall = time.process_time(), time.monotonic()
    trained = train_local(config, images, labels, out_dir=out / name / "checkpoint",
                          class_names=[str(i) for i in range(10)], log=lambda line: print(f"  {line}", flush=True))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    result = {"name": name, "description": description, "overrides": overrides,
              "total_images": config.train.total_images, "gflop_per_image": gflop,
              "train_cpu_s": cpu, "train_wall_s": wall, "threads": torch.get_num_threads(),
              "last_loss": trained.last_loss, "evaluations": []}
    for weights in ("ema", "model") if name == "base" else ("ema",):
        loaded = checkpoint.load(trained.checkpoint, weights=weights)
        result["params"] = count_parameters(loaded.model)
        for w in GUIDANCE.get(name, (1.0,)):
            settings = EvalSettings(num_samples=NUM_SAMPLES, sampler="ddim", steps=50, guidance_scale=w,
                                    weights=weights)
            e = evaluate_model(loaded, reference, settings, log=lambda line: print(f"  {line}", flush=True))
            result["evaluations"].append({"weights": weights, "guidance_scale": w, **e.metrics})
            grid = make_grid(e.images[:100], ncols=10)
            (out / name / f"samples_{weights}_w{w:g}.png").write_bytes(encode_png(grid))
    (out / name / "result.json").write_text(json.dumps(result, indent=2))
    return result


def speed(names: list[str], steps: int = 10) -> str:
    """Training images/s of each run's model, batch and precision (``ddpm.training.train_step``), against ``base``.

    The runs take turns, one step each, so a busy machine slows them alike and the ratio to ``base`` stays fair.
    """
    import torch

    from ddpm import UNet
    from ddpm.training import train_step

    names = ["base"] + [n for n in names if n != "base"]
    steps_of = {}
    for n in names:
        config, _ = build_config(n, RUNS[n][1])
        tc, model_cfg = config.train, model_config(config)
        net, schedule = UNet(model_cfg), config.schedule.build()
        optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr)
        x = torch.randn(tc.batch_size, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
        y = torch.randint(0, 10, (tc.batch_size,)) if tc.class_conditional else None
        steps_of[n] = (tc.batch_size, functools.partial(train_step, net, optimizer, schedule, x, lr=tc.lr,
                                                        condition=y, **tc.step_options(x.device)))
    seconds = dict.fromkeys(names, 0.0)
    for i in range(steps + 2):  # the first two steps warm up
        for n, (_, step) in steps_of.items():
            start = time.perf_counter()
            step()
            if i >= 2:
                seconds[n] += time.perf_counter() - start
    rate = {n: steps * steps_of[n][0] / seconds[n] for n in names}
    lines = ["| run | training images/s | ratio to base |", "|---|---|---|"]
    lines += [f"| {n} | {rate[n]:.0f} | {rate[n] / rate['base']:.2f} |" for n in names]
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| run | change | params | GFLOP/img | images | weights, guidance | FD-cls | ratio to floor | "
             "precision | recall | train CPU s | train wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for e in r["evaluations"]:
            lines.append(
                f"| {r['name']} | {r['description']} | {r['params'] / 1e6:.2f}M | {r['gflop_per_image']:.3f} | "
                f"{r['total_images']:,} | {e['weights'].upper()}, w={e['guidance_scale']:g} | {e['fd_cls']:.3f} | "
                f"{e['fd_cls_ratio']:.2f} | {e['precision']:.3f} | {e['recall']:.3f} | {r['train_cpu_s']:.0f} | "
                f"{r['train_wall_s']:.0f} |")
    if results:
        e = results[0]["evaluations"][0]
        lines.append(f"\nFloor (held-out vs train, n={NUM_SAMPLES}): FD-cls {e['fd_cls_floor']:.3f}, precision "
                     f"{e['precision_floor']:.3f}, recall {e['recall_floor']:.3f}; classifier held-out accuracy "
                     f"{e['classifier_accuracy']:.3f}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--out", default=".ddpm/quality", help="results and checkpoints (default: %(default)s)")
    parser.add_argument("--data", default="digits",
                        help="`digits` (as `ddpm train-local` reads them) or a processed dataset, such as the "
                             "quickstart's .ddpm/data/digits (LANCZOS-resized PNGs, as the pipeline trains on them)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="train runs again even if they have results")
    parser.add_argument("--table", action="store_true", help="only print the table of saved results")
    parser.add_argument("--speed", action="store_true", help="only time the runs' training steps (no training)")
    args = parser.parse_args()
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    if args.threads and not args.table:
        import torch

        torch.set_num_threads(args.threads)
    if args.speed:
        print(speed(names))
        return 0
    out = Path(args.out)
    saved = {n: json.loads((out / n / "result.json").read_text()) for n in names
             if (out / n / "result.json").is_file()}
    if not args.table:
        import torch

        from ddpm import from_uint8
        from pipelines.evaluate.quality import load_data, prepare_reference
        from pipelines.train.local import digits_dataset

        pixels, labels = load_data(args.data, 16)  # (N, H, W, C) uint8, (N,)
        reference = prepare_reference(pixels, labels, num_samples=NUM_SAMPLES)
        if args.data == "digits":
            images, labels = digits_dataset(16)  # float, as train-local trains on them (not requantised)
        else:
            images, labels = from_uint8(pixels), torch.from_numpy(labels).long()  # as the pipeline's workers
        for n in names:
            if n not in saved or args.force:
                saved[n] = run(n, out, reference, images, labels)
    print(table([saved[n] for n in names if n in saved]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
