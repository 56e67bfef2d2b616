"""The quickstart's sample grid ([5/6]): its ten POST /generate requests one after another, against all ten at once.

The endpoint is what ``ddpm quickstart`` deploys (``ddpm serve``'s defaults: one Sampler replica of 1 CPU, dynamic
batching) over real HTTP on 127.0.0.1, serving the digits preset (16x16x1, class-conditional, random weights: a
forward pass costs the same whatever the weights). Each row is ``pipelines.commands.quickstart.generate_grid``'s
request: 10 images of one class, DDIM, guidance 1.1 (two network rows per image). Sequential and concurrent
alternate, ``--repeats`` times each, so that a change in the machine's other load hits both; the grids must be the
same bytes (an image never depends on its batch-mates).

    .venv/bin/python benchmarks/quickstart_grid.py            # DDIM-50 (the digits preset's eval_steps), 2 repeats
    .venv/bin/python benchmarks/quickstart_grid.py --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint  # noqa: E402
from deploy.serve_app import build_app  # noqa: E402
from pipelines.commands.quickstart import generate_grid, wait_healthy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per request [%(default)s]")
    parser.add_argument("--repeats", type=int, default=2, help="grids of each kind [%(default)s]")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ddpm-grid-bench-"))
    torch.manual_seed(0)
    classes = [str(i) for i in range(10)]
    checkpoint.save(folder / "digits", UNet(UNetConfig.preset("digits", num_classes=10)),
                    NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02), class_names=classes)
    os.environ.setdefault("RAY_worker_niceness", "0")  # level terms with this process (see benchmarks/serve.py)
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": str(folder / "digits"), "num_cpus": 1}), name="grid", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)

    rows = [{"class_label": label} for label in range(10)]
    grid = lambda concurrent: generate_grid(url, rows, steps=args.steps, guidance_scale=1.1,  # noqa: E731
                                            concurrent=concurrent)
    grid(True)  # warm-up: the replica's first forward passes
    times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    outputs = {}
    for _ in range(args.repeats):
        for kind in times:
            started = time.perf_counter()
            outputs[kind] = grid(kind == "concurrent")
            times[kind].append(time.perf_counter() - started)
    same = np.array_equal(outputs["sequential"], outputs["concurrent"])

    print(f"\n100 images (10 requests x 10), DDIM-{args.steps}, guidance 1.1, digits preset 16x16x1, one Sampler "
          f"replica of 1 CPU; {args.repeats} grids of each, alternating")
    print("| requests | grid wall time (s), each | mean (s) |")
    print("|---|---|---|")
    for kind, values in times.items():
        print(f"| {kind} | {', '.join(f'{v:.1f}' for v in values)} | {np.mean(values):.1f} |")
    print(f"\nconcurrent / sequential: {np.mean(times['concurrent']) / np.mean(times['sequential']):.2f}x the time; "
          f"same images: {same}")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
