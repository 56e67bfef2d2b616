"""Ingest throughput: ``ddpm preprocess`` on Ray Data against a single-process PIL loop doing the same work.

Workload: N synthetic 256x256 JPEGs -> 64x64 RGB (read, sha256, decode, centre crop, LANCZOS resize, Parquet).

- "PIL loop, same work" runs ``prepare_image`` (the function the Ray tasks run, JPEG draft decoding included) in
  one process and writes one Parquet file: the honest baseline.
- "PIL loop, full decode" decodes every pixel before resizing, the straightforward loop FACTS.md measured.
- "N processes of the same loop" splits the loop over one process per CPU: the most the machine allows.
- "Ray Data preprocess" is the real ``preprocess()`` with a warm cluster (one small run first).
Each is measured in 3 interleaved rounds (median reported), for wall time and for the CPU time of the whole process
tree (Ray's own processes included).
Then the peak memory of the job (the sum of the RSS of this process and every Ray process it started) is sampled
while ``preprocess`` runs on N and on 4N images: streaming keeps it flat.

    .venv/bin/python benchmarks/preprocess.py            # N = 10,000 (and 40,000 for memory)
    .venv/bin/python benchmarks/preprocess.py --quick    # N = 2,000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.preprocess import prepare_image, preprocess, shard_schema  # noqa: E402
from pipelines.ray_utils import init_ray  # noqa: E402

SOURCE, RESOLUTION = 256, 64


def make_jpeg(index: int, folder: str) -> None:
    """One 256x256 JPEG: a smooth random colour field plus grain, so it compresses like a photo (~20 KB)."""
    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SOURCE, SOURCE), Image.BICUBIC)
    pixels = np.asarray(field).astype(np.int16) + rng.integers(-12, 13, (SOURCE, SOURCE, 3))  # (256, 256, 3)
    path = Path(folder) / str(index % 10) / f"{index:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_parts(root: Path, parts: int, per_part: int) -> list[Path]:
    """``root/part<i>/<class>/<index>.jpg``: 4 parts of N images, so that N and 4N share the same files."""
    folders = [root / f"part{i}" for i in range(parts)]
    todo = [(i, str(folders[i // per_part])) for i in range(parts * per_part)
            if not (folders[i // per_part] / str(i % 10) / f"{i:06d}.jpg").exists()]
    if todo:
        with ProcessPoolExecutor() as pool:
            list(pool.map(make_jpeg, *zip(*todo), chunksize=256))
    return folders


def pil_loop(paths: list[Path], out: Path, full_decode: bool = False) -> int:
    """The single-process baseline: the tasks' work, one image after another, then one Parquet file."""
    images = np.empty((len(paths), RESOLUTION, RESOLUTION, 3), np.uint8)  # (N, H, W, C)
    digests = []
    for i, path in enumerate(paths):
        data = path.read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        images[i] = full_decode_resize(data) if full_decode else prepare_image(data, RESOLUTION, 3)
    schema = shard_schema(RESOLUTION, 3)
    image = pa.FixedSizeBinaryArray.from_buffers(schema.field("image").type, len(paths), [None, pa.py_buffer(images)])
    keys = [path.name for path in paths]
    table = pa.Table.from_arrays([image, pa.array(np.zeros(len(paths), np.int64)), pa.array(keys), pa.array(digests)],
                                 schema=schema)
    pq.write_table(table, out)
    return len(paths)


def full_decode_resize(data: bytes) -> np.ndarray:
    """Decode every pixel, centre-crop, LANCZOS to 64x64: (64, 64, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return np.asarray(img.crop((left, top, left + side, top + side)).resize((RESOLUTION,) * 2, Image.LANCZOS))


def tree_rss() -> int:
    """Bytes resident in this process and its descendants; shared pages count once per process that maps them."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


