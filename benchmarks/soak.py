"""Soak: 1,000 requests from 32 concurrent clients against ``POST /generate`` on 127.0.0.1; errors, latency, memory.

The application and its deployment are those of ``benchmarks/serve.py`` (its ``deploy``: one Sampler replica on every
core, batching on, ``micro_batch`` 16), serving the digits preset (16x16x1, 1.6M parameters, random weights: a forward
pass costs the same). Each request asks for one image, DDIM 10 steps, a PNG back, with its own seed.

In one run, in order:

1. a warm-up burst (not measured);
2. the baseline: ``--baseline-requests`` requests one at a time (1 client), the latency of a request with no
   contention;
3. the RSS of every replica (Ingress, Sampler), read with psutil from the replica's pid, which the replica reports;
4. the soak: ``--requests`` requests from ``--concurrency`` clients, bounded by ``--time-limit-s``;
5. the RSS again, right after the soak and once more after ``--settle-s`` seconds idle.

Any answer but a 200 is an error. The run fails (exit 1) on an error, on a soak cut short by the time limit, or on a
replica whose RSS grew by more than ``--rss-growth-bound-mib`` from before the soak to after the settle.

    .venv/bin/python benchmarks/soak.py
    .venv/bin/python benchmarks/soak.py --requests 200 --concurrency 8     # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import ray
import requests
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint  # noqa: E402
from serve import deploy, free_port  # noqa: E402  (benchmarks/serve.py)

APP = "on"  # the name benchmarks/serve.py gives the batching application


def replica_pids(app: str) -> dict[str, int]:
    """``{"Ingress": pid, "Sampler": pid, ...}`` for the live replicas of ``app``, each asked for its own pid."""
    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        prefix = f"SERVE_REPLICA::{app}#"
        if actor["namespace"] == "serve" and actor["name"].startswith(prefix):
            deployment, _, replica = actor["name"][len(prefix):].partition("#")
            handle = ray.get_actor(actor["name"], namespace="serve")
            pids[f"{deployment} {replica}"] = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return dict(sorted(pids.items()))


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    return {name: psutil.Process(pid).memory_info().rss / 2**20 for name, pid in pids.items()}


def run_load(url: str, body: dict, clients: int, total: int, time_limit_s: float, first_seed: int) -> dict:
    """``total`` requests from ``clients`` threads, stopping at ``time_limit_s``: every latency and every error."""
    lock = threading.Lock()
    seeds = iter(range(first_seed, first_seed + total))
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            started = time.perf_counter()
            try:
                r = session.post(url, json=body | {"seed": seed}, timeout=120)
                error = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
            except requests.RequestException as exc:
                error = repr(exc)[:200]
            with lock:
                if error is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors.append(error)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"clients": clients, "sent": len(latencies) + len(errors), "ok": len(latencies), "errors": errors,
            "wall_s": wall, "rps": len(latencies) / wall, "max": float(np.max(lat)),
            **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="[%(default)s]")
    parser.add_argument("--concurrency", type=int, default=32, help="[%(default)s]")
    parser.add_argument("--baseline-requests", type=int, default=30,
                        help="one at a time, before the soak [%(default)s]")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per request [%(default)s]")
    parser.add_argument("--time-limit-s", type=float, default=600, help="for the soak [%(default)s]")
    parser.add_argument("--settle-s", type=float, default=10,
                        help="idle time before the last RSS reading [%(default)s]")
    parser.add_argument("--rss-growth-bound-mib", type=float, default=100,
                        help="the most a replica's RSS may grow over the soak [%(default)s]")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores for the Sampler replica [%(default)s]")
    parser.add_argument("--micro-batch", type=int, default=16, help="[%(default)s]")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="[%(default)s]")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ddpm-soak-"))
    torch.manual_seed(0)
    checkpoint.save(folder / "digits", UNet(UNetConfig.preset("digits")),
                    NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02))
    os.environ.setdefault("RAY_worker_niceness", "0")  # as benchmarks/serve.py: level terms with the client threads
    ray.init(address="local", num_cpus=2 * args.cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body = {"num_images": 1, "sampler": "ddim", "steps": args.steps}

    try:
        url = deploy(folder / "digits", True, args, f"http://127.0.0.1:{port}") + "/generate"
        run_load(url, body, args.concurrency, args.concurrency, 120, first_seed=10**6)  # warm-up, not measured
        baseline = run_load(url, body, 1, args.baseline_requests, 300, first_seed=0)
        print(f"baseline: {baseline['ok']} requests, p50 {baseline['p50']:.0f} ms", flush=True)
        pids = replica_pids(APP)
        before = rss_mib(pids)
        soak = run_load(url, body, args.concurrency, args.requests, args.time_limit_s,
                        first_seed=args.baseline_requests)
        print(f"soak: {soak['ok']} requests in {soak['wall_s']:.0f} s, {len(soak['errors'])} errors", flush=True)
        after = rss_mib(pids)
        time.sleep(args.settle_s)
        settled = rss_mib(pids)
        assert replica_pids(APP) == pids, "a replica was replaced during the soak"
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nPOST /generate, 1 image, DDIM {args.steps} steps, PNG; digits 16x16x1 (random weights), one Sampler "
          f"replica on {args.cpus} CPUs, batching on, micro_batch {args.micro_batch}\n")
    print("| phase | clients | requests sent | errors | wall s | requests/s | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in [("baseline", baseline), ("soak", soak)]:
        print(f"| {name} | {r['clients']} | {r['sent']} | {len(r['errors'])} | {r['wall_s']:.0f} | {r['rps']:.1f} | "
              f"{r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | {r['max']:.0f} |")
    print(f"\nsoak / baseline latency: p50 {soak['p50'] / baseline['p50']:.1f}x, "
          f"p99 {soak['p99'] / baseline['p99']:.1f}x; throughput {soak['rps'] / baseline['rps']:.1f}x")

    print(f"\n| replica | pid | RSS before soak MiB | right after MiB | after {args.settle_s:.0f} s idle MiB "
          "| growth MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    grown = []
    for name, pid in pids.items():
        growth = settled[name] - before[name]
        flag = f" (over the {args.rss_growth_bound_mib:.0f} MiB bound)" if growth > args.rss_growth_bound_mib else ""
        print(f"| {name} | {pid} | {before[name]:.0f} | {after[name]:.0f} | {settled[name]:.0f} "
              f"| {growth:+.0f}{flag} |")
        grown += [name] if flag else []

    for error in soak["errors"][:10] + baseline["errors"][:10]:
        print("error:", error)
    failed = bool(soak["errors"] or baseline["errors"]) or soak["sent"] < args.requests or bool(grown)
    print("\nresult: " + ("FAIL" if failed else "pass") + f" (zero errors, all {args.requests} requests sent, "
          f"RSS growth within {args.rss_growth_bound_mib:.0f} MiB per replica)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
