"""Elastic training on a real multi-node Ray: nodes come and go, a worker is told to stop (SIGTERM), and the run
still trains exactly ``total_images`` images in exactly ``total_images / batch_size`` optimizer steps, in one MLflow
run."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime

import pytest

from pipelines import cli, tracking
from pipelines.train.checkpoints import latest_checkpoint

from .support import run_named, train_args, train_worker_pids, wait_for


@pytest.fixture
def head_node(monkeypatch):
    """A head node with 1 CPU on 127.0.0.1 (room for one training worker); the test adds and removes nodes.

    ``ENABLE_RAY_CLUSTER`` off keeps ``ray.init`` on the loopback address (see tests/pipelines/test_train.py).
    """
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_elastic_run_grows_shrinks_and_checkpoints_on_sigterm(digits_8px, head_node, mlflow_server, tmp_path):
    """``--num-workers 1-3`` on one 1-CPU node, ``train.elastic_check_s=2``:

    1. it starts with one worker; a node joins and the group grows to two (from the latest checkpoint);
    2. that node is removed and the group goes on with one worker;
    3. the node's shutdown command (``python -m pipelines.train.preemption``) sends the worker SIGTERM: a checkpoint of exactly the images seen lands at the next step boundary (not at the
       next multiple of ``checkpoint_every_images``), the worker exits, and the group restarts from it;
    4. the run ends at exactly ``total_images``, after ``total_images / batch_size`` optimizer steps, in one MLflow
       run whose ``world_size`` metric reads 1, 2, 1, 1 and which has the preemption's tag.
    """
    cluster = head_node
    storage, name, total, every, batch = str(tmp_path / "runs"), "elastic", 8_000, 400, 16
    client = tracking.client(mlflow_server.uri)
    events: dict = {}

    def checkpoint_after(images: int, world: int):
        saved = latest_checkpoint(storage, name)
        return saved if saved is not None and saved.state.images_seen > images and \
            saved.state.world_size == world else None

    def faults():  # in the main thread: Ray's Cluster.add_node installs a signal handler
        try:
            first = wait_for(lambda: checkpoint_after(0, 1), timeout=300, what="a checkpoint of one worker")
            node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            grown = wait_for(lambda: checkpoint_after(first.state.images_seen, 2), timeout=300,
                             what="a checkpoint of two workers", interval=0.2)
            events["grown"] = grown.state.images_seen
            cluster.remove_node(node, allow_graceful=False)
            shrunk = wait_for(lambda: checkpoint_after(grown.state.images_seen, 1), timeout=300,
                              what="a checkpoint of one worker after the node left", interval=0.2)
            [pid] = wait_for(train_worker_pids, timeout=30, what="the train worker's pid")
            seen = latest_checkpoint(storage, name).state.images_seen
            events.update(shrunk=shrunk.state.images_seen, before_signal=seen)
            # what a node's shutdown hook runs (deploy/kuberay/rayjob.yaml's preStop): SIGTERM, wait for the exit
            stop = subprocess.run([sys.executable, "-m", "pipelines.train.preemption", "--wait-s", "60"],
                                  capture_output=True, text=True, timeout=90)
            events.update(stop_output=stop.stdout.strip(), pid=pid)
            preempted = wait_for(lambda: [p for p in tracking_tags() if p.startswith("preempted_")], timeout=60,
                                 what="the preemption's checkpoint", interval=0.2)
            events["preempted"] = preempted
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            events["error"] = exc

    def tracking_tags():
        run = run_named(client, name)
        return run.data.tags if run is not None else {}

    args = train_args(digits_8px, storage, name, mlflow_server.uri, total=total, every=every, workers=1,
                      max_failures=4)
    args[args.index("--num-workers") + 1] = "1-3"
    args += ["--set", "train.elastic_check_s=2", "--set", "train.num_checkpoints_to_keep=100",
             "--set", "train.log_every_steps=1"]
    outcome: dict = {}
    training = threading.Thread(target=lambda: outcome.update(code=cli.main(args)))
    training.start()
    try:
        faults()
    finally:
        training.join(timeout=600)
    assert "error" not in events, events["error"]
    assert outcome.get("code") == 0
    # "2026-12-05T09:01:02.345+00:00 SIGTERM to 1 Ray Train worker(s) (pid 123); 2.1 s until they exited"
    sent, rest = events["stop_output"].split(" ", 1)
    exited_s = float(rest.split("; ")[1].split(" s ")[0])
    assert rest.startswith(f"SIGTERM to 1 Ray Train worker(s) (pid {events['pid']})"), events["stop_output"]
    assert exited_s < 60  # the worker checkpointed and exited: the command did not wait out its limit
    events["signalled"] = datetime.fromisoformat(sent).timestamp()

    run = run_named(client, name)  # by its name: the session's MLflow server holds the other reliability runs too
    assert run.info.status == "FINISHED" and run.data.metrics["images_seen"] == total
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "world_size"),
                                          key=lambda m: m.timestamp)]
    assert sizes == [1, 2, 1, 1], sizes

    # The SIGTERM's checkpoint is off the periodic cadence, at the step boundary after the signal: at most the step
    # in flight and one more (a signal that lands just after a step's check) past the last step logged before it.
    [tag] = events["preempted"]
    at = int(tag.removeprefix("preempted_"))
    last = max((m for m in client.get_metric_history(run.info.run_id, "images_seen")
                if m.timestamp <= events["signalled"] * 1000), key=lambda m: m.timestamp).value
    assert 0 < at - last <= 2 * batch, (at, last, events)
    saved = {int(p.name.removeprefix("checkpoint_")): json.loads((p / "training_state.json").read_text())["cause"]
             for p in (tmp_path / "runs" / name).glob("checkpoint_0*")}
    assert saved[at] == "preemption", saved  # its cause as the worker recorded it (at may be a multiple of every)
    assert saved[total] == "final" and all(saved[k] == "interval" for k in saved if k not in (at, total)), saved
    final = latest_checkpoint(storage, name)
    assert final.state.images_seen == total and final.state.step == total // batch
    assert final.state.restarts == 3  # grown, shrunk, preempted
    print(f"\nelastic: grew at {events['grown']} images, shrank at {events['shrunk']}, SIGTERM checkpoint at {at} "
          f"images (last periodic checkpoint {events['before_signal']}); the worker exited "
          f"{exited_s:.1f} s after the signal")
