"""Reading a preprocessed dataset into Ray's object store: Ray Data's V1 Parquet reader against its V2 (DataSourceV2).

``pipelines.data.dataset.load_dataset`` is every stage's way into a dataset (training materialises it once per run,
``ddpm encode`` and batch evaluation stream it). Ray 2.60 reads Parquet with V2 by default, which lists the files'
row groups through FooterReader actors (32 by default, each a new worker process) on every read; V1 reads the
shards the manifest names directly. This writes scikit-learn's digits as a dataset (``--images`` of them, 8x8, the
shards ``ddpm preprocess`` writes) and times ``load_dataset(...).random_shuffle().materialize()``, what training
does, with each reader in turn, ``--repeats`` times each (alternating, so that the machine's other load hits both),
after one untimed read of each (Ray's first worker processes). Both must give the same rows.

    .venv/bin/python benchmarks/parquet_reader.py                 # 200 images, 3 repeats
    .venv/bin/python benchmarks/parquet_reader.py --images 1797
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data import dataset  # noqa: E402
from pipelines.data.digits import write_digits  # noqa: E402
from pipelines.data.preprocess import preprocess  # noqa: E402


def read(uri: str, v2: bool) -> tuple[float, np.ndarray]:
    """Seconds to read and shuffle the dataset into the object store, and its labels (sorted, to compare)."""
    dataset.PARQUET_READER_V2 = v2
    start = time.perf_counter()
    materialized = dataset.load_dataset(uri, columns=["image", "label"]).random_shuffle(seed=0).materialize()
    seconds = time.perf_counter() - start
    labels = np.sort(np.concatenate([b["label"] for b in materialized.iter_batches(batch_format="numpy")]))
    return seconds, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="digits in the dataset [%(default)s]")
    parser.add_argument("--repeats", type=int, default=3, help="timed reads with each reader [%(default)s]")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(tempfile.mkdtemp(prefix="ddpm-parquet-bench-"))
    write_digits(str(root / "raw"), limit=args.images)
    preprocess(str(root / "raw"), str(root / "processed"), resolution=8, channels=1, progress=None)
    uri = str(root / "processed")
    shards = len(dataset.read_manifest(uri)["shards"])

    times: dict[bool, list[float]] = {False: [], True: []}
    labels = {v2: read(uri, v2)[1] for v2 in (False, True)}  # untimed: Ray's first worker processes start here
    assert np.array_equal(labels[False], labels[True]), "the two readers gave different rows"
    for _ in range(args.repeats):
        for v2 in (False, True):
            seconds, got = read(uri, v2)
            assert np.array_equal(got, labels[False])
            times[v2].append(seconds)
    ray.shutdown()

    v1, v2 = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n{args.images} images in {shards} shards; read + random_shuffle + materialize, median of {args.repeats}")
    print("| reader | median (s) | all (s) | ratio to V2 |")
    print("|---|---:|---|---:|")
    for name, v in (("V1 (load_dataset's)", False), ("V2 (Ray 2.60's default)", True)):
        median = statistics.median(times[v])
        print(f"| {name} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times[v])} | {median / v2:.2f}x |")
    print(f"\nV1 takes {v1 / v2:.2f}x the time of V2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
