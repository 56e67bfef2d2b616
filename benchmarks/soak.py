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
5. the RSS again, right after the soak and once more after ``--settle-s`` seconds idle;
6. the cost of the metrics: ``--ab-rounds`` rounds of ``--ab-requests`` requests each with the endpoint's metrics on
   and off (``Ingress.set_metrics`` through a Serve handle), alternating which goes first, and the bookkeeping's own
   CPU time per request, timed in this process.

Throughout, a thread scrapes ``GET /metrics`` every ``--scrape-every-s`` seconds, as Prometheus would; the samples go
to ``--metrics-out`` (JSON) and the plot in docs/serving.md (``--plot``) is drawn from them alone.

Any answer but a 200 is an error. The run fails (exit 1) on an error, on a soak cut short by the time limit, or on a
replica whose RSS grew by more than ``--rss-growth-bound-mib`` from before the soak to after the settle.

    .venv/bin/python benchmarks/soak.py
    .venv/bin/python benchmarks/soak.py --requests 200 --concurrency 8     # a quick look
"""

from __future__ import annotations

import argparse
import json
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
ROOT = Path(__file__).resolve().parents[1]


class Scraper:
    """GET /metrics every ``every_s`` seconds on a thread, as Prometheus would: ``samples`` is a list of
    ``(seconds since start, {(name, labels...): value})``, parsed with prometheus_client's parser."""

    def __init__(self, url: str, every_s: float):
        self.url, self.every_s = url, every_s
        self.samples: list[tuple[float, dict]] = []
        self.marks: list[tuple[float, str]] = []  # (time, phase name) where a phase starts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def mark(self, phase: str) -> None:
        self.marks.append((time.monotonic() - self.started, phase))

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        session = requests.Session()
        while not self._stop.wait(self.every_s):
            try:
                text = session.get(self.url, timeout=10).text
            except requests.RequestException:
                continue
            values = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    values[(sample.name, *sorted(sample.labels.items()))] = sample.value
            self.samples.append((time.monotonic() - self.started, values))

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def to_json(self) -> dict:
        return {"every_s": self.every_s, "marks": self.marks,
                "samples": [[t, [[list(k), v] for k, v in values.items()]] for t, values in self.samples]}


def total(values: dict, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in values.items() if k[0] == name and want <= set(k[1:]))


