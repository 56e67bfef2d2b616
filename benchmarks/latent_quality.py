"""Latent against pixel diffusion at the same CPU budget, on the 64x64 photo crops (issue 21, "Quality at matched
compute").

    # the latent side: the recipe's autoencoder and DDPM, 5 minutes each (about 15 minutes in all)
    .venv/bin/ddpm quickstart --recipe photos-latent --stop-when-done --workdir /tmp/qs-latent/w
    # the pixel side (10 minutes of training, the two budgets together) and both evaluations
    .venv/bin/python benchmarks/latent_quality.py --workdir /tmp/qs-latent/w --minutes 10

The pixel model is the recipe's U-Net (the digits widths: 32 base channels, multipliers (1, 2, 2)) on 64x64x3 images
with attention at its coarsest level (16x16), trained with the recipe's settings plus random flips (the latent side
stores mirrored latents instead), on 2 workers like the quickstart. Both models are then scored by ``ddpm evaluate``
with the same settings: FD-cls on ``--num-samples`` DDIM-50 samples against the photos' real-vs-real floor. Each run
is one process after the other on the same machine; compute is wall time on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args()

    work = Path(args.workdir).resolve()
    env = {**os.environ, "DDPM_HOME": str(work)}
    processed = str(work / "data" / "photos-latent")
    if not any(p for p in (work / "runs").glob("photos-latent-*") if not p.name.endswith("-autoencoder")):
        raise SystemExit(f"no photos-latent run under {work / 'runs'}: run the quickstart first (module docstring)")

    name = f"pixel64-{time.strftime('%Y%m%d-%H%M%S')}"
    train_s = run(["train", "--data", processed, "--config", str(ROOT / "configs" / "photos-latent.yaml"),
                   "--set", f"train.max_minutes={args.minutes:g}", "--set", "train.random_flip=true",
                   "--set", "model.attention_resolutions=[16]", "--num-workers", "2",
                   "--storage", str(work / "runs"), "--name", name, "--register-as", "photos-pixel"], env)

    rows = []
    for label, model in (("latent (autoencoder 5 min + DDPM 5 min)", "models:/photos-latent/latest"),
                         (f"pixel ({args.minutes:g} min)", "models:/photos-pixel/latest")):
        model = _latest(model.split("/")[1], env)  # the newest version of each
        out = work / "eval" / model.replace(":/", "-").replace("/", "-").replace("@", "-")
        eval_s = run(["evaluate", "--model", model, "--data", processed, "--num-samples", str(args.num_samples),
                      "--steps", "50", "--guidance-scale", str(args.guidance), "--out", str(out)], env)
        result = json.loads((out / "evaluation.json").read_text())[0]  # one Evaluation: settings and metrics
        rows.append((label, model, result, eval_s))

    print()
    print(f"pixel model trained {train_s:.0f} s wall (its {args.minutes:g}-minute budget plus start-up)")
    print(f"FD-cls on {args.num_samples} DDIM-50 samples, guidance {args.guidance:g}, against the photos' floor")
    print()
    print("| model | version | FD-cls | floor | FD-cls / floor | precision | recall | eval s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, model, r, eval_s in rows:
        m = r["metrics"]
        print(f"| {label} | {model} | {m['fd_cls']:.3f} | {m['fd_cls_floor']:.3f} | {m['fd_cls_ratio']:.2f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {eval_s:.0f} |")


def _latest(name: str, env: dict) -> str:
    out = subprocess.run([DDPM, "models", "list", name], check=True, env=env, capture_output=True, text=True).stdout
    versions = [int(line.split()[0]) for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    return f"models:/{name}/{max(versions)}"


if __name__ == "__main__":
    main()