class PeakMemory:
    """Samples :func:`tree_rss` (this process and the local Ray cluster) every 0.2 s; ``peak`` is the largest."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """CPU time used so far by this process and every live descendant (pool workers, the local Ray cluster)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def measure(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process tree, result) of one call."""
    cpu, start = cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, cpu_seconds() - cpu, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images instead of 10,000")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each pipeline, interleaved (median)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated images here for reruns")
    args = parser.parse_args()
    n = 2_000 if args.quick else 10_000
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"generating {4 * n:,} JPEGs of {SOURCE}x{SOURCE} in {work} ...", flush=True)
    parts = make_parts(work / "raw", 4, n)
    paths = sorted(parts[0].rglob("*.jpg"))

    # Ray starts its workers 15 nice levels below the driver, so that the raylet stays responsive. On a shared
    # machine that hands the CPU to everyone else's processes first; level terms with the baseline loop instead.
    os.environ.setdefault("RAY_worker_niceness", "0")
    init_ray()
    settings = dict(resolution=RESOLUTION, channels=3, labels_from_dirs=False)
    preprocess(str(parts[1] / "0"), str(work / "warmup"), **settings)  # start the workers, import the modules

    cpus = len(os.sched_getaffinity(0))
    with multiprocessing.Pool(cpus) as pool:
        pool.starmap(pil_loop, [(paths[i:100:cpus], work / f"pool-{i}.parquet") for i in range(cpus)])  # warm-up
        pipelines = {
            "PIL loop, same work (draft decode)": lambda: pil_loop(paths, work / "loop.parquet"),
            "PIL loop, full decode": lambda: pil_loop(paths, work / "loop.parquet", full_decode=True),
            # What the machine allows: the same loop in one process per CPU, no framework at all.
            f"{cpus} processes of the same loop (the ceiling)": lambda: sum(
                pool.starmap(pil_loop, [(paths[i::cpus], work / f"pool-{i}.parquet") for i in range(cpus)])),
            "Ray Data preprocess": lambda: preprocess(str(parts[0]), str(work / "out-n"), **settings)["counts"]["rows"],
        }
        # Interleaved rounds, so that a burst of load on the shared machine hits every pipeline alike.
        runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, run in pipelines.items():
                runs[name].append(measure(run))

    # Memory in separate runs, so that the sampler's own CPU time stays out of the timings above.
    at_rest = tree_rss()
    with PeakMemory() as memory_n:
        seconds_n, _, manifest_n = measure(preprocess, str(parts[0]), str(work / "out-n"), **settings)
    with PeakMemory() as memory_4n:
        seconds_4n, _, manifest_4n = measure(preprocess, str(work / "raw"), str(work / "out-4n"), **settings)

    medians = {name: sorted(results)[len(results) // 2] for name, results in runs.items()}  # by wall time
    baseline = medians["PIL loop, same work (draft decode)"][0]
    print(f"\n{n:,} JPEGs {SOURCE}x{SOURCE} -> {RESOLUTION}x{RESOLUTION} RGB, {int(ray.cluster_resources()['CPU'])} "
          f"Ray CPUs, median of {args.rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| pipeline | images | seconds | images/s | vs PIL loop (same work) | CPU ms per image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, cpu, count) in medians.items():
        print(f"| {name} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} | {baseline / seconds:.2f}x "
              f"| {1e3 * cpu / count:.2f} |")
    print(f"\nMemory of the driver and the local Ray cluster (sum of RSS), {at_rest / 2**30:.2f} GiB at rest:\n")
    print("| Ray Data preprocess | images | seconds | images/s | peak memory | above rest |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, manifest, seconds, memory in (("N", manifest_n, seconds_n, memory_n),
                                             ("4N", manifest_4n, seconds_4n, memory_4n)):
        count = manifest["counts"]["rows"]
        print(f"| {label} | {count:,} | {seconds:.2f} | {count / seconds:,.0f} | {memory.peak / 2**30:.2f} GiB "
              f"| {(memory.peak - at_rest) / 2**20:,.0f} MiB |")

    if args.workdir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