def quantile(q: float, before: dict, after: dict, name: str, **labels) -> float:
    """Prometheus's ``histogram_quantile(q, increase(name_bucket[...]))`` between two scrapes."""
    bounds = sorted({float(dict(k[1:])["le"]) for k in after if k[0] == f"{name}_bucket"})
    counts = [total(after, f"{name}_bucket", le=_le(b), **labels) - total(before, f"{name}_bucket", le=_le(b), **labels)
              for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def plot(scraped: dict, out: Path, title: str) -> None:
    """Four panels from the scraped counters alone: requests/s by status, latency quantiles, queue time, batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Up to the metrics' on/off rounds: with the bookkeeping off, the counters stand still by design.
    end = next((when for when, phase in scraped["marks"] if phase.startswith("metrics")), float("inf"))
    samples = [(t, {tuple(tuple(x) if isinstance(x, list) else x for x in k): v for k, v in values})
               for t, values in scraped["samples"] if t <= end + scraped["every_s"]]
    marks = [(when, phase) for when, phase in scraped["marks"] if when < end]
    t, rps, p50, p95, p99, queue50, queue95, batch, inflight = [], [], [], [], [], [], [], [], []
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        dt = t1 - t0
        t.append(t1)
        rps.append((total(b, "ddpm_requests_total", route="/generate", status="200")
                    - total(a, "ddpm_requests_total", route="/generate", status="200")) / dt)
        p50.append(quantile(0.5, a, b, "ddpm_request_duration_seconds", route="/generate") * 1000)
        p95.append(quantile(0.95, a, b, "ddpm_request_duration_seconds", route="/generate") * 1000)
        p99.append(quantile(0.99, a, b, "ddpm_request_duration_seconds", route="/generate") * 1000)
        queue50.append(quantile(0.5, a, b, "ddpm_queue_duration_seconds") * 1000)
        queue95.append(quantile(0.95, a, b, "ddpm_queue_duration_seconds") * 1000)
        n = total(b, "ddpm_batch_images_count") - total(a, "ddpm_batch_images_count")
        batch.append((total(b, "ddpm_batch_images_sum") - total(a, "ddpm_batch_images_sum")) / n if n else float("nan"))
        inflight.append(total(b, "ddpm_sampler_inflight_requests"))
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, rps, color="tab:blue")
    axes[0].set_ylabel("requests/s\n(200s)")
    axes[1].plot(t, p50, label="p50")
    axes[1].plot(t, p95, label="p95")
    axes[1].plot(t, p99, label="p99")
    axes[1].set_ylabel("latency ms")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[2].plot(t, queue50, label="queue p50")
    axes[2].plot(t, queue95, label="queue p95")
    axes[2].set_ylabel("queue ms")
    axes[2].legend(loc="upper left", fontsize=8)
    axes[3].plot(t, batch, label="images per batch (mean)", color="tab:green")
    axes[3].plot(t, inflight, label="jobs in the Sampler", color="tab:gray")
    axes[3].set_ylabel("batch / in flight")
    axes[3].legend(loc="upper left", fontsize=8)
    axes[3].set_xlabel(f"seconds (GET /metrics every {scraped['every_s']:g} s; rates and quantiles per interval)")
    for ax in axes:
        ax.grid(alpha=0.3)
        for when, phase in marks:
            ax.axvline(when, color="k", alpha=0.25, lw=0.8)
    for when, phase in marks:
        axes[0].annotate(phase, (when, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                         va="top", ha="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def bookkeeping_us(n: int = 20000) -> float:
    """Microseconds of the metrics' own work per request, timed here: the ingress's counters for one request
    (middleware, generated images, a replica snapshot merged) plus the replica's snapshot, pickled and unpickled as
    it travels with the outcome."""
    from deploy.metrics import IngressMetrics, ReplicaStats

    import pickle

    metrics, stats = IngressMetrics(), ReplicaStats("r1")
    model = {"name": "digits", "version": "3", "alias": "production"}
    started = time.perf_counter()
    for _ in range(n):
        stats.inflight += 1
        stats.batch(1, 1)
        stats.inflight -= 1
        metrics.replica(pickle.loads(pickle.dumps(stats.snapshot())))  # it travels with the outcome
        metrics.request("/generate", 200, 0.05)
        metrics.generated(model, 1, 10, 0.01)
    return (time.perf_counter() - started) / n * 1e6


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
    parser.add_argument("--ab-rounds", type=int, default=20, help="metrics on/off pairs, after the soak [%(default)s]")
    parser.add_argument("--ab-requests", type=int, default=64, help="requests per on/off phase [%(default)s]")
    parser.add_argument("--scrape-every-s", type=float, default=2.0, help="GET /metrics interval [%(default)s]")
    parser.add_argument("--metrics-out", type=Path, default=Path(tempfile.gettempdir()) / "ddpm-soak-metrics.json",
                        help="the scraped samples, JSON [%(default)s]")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "soak-metrics.png",
                        help="the plot drawn from the scraped samples [%(default)s]")
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
        app_url = deploy(folder / "digits", True, args, f"http://127.0.0.1:{port}")
        url = app_url + "/generate"
        scraper = Scraper(app_url + "/metrics", args.scrape_every_s)
        with scraper:
            scraper.mark("warm-up")
            run_load(url, body, args.concurrency, args.concurrency, 120, first_seed=10**6)  # warm-up, not measured
            scraper.mark("baseline")
            baseline = run_load(url, body, 1, args.baseline_requests, 300, first_seed=0)
            print(f"baseline: {baseline['ok']} requests, p50 {baseline['p50']:.0f} ms", flush=True)
            pids = replica_pids(APP)
            before = rss_mib(pids)
            scraper.mark("soak")
            soak = run_load(url, body, args.concurrency, args.requests, args.time_limit_s,
                            first_seed=args.baseline_requests)
            print(f"soak: {soak['ok']} requests in {soak['wall_s']:.0f} s, {len(soak['errors'])} errors", flush=True)
            after = rss_mib(pids)
            scraper.mark("idle")
            time.sleep(args.settle_s)
            settled = rss_mib(pids)
            assert replica_pids(APP) == pids, "a replica was replaced during the soak"

            # The metrics' cost: the same load with the endpoint's bookkeeping on and off, alternating.
            ingress = serve.get_app_handle(APP)
            ab: dict[bool, list[dict]] = {True: [], False: []}
            seed = 10**7
            for round_ in range(args.ab_rounds):
                for enabled in ((True, False) if round_ % 2 == 0 else (False, True)):
                    ingress.set_metrics.remote(enabled).result()
                    scraper.mark("metrics on" if enabled else "metrics off")
                    ab[enabled].append(run_load(url, body, args.concurrency, args.ab_requests, 300, first_seed=seed))
                    seed += args.ab_requests
            ingress.set_metrics.remote(True).result()
            time.sleep(2 * args.scrape_every_s)
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

    on = [r["rps"] for r in ab[True]]
    off = [r["rps"] for r in ab[False]]
    cost = 1 - float(np.mean(on)) / float(np.mean(off))
    per_pair = [1 - a / b for a, b in zip(on, off)]
    us = bookkeeping_us()
    print(f"\nThe metrics' cost: {args.ab_rounds} rounds of {args.ab_requests} requests with the endpoint's metrics on "
          f"and off, alternating\n")
    print("| metrics | rounds | requests/s (mean) | min | max | p50 ms (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, runs in (("on", ab[True]), ("off", ab[False])):
        rates = [r["rps"] for r in runs]
        print(f"| {label} | {len(runs)} | {np.mean(rates):.2f} | {min(rates):.2f} | {max(rates):.2f} | "
              f"{np.mean([r['p50'] for r in runs]):.0f} |")
    print(f"\nrequests/s with metrics / without: {1 - cost:.3f} (cost {100 * cost:+.1f}%; per pair "
          f"{', '.join(f'{100 * c:+.1f}%' for c in per_pair)}); bookkeeping {us:.1f} us of CPU per request, "
          f"{100 * us * 1e-6 * soak['rps'] / args.cpus:.3f}% of the Sampler's {args.cpus} CPUs at the soak's rate")
    errors_ab = [e for runs in ab.values() for r in runs for e in r["errors"]]

    args.metrics_out.write_text(json.dumps(scraper.to_json()))
    plot(scraper.to_json(), args.plot,
         f"GET /metrics during benchmarks/soak.py: {args.concurrency} clients, 1 image DDIM {args.steps} per request, "
         f"one Sampler replica on {args.cpus} CPUs")
    print(f"\nscraped {len(scraper.samples)} times: {args.metrics_out}; plot: {args.plot}")

    for error in soak["errors"][:10] + baseline["errors"][:10] + errors_ab[:10]:
        print("error:", error)
    failed = bool(soak["errors"] or baseline["errors"] or errors_ab) or soak["sent"] < args.requests or bool(grown)
    print("\nresult: " + ("FAIL" if failed else "pass") + f" (zero errors, all {args.requests} requests sent, "
          f"RSS growth within {args.rss_growth_bound_mib:.0f} MiB per replica)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
