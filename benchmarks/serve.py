"""Serving throughput: the Serve application over real HTTP on 127.0.0.1, dynamic batching on and off, in one run.

Workload: ``POST /generate`` with ``{"num_images": I, "sampler": "ddim", "steps": S, "seed": n}`` (a PNG grid back)
from C concurrent clients, C = 1, 8, 32, every request with its own seed. The model is the digits preset (16x16x1,
1.6M parameters) with random weights: a forward pass costs the same whatever the weights.

- batching on: ``@serve.batch`` gathers up to 64 images across requests; the network runs ``micro_batch`` rows at a
  time (padded), which keeps every image independent of its batch-mates.
- batching off: each request runs alone at its own size (``micro_batch`` null), the fastest unbatched server:
  the honest baseline.

The applications run side by side (/on<rows> for each ``--micro-batch``, and /off), each with one Sampler replica
reserving every core (Ray sets its thread count from that; the local Ray counts each core once per application so that
all fit), and only one is loaded at a time: they alternate at each concurrency level, so that a change in the
machine's other load hits all. The ingress, the HTTP proxy and these client threads share the same cores. Each
level sends a bounded number of requests (and stops at a time limit) after an unmeasured warm-up burst; any answer
but 200 counts as an error.

    echo -19 > /proc/self/autogroup    # on a shared machine: this session's fair share first (root; see RESULTS.md)
    .venv/bin/python benchmarks/serve.py                     # 1, 8, 32 clients; 1 image, 10 DDIM steps per request
    .venv/bin/python benchmarks/serve.py --num-images 4 --concurrency 1 16
    .venv/bin/python benchmarks/serve.py --micro-batch 4 16       # two forward sizes against the unbatched server

Last, the clients that leave: 8 requests of 200 DDIM steps sent at once, then again with half of the clients dropping
their connection mid-way: the image-steps their cancellation saved (``GET /metrics``) and the time the rest took.
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
import ray
import requests
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm import FORWARD_ROWS, NoiseSchedule, UNet, UNetConfig, checkpoint  # noqa: E402
from deploy.serve_app import build_app  # noqa: E402
from pipelines.commands.quickstart import wait_healthy  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(checkpoint_dir: Path, micro_batch: int | None, args: argparse.Namespace, base: str) -> str:
    """Deploy one application (one Sampler replica on all cores) at /on<micro_batch> (batching on, forward passes of
    ``micro_batch`` rows) or /off (``micro_batch`` None); its URL once it answers."""
    batching = micro_batch is not None
    name = f"on{micro_batch}" if batching else "off"
    app_args = {
        "model_uri": str(checkpoint_dir), "num_cpus": float(args.cpus), "min_replicas": 1, "max_replicas": 1,
        "max_ongoing_requests": 64, "max_cost": 10**6, "batching": batching,
        "micro_batch": micro_batch, "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }
    serve.run(build_app(app_args), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}"
    wait_healthy(url)
    return url


def load(url: str, body: dict, clients: int, total: int, time_limit_s: float) -> dict:
    """``total`` requests from ``clients`` threads (or fewer, at the time limit): throughput and latency."""
    lock = threading.Lock()
    sent = iter(range(total))
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        nonlocal errors
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                seed = next(sent, None)
            if seed is None:
                return
            started = time.perf_counter()
            try:
                r = session.post(url, json=body | {"seed": seed}, timeout=120)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            elapsed = time.perf_counter() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                    batch_sizes.append(int(r.headers["X-Batch-Requests"]))
                else:
                    errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "errors": errors, "rps": len(latencies) / wall,
        "images_s": len(latencies) * body["num_images"] / wall,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
        "batch": float(np.mean(batch_sizes)) if batch_sizes else float("nan"),
    }


def metric(url: str, name: str) -> float:
    """The sum of ``name``'s series in ``GET url/metrics``."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def disconnects(url: str, clients: int, steps: int, leave_after: float) -> dict:
    """``clients`` requests of one image and ``steps`` DDIM steps sent at once, twice: all waited for, then half of
    the clients dropping their connection ``leave_after`` of the first round's time after sending. The image-steps
    the cancelled requests saved (``GET /metrics``) and the time the other half took, each round."""
    import http.client
    import json
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(f"{url}/generate")

    def send(seed: int) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        connection.request("POST", parts.path, json.dumps({"num_images": 1, "sampler": "ddim", "steps": steps,
                                                           "seed": seed}), {"Content-Type": "application/json"})
        return connection

    def round_(leaving: int, wait_s: float) -> tuple[float, int]:
        started = time.perf_counter()
        connections = [send(seed) for seed in range(clients)]
        time.sleep(wait_s)
        for connection in connections[:leaving]:
            connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()
        ok = sum(connection.getresponse().status == 200 for connection in connections[leaving:])
        return time.perf_counter() - started, ok

    whole, _ = round_(0, 0.0)
    cancelled, saved = metric(url, "ddpm_cancelled_requests_total"), metric(url, "ddpm_cancelled_image_steps_total")
    half, ok = round_(clients // 2, leave_after * whole)
    time.sleep(1)  # the replica's counters travel with its next answer or scrape
    return {"clients": clients, "left": clients // 2, "answered": ok, "asked": clients * steps,
            "cancelled": metric(url, "ddpm_cancelled_requests_total") - cancelled,
            "saved": metric(url, "ddpm_cancelled_image_steps_total") - saved, "whole_s": whole, "half_s": half}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num-images", type=int, default=1, help="images per request [%(default)s]")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps [%(default)s]")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[FORWARD_ROWS],
                        help="rows per forward pass, batching on: one application each [%(default)s]")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="[%(default)s]")
    parser.add_argument("--requests-per-client", type=int, default=8,
                        help="requests per level: this times the clients, at least 32 [%(default)s]")
    parser.add_argument("--time-limit-s", type=float, default=90, help="per level [%(default)s]")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores per Sampler replica [%(default)s]")
    parser.add_argument("--disconnect-clients", type=int, default=8,
                        help="then: this many requests at once, half of whose clients leave mid-way; 0 skips "
                             "[%(default)s]")
    parser.add_argument("--disconnect-steps", type=int, default=200, help="their DDIM steps [%(default)s]")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ddpm-serve-bench-"))
    torch.manual_seed(0)
    checkpoint.save(folder / "digits", UNet(UNetConfig.preset("digits")),
                    NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02))
    # Ray starts its workers (the replicas, the proxy) 15 nice levels below the driver; on a shared machine that hands
    # the CPU to everyone else's processes first. Level terms with this process's client threads instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=(len(args.micro_batch) + 1) * args.cpus, _node_ip_address="127.0.0.1",
             include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    body = {"num_images": args.num_images, "sampler": "ddim", "steps": args.steps}

    rows = []
    try:
        urls = {m: deploy(folder / "digits", m, args, base) for m in [*args.micro_batch, None]}
        for clients in args.concurrency:
            for micro_batch, url in urls.items():
                load(f"{url}/generate", body, clients, clients, args.time_limit_s)  # warm-up, not measured
                total = max(32, args.requests_per_client * clients)
                result = load(f"{url}/generate", body, clients, total, args.time_limit_s)
                label = "off" if micro_batch is None else f"on, {micro_batch} rows"
                rows.append({"batching": label, "clients": clients} | result)
                print(f"batching {label:>12}, {clients:>2} clients: {result['rps']:.1f} req/s", flush=True)
        left = disconnects(urls[args.micro_batch[0]], args.disconnect_clients, args.disconnect_steps, 0.3) \
            if args.disconnect_clients else None
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nDDIM {args.steps} steps, {args.num_images} image(s) per request, digits 16x16x1 (random weights), "
          f"one replica on {args.cpus} CPUs, forward passes of micro_batch rows when batching\n")
    print("| batching | clients | requests | errors | requests/s | images/s | p50 ms | p95 ms | requests per batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
              f"{r['images_s']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['batch']:.1f} |")
    off = {r["clients"]: r for r in rows if r["batching"] == "off"}
    for m in args.micro_batch:
        on = {r["clients"]: r for r in rows if r["batching"] == f"on, {m} rows"}
        ratio = lambda key: ", ".join(f"{c} clients {on[c][key] / off[c][key]:.2f}x" for c in args.concurrency)  # noqa
        print(f"\non ({m} rows) / off: images/s {ratio('images_s')}; p50 {ratio('p50')}")
    if left is not None:
        print(f"\nClients that leave (batching on, {args.micro_batch[0]} rows): {left['clients']} requests of 1 "
              f"image, DDIM {args.disconnect_steps}, sent at once; then again with {left['left']} clients dropping "
              f"their connection at 30% of the first round's time\n")
        print("| requests | clients that left | cancelled (GET /metrics) | image-steps asked | image-steps saved | "
              "saved / asked by those that left | all stay: s | half leave: s (the rest answered) |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {left['clients']} | {left['left']} | {left['cancelled']:.0f} | {left['asked']} | "
              f"{left['saved']:.0f} | {left['saved'] / (left['left'] * args.disconnect_steps):.2f} | "
              f"{left['whole_s']:.2f} | {left['half_s']:.2f} ({left['answered']} of "
              f"{left['clients'] - left['left']}) |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
