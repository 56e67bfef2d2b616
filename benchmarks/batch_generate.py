"""Distributed ``ddpm generate`` (Ray Data sampler actors writing shards) against single-process ``ddpm generate``
with the same threads, measured in the same run, and the peak memory of each at N and 4N images.

Every configuration runs the real command in a subprocess, one after another:

    single     ddpm generate --out images.npz                      one process, OMP_NUM_THREADS = T for T in --threads
    A x C      ddpm generate --output DIR --num-actors A --cpus-per-actor C   (Ray gives each actor C threads)

and each A x C row is compared with the single process of A*C threads (the same threads in all).

A thread samples the resident memory of the subprocess's whole process tree every 0.2 s (the driver, the local Ray
it starts, the actors). Reported: images/s over the command's wall time (Ray's start-up and the actors' model load
included) and the job's own rate (from its "[generate] ... images/s" line: actors' start included, Ray's not), each
with its ratio to single-process; peak RSS of the tree, of the driver, and of the largest sampler actor. The same
images come out of every row (checked: the fingerprints of the .npz and of the manifests agree).

    .venv/bin/python benchmarks/batch_generate.py [--model DIR] [--images 64] [--steps 20] [--threads 1 2] \\
        [--layouts 1x1 1x2 2x1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


class TreeMemory(threading.Thread):
    """Peak RSS (bytes) of a process and its descendants: total, the root's, and the largest ShardSampler actor's."""

    def __init__(self, pid: int, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every_s = psutil.Process(pid), every_s
        self.total = self.driver = self.actor = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                sizes = []
                for p in procs:
                    try:
                        sizes.append((p, p.memory_info().rss, " ".join(p.cmdline())))
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.total = max(self.total, sum(rss for _, rss, _ in sizes))
            self.driver = max(self.driver, next((rss for p, rss, _ in sizes if p.pid == self.root.pid), 0))
            self.actor = max([self.actor] + [rss for _, rss, cmd in sizes if "ShardSampler" in cmd])
            self.stopped.wait(self.every_s)


def run(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    memory = TreeMemory(proc.pid)
    memory.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    memory.stopped.set()
    memory.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    job = re.search(r"\[generate\] [\d,]+ images in [\d.]+ s with \d+ actor\(s\): ([\d.]+) images/s", out)
    fingerprint = re.search(r"fingerprint ([0-9a-f]{16})", out)
    return {"wall": wall, "job_rate": float(job.group(1)) if job else None, "total": memory.total,
            "driver": memory.driver, "actor": memory.actor, "fingerprint": fingerprint.group(1) if fingerprint else None}


def random_model(path: Path, preset: str) -> Path:
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint

    torch.manual_seed(0)
    return checkpoint.save(path, UNet(UNetConfig.preset(preset)), NoiseSchedule.linear(1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random --preset model)")
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--images", type=int, default=64, help="N; 4N is measured too")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="single-process thread counts")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "2x1"],
                        help="ACTORSxCPUS each; compared with the single process of as many threads")
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()
    args.layouts = [tuple(int(v) for v in layout.split("x")) for layout in args.layouts]

    from pipelines.generate.shards import images_fingerprint

    scratch = Path(tempfile.mkdtemp(prefix="ddpm-bench-batch-"))
    model = Path(args.model) if args.model else random_model(scratch / "model", args.preset)
    env = {**os.environ, "DDPM_HOME": str(scratch / "home"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    base = [sys.executable, "-m", "pipelines.cli", "generate", "--model", str(model), "--steps", str(args.steps),
            "--seed", "0"]
    mib = 2**20
    print(f"model {model} ({'given' if args.model else 'random ' + args.preset}), DDIM-{args.steps}, shards of "
          f"{args.shard_size}, single-process threads {args.threads}; load average {os.getloadavg()[0]:.1f} at start",
          flush=True)
    print("| N | path | actors x CPUs (threads) | wall s | images/s (wall) | ratio | job images/s | ratio | "
          "peak RSS tree MiB | driver MiB | largest actor MiB |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)

    def show(n: int, path: str, layout: str, r: dict, base: dict) -> None:
        rate, base_rate = n / r["wall"], n / base["wall"]
        job = r["job_rate"] if r["job_rate"] is not None else rate
        print(f"| {n:,} | {path} | {layout} | {r['wall']:.1f} | {rate:.1f} | {rate / base_rate:.2f} | {job:.1f} | "
              f"{job / base_rate:.2f} | {r['total'] / mib:.0f} | {r['driver'] / mib:.0f} | {r['actor'] / mib:.0f} |",
              flush=True)

    fingerprints: dict[int, set] = {}
    for n in (args.images, 4 * args.images):
        singles, fingerprints[n] = {}, set()
        for threads in args.threads:
            out = scratch / f"single-{n}-{threads}.npz"
            single = run(base + ["--num-images", str(n), "--out", str(out)], env | {"OMP_NUM_THREADS": str(threads)})
            with np.load(out) as f:
                fingerprints[n].add(images_fingerprint(f["images"])[:16])
            singles[threads] = single
            show(n, "single process", f"1 x {threads} threads", single, single)
        for actors, cpus in args.layouts:
            result = run(base + ["--num-images", str(n), "--output", str(scratch / f"ray-{n}-{actors}x{cpus}"),
                                 "--num-actors", str(actors), "--cpus-per-actor", str(cpus),
                                 "--shard-size", str(args.shard_size)], env)
            fingerprints[n].add(result["fingerprint"])
            same = actors * cpus if actors * cpus in singles else min(singles)
            show(n, "Ray Data actors", f"{actors} x {cpus} CPU (vs 1 x {same} threads)", result, singles[same])
    same = all(len(f) == 1 for f in fingerprints.values())
    print(f"same images in every row of an N: {same} ({ {n: sorted(f) for n, f in fingerprints.items()} }); load "
          f"average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
