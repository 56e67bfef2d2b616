"""Elastic training on a real multi-node Ray (``ray.cluster_utils.Cluster`` on this machine): what a preemption
costs with and without the SIGTERM checkpoint, and how long a joining node waits before the group uses it.

1. **Images lost per preemption.** One worker trains the tiny 8x8 U-Net (batch 16, a checkpoint every 1,600
   images, every step logged). When it has trained ``offset`` images past a checkpoint, its process gets either
   SIGTERM through the node's shutdown command (``python -m pipelines.train.preemption``: a checkpoint at the next
   step boundary) or SIGKILL (what a lost node, or Ray's own SIGTERM handler, which exits at once, costs). Lost =
   the most images the stopped attempt logged minus the images the next attempt resumed at: trained twice.
2. **Time from a node joining to the group using it**, at ``train.elastic_check_s`` 60 (Ray's default) and 5: the
   run starts on a 1-CPU head with ``--num-workers 1-2``; a 1-CPU node joins after the first checkpoint; measured to
   the first step the two-worker group logs.

    .venv/bin/python benchmarks/elastic.py [--offsets 400 1200] [--intervals 5 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.support import train_worker_pids, wait_for  # noqa: E402 - the suite's helpers

BATCH, EVERY = 16, 1600


def start_cluster(head_cpus: int = 1):
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # keep ray.init on 127.0.0.1 (tests/pipelines/test_train.py)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    return cluster


def stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def train_args(data: str, storage: str, name: str, tracking: str, workers: str, *extra: str) -> list[str]:
    return ["train", "--data", data, "--config", str(ROOT / "configs" / "digits.yaml"),
            "--set", "model.preset=tiny", "--set", f"train.batch_size={BATCH}", "--set", "train.warmup_images=32",
            "--set", "train.log_every_steps=1", "--set", "train.total_images=10000000",
            "--set", f"train.checkpoint_every_images={EVERY}", "--set", "train.sample_every_images=10000000",
            "--set", "train.max_failures=4", *extra,
            "--num-workers", workers, "--cpus-per-worker", "1", "--storage", storage, "--name", name,
            "--tracking-uri", tracking, "--experiment", "elastic-bench"]


def history(client, name: str, key: str) -> list:
    from pipelines import tracking

    runs = client.search_runs([tracking.ensure_experiment("elastic-bench", client.tracking_uri)],
                              f"tags.`ddpm.run_name` = '{name}'")
    return sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.timestamp) if runs else []


def run_beside(args: list[str], act) -> dict:
    """``ddpm train`` in a thread while ``act()`` runs here (Ray's Cluster.add_node must run in the main thread)."""
    from pipelines import cli

    thread = threading.Thread(target=cli.main, args=(args,), daemon=True)
    thread.start()
    try:
        return act()
    finally:
        thread.join(timeout=600)


def preemption(data: str, work: Path, tracking: str, mode: str, offset: int) -> int:
    """Images trained twice after one preemption (see the module docstring)."""
    from pipelines import tracking as tr
    from pipelines.train.preemption import stop_local_workers

    name = f"preempt-{mode}-{offset}"
    client = tr.client(tracking)
    cluster = start_cluster()
    try:
        def act():
            wait_for(lambda: any(m.value >= EVERY + offset for m in history(client, name, "images_seen")),
                     timeout=600, what="training past the checkpoint", interval=0.2)
            if mode == "sigterm":
                stop_local_workers(60)
            else:
                os.kill(max(train_worker_pids()), signal.SIGKILL)
            resumed = wait_for(lambda: history(client, name, "resumed_at_images"), timeout=600, what="the restart",
                               interval=0.2)[0]
            before = [m.value for m in history(client, name, "images_seen") if m.timestamp < resumed.timestamp]
            return int(max(before) - resumed.value)

        return run_beside(train_args(data, str(work / "runs"), name, tracking, "1",
                                     "--set", "train.max_minutes=1.0"), act)
    finally:
        stop_cluster(cluster)


def join_to_use(data: str, work: Path, tracking: str, interval: float) -> float:
    """Seconds from a node joining to the first step of the group that uses it."""
    from pipelines import tracking as tr

    name = f"grow-{interval:g}"
    client = tr.client(tracking)
    cluster = start_cluster()
    try:
        def act():
            wait_for(lambda: any(m.value >= EVERY for m in history(client, name, "images_seen")),
                     timeout=600, what="the first checkpoint", interval=0.2)
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            joined = time.time()
            grown = wait_for(lambda: [m for m in history(client, name, "world_size") if m.value == 2],
                             timeout=interval + 600, what="the two-worker group", interval=0.2)[0]
            first = wait_for(lambda: [m for m in history(client, name, "images_seen")
                                      if m.timestamp >= grown.timestamp],
                             timeout=600, what="its first step", interval=0.2)[0]
            return first.timestamp / 1000 - joined

        minutes = (interval + 60) / 60
        return run_beside(train_args(data, str(work / "runs"), name, tracking, "1-2",
                                     "--set", f"train.elastic_check_s={interval}",
                                     "--set", f"train.max_minutes={minutes}"), act)
    finally:
        stop_cluster(cluster)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=int, nargs="+", default=[400, 1200],
                        help="images past the checkpoint at which the worker is stopped")
    parser.add_argument("--intervals", type=float, nargs="+", default=[5.0, 60.0])
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from pipelines.data.digits import write_digits
    from pipelines.data.preprocess import preprocess

    work = Path(tempfile.mkdtemp(prefix="elastic-bench-"))
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    cluster = start_cluster(2)
    write_digits(str(work / "raw"), limit=200)
    preprocess(str(work / "raw"), str(work / "data"), resolution=8, channels=1)
    stop_cluster(cluster)
    data = str(work / "data")

    rows = []
    for offset in args.offsets:
        for mode in ("sigkill", "sigterm"):
            rows.append((mode, offset, preemption(data, work, tracking, mode, offset)))
    grows = [(interval, join_to_use(data, work, tracking, interval)) for interval in args.intervals]

    print(f"\nimages lost per preemption (checkpoint every {EVERY:,} images, batch {BATCH}):")
    print(f"{'stopped':>10} {'past the checkpoint':>20} {'trained twice':>14}")
    for mode, offset, lost in rows:
        label = "SIGTERM" if mode == "sigterm" else "SIGKILL"
        print(f"{label:>10} {offset:>20,} {lost:>14,}")
    print("\nnode joining -> first step of the larger group:")
    print(f"{'elastic_check_s':>16} {'seconds':>8}")
    for interval, seconds in grows:
        print(f"{interval:>16g} {seconds:>8.1f}")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
