"""``ddpm encode`` throughput and memory: Ray Data encoder actors against a single-process loop of the same encoder.

Workload: N photo crops of 64x64 RGB (``pipelines.data.photos``), preprocessed to a local dataset; the ``small-f4``
autoencoder (2.7M parameters, random weights: speed does not depend on them) -> (16, 16, 4) latents.

- "loop": one process reads the dataset (``load_numpy``) and runs ``ae.encode`` on fixed chunks of B rows (padded),
  torch threads = the machine's cores; latents kept in memory, nothing written. The honest baseline.
- "encode, A actors": the real ``pipelines.data.encode.encode`` on a warm local Ray (a small run first), reading the
  processed shards, writing latent shards and the manifest; wall time of the call, actor start-up included.
The loop runs once more at the end: the spread of the two says how noisy the (shared) machine was.
Then the peak RSS of the driver (this process) and of the largest encoder actor, sampled every 0.1 s while
``encode`` runs on N and on 4N images: streaming keeps both flat.

    .venv/bin/python benchmarks/encode.py              # N = 2,000
    .venv/bin/python benchmarks/encode.py --count 500  # quicker
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from ddpm import Autoencoder, AutoencoderConfig, autoencoder, from_uint8
from pipelines.data.dataset import load_numpy
from pipelines.data.encode import encode
from pipelines.data.photos import write_photos
from pipelines.data.preprocess import preprocess


class Peak:
    """Peak RSS of this process and of the largest Ray actor process (by its proctitle), sampled on a thread."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.driver, self.actor = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for proc in me.children(recursive=True):
                try:
                    if "MapWorker" in " ".join(proc.cmdline()) or "LatentEncoder" in " ".join(proc.cmdline()):
                        self.actor = max(self.actor, proc.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(self.every_s)

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_data(root: Path, count: int) -> str:
    raw, out = root / f"raw-{count}", root / f"processed-{count}"
    write_photos(str(raw), count=count, size=64)
    preprocess(str(raw), str(out), resolution=64, channels=3, progress=None)
    return str(out)


def loop(data: str, ae_path: Path, batch: int) -> tuple[float, int]:
    """Single-process encode of the whole dataset; returns (seconds, images)."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    images, _ = load_numpy(data)
    ae = autoencoder.load(ae_path)
    with torch.inference_mode():
        out = []
        for s in range(0, len(images), batch):
            x = from_uint8(images[s:s + batch])
            chunk = torch.zeros((batch, *x.shape[1:]))
            chunk[:len(x)] = x
            out.append(ae.encode(chunk)[:len(x)].permute(0, 2, 3, 1).numpy())
    np.concatenate(out)
    return time.perf_counter() - start, len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    torch.manual_seed(0)
    ae_path = autoencoder.save(root / "ae", Autoencoder(AutoencoderConfig.preset("small-f4")))
    t0 = time.perf_counter()
    data = make_data(root, args.count)
    big = make_data(root, 4 * args.count)
    print(f"data: {args.count:,} and {4 * args.count:,} crops of 64x64 preprocessed in "
          f"{time.perf_counter() - t0:.0f} s")
    encode(data, str(ae_path), str(root / "warm"), num_actors=1, batch_size=args.batch_size, shard_rows=64,
           progress=None)  # warm: workers, imports

    rows = []
    seconds, n = loop(data, ae_path, args.batch_size)
    base = n / seconds
    rows.append((f"loop ({torch.get_num_threads()} threads)", n, seconds, base, "", ""))
    for actors in (1, 2):
        with Peak() as peak:
            start = time.perf_counter()
            encode(data, str(ae_path), str(root / f"out-{actors}"), num_actors=actors, batch_size=args.batch_size,
                   progress=None)
            seconds = time.perf_counter() - start
        rows.append((f"encode, {actors} actor(s)", n, seconds, n / seconds, peak.driver, peak.actor))
    with Peak() as peak:
        start = time.perf_counter()
        encode(big, str(ae_path), str(root / "out-big"), num_actors=2, batch_size=args.batch_size, progress=None)
        seconds = time.perf_counter() - start
    rows.append(("encode, 2 actor(s), 4N", 4 * n, seconds, 4 * n / seconds, peak.driver, peak.actor))

    seconds, n = loop(data, ae_path, args.batch_size)  # again: the machine is shared, so the spread says how noisy
    rows.append((f"loop again ({torch.get_num_threads()} threads)", n, seconds, n / seconds, "", ""))

    mib = lambda b: f"{b / 2**20:,.0f}" if b else "-"  # noqa: E731
    print(f"\nsmall-f4 autoencoder, 64x64x3 -> 16x16x4, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print(f"{'run':<26} {'images':>7} {'s':>7} {'images/s':>9} {'x loop':>7} {'driver MiB':>11} {'actor MiB':>10}")
    for name, n_, s, rate, drv, act in rows:
        print(f"{name:<26} {n_:>7,} {s:>7.1f} {rate:>9.1f} {rate / base:>7.2f} {mib(drv):>11} {mib(act):>10}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
