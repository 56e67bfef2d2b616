"""Latent against pixel diffusion at the same CPU budget, on the 64x64 photo crops (issue 21, "Quality at matched
compute").

    # the latent side: the recipe's autoencoder and DDPM, 5 minutes each (about 15 minutes in all)
    .venv/bin/ddpm quickstart --recipe photos-latent --stop-when-done --workdir /tmp/qs-latent/w
    # the pixel side (10 minutes of training, the two budgets together) and both evaluations
    .venv/bin/python benchmarks/latent_quality.py --workdir /tmp/qs-latent/w --minutes 10
    # the evaluations again, at other settings, without training the pixel model again
    .venv/bin/python benchmarks/latent_quality.py --workdir /tmp/qs-latent/w --evaluate-only --num-samples 500 \
        --guidance 1.1

The pixel model is the recipe's U-Net (the digits widths: 32 base channels, multipliers (1, 2, 2)) on 64x64x3 images
with attention at its coarsest level (16x16), trained with the recipe's settings plus random flips (the latent side
stores mirrored latents instead), on 2 workers like the quickstart; compute is wall time on this machine, one run after
the other. Both models are scored as ``ddpm evaluate`` scores them (the same functions, in this process): FD-cls on
``--num-samples`` DDIM-50 samples, the held-out-versus-train floor beside it. One more row scores the latent model's
autoencoder alone: the held-out images encoded and decoded, against the same reference. No sampler can do better
than its decoder, so that row is the latent model's ceiling.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DDPM = str(Path(sys.executable).with_name("ddpm"))


def run(args: list[str], env: dict) -> float:
    """Run ``ddpm ARGS``; returns its wall seconds (its output goes to this terminal)."""
    start = time.monotonic()
    subprocess.run([DDPM, *args], check=True, env=env)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the photos-latent quickstart's --workdir")
    parser.add_argument("--minutes", type=float, default=10.0, help="the pixel model's training budget")
    parser.add_argument("--evaluate-only", action="store_true", help="score the newest photos-pixel version again")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    os.environ["DDPM_HOME"] = str(work)  # the quickstart's MLflow store, models and classifier cache
    processed = str(work / "data" / "photos-latent")
    if not any(p for p in (work / "runs").glob("photos-latent-*") if not p.name.endswith("-autoencoder")):
        raise SystemExit(f"no photos-latent run under {work / 'runs'}: run the quickstart first (module docstring)")

    train_s = None
    if not args.evaluate_only:
        name = f"pixel64-{time.strftime('%Y%m%d-%H%M%S')}"
        train_s = run(["train", "--data", processed, "--config", str(ROOT / "configs" / "photos-latent.yaml"),
                       "--set", f"train.max_minutes={args.minutes:g}", "--set", "train.random_flip=true",
                       "--set", "model.image_size=64", "--set", "model.in_channels=3",
                       "--set", "model.attention_resolutions=[16]", "--num-workers", "2",
                       "--storage", str(work / "runs"), "--name", name, "--register-as", "photos-pixel"],
                      dict(os.environ))
    rows = evaluate(processed, args.num_samples, args.guidance)

    print()
    if train_s is not None:
        print(f"pixel model trained {train_s:.0f} s wall (its {args.minutes:g}-minute budget plus start-up)")
    print(f"FD-cls on {args.num_samples} images (DDIM-50, guidance {args.guidance:g}) against {args.num_samples} "
          "reference crops; the floor: as many held-out crops")
    print()
    print("| images | FD-cls | floor | FD-cls / floor | precision | recall | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m, seconds in rows:
        print(f"| {label} | {m['fd_cls']:.1f} | {m['fd_cls_floor']:.2f} | {m['fd_cls_ratio']:.2f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {seconds:.0f} |")


def evaluate(processed: str, n: int, guidance: float) -> list[tuple[str, dict, float]]:
    """(label, metrics, seconds) for the latent model, the pixel model and the latent model's autoencoder alone."""
    import torch

    from ddpm import checkpoint, from_uint8, to_uint8
    from ddpm.metrics import frechet_distance_features, precision_recall
    from pipelines.evaluate import classifier
    from pipelines.evaluate.quality import EvalSettings, evaluate_model, load_data, prepare_reference
    from pipelines.registry import resolve_model

    images, labels = load_data(processed, 64)
    reference = prepare_reference(images, labels, num_samples=n)
    settings = EvalSettings(num_samples=n, sampler="ddim", steps=50, guidance_scale=guidance)
    rows = []
    for label, name in (("latent DDPM (autoencoder 5 min + DDPM 5 min)", "photos-latent"),
                        ("pixel DDPM (10 min)", "photos-pixel")):
        resolved = resolve_model(_latest(name))
        loaded = checkpoint.load(resolved.path, weights=settings.weights)  # as ddpm evaluate loads it
        start = time.monotonic()
        result = evaluate_model(loaded, reference, settings)
        rows.append((f"{label}, {name} v{resolved.version}", result.metrics, time.monotonic() - start))
        if name == "photos-latent":
            ae = loaded.autoencoder

    # the ceiling: held-out crops through the autoencoder, scored like samples
    start = time.monotonic()
    held = images[classifier.split(len(images))[1][:n]]
    with torch.inference_mode():
        recon = np.concatenate([to_uint8(ae.decode(ae.encode(from_uint8(held[i:i + 64]))))
                                for i in range(0, n, 64)])
    features = reference.extractors["fd_cls"](recon)
    fd = frechet_distance_features(features, reference.reference["fd_cls"])
    precision, recall = precision_recall(reference.reference["fd_cls"], features)
    floor = reference.floors["fd_cls"]
    rows.append(("held-out crops through the latent model's autoencoder (its ceiling)",
                 {"fd_cls": fd, "fd_cls_floor": floor, "fd_cls_ratio": fd / floor, "precision": precision,
                  "recall": recall}, time.monotonic() - start))
    return rows


def _latest(name: str) -> str:
    from pipelines import tracking

    versions = tracking.client().search_model_versions(f"name = '{name}'")
    if not versions:
        raise SystemExit(f"no registered model {name!r} in {tracking.tracking_uri()}")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


if __name__ == "__main__":
    main()
