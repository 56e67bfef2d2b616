"""Training under faults: a worker SIGKILLed, a node removed, checkpoints corrupted or cut short."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from pipelines import tracking
from pipelines.train.checkpoints import latest_checkpoint

from .support import log_steps, run_cli_beside, run_named, train_args, train_worker_pids, wait_for


@pytest.mark.slow
def test_worker_killed_after_first_checkpoint(digits_8px, ray_local, mlflow_server, tmp_path):
    """Injected: SIGKILL to one of two Ray Train workers' processes, right after the first checkpoint.

    Survived: Ray Train replaces the worker group, which resumes from the last checkpoint; the run ends at exactly
    ``total_images``, its final checkpoint loads, the MLflow run records ``restarts=1`` and ``resumed_at_images``, and
    the images/loss curves go on from the checkpoint (no reset to 0). Lost: the steps after that checkpoint, redone.
    """
    from ddpm import checkpoint

    storage, name, total = str(tmp_path / "runs"), "killed-worker", 801
    killed: dict = {}

    def kill_after_first_checkpoint():
        try:
            first = wait_for(lambda: latest_checkpoint(storage, name), timeout=180, what="the first checkpoint")
            pids = wait_for(train_worker_pids, timeout=10, what="the train workers' pids")
            killed.update(pid=max(pids), workers=len(pids), checkpoint=first.state.images_seen, at=time.time())
            os.kill(killed["pid"], signal.SIGKILL)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            killed["error"] = exc

    args = train_args(digits_8px, storage, name, mlflow_server.uri, total=total, every=400)
    code = run_cli_beside(kill_after_first_checkpoint, args)
    assert "error" not in killed, killed.get("error")
    assert code == 0 and killed["workers"] == 2

    client = tracking.client(mlflow_server.uri)
    run = run_named(client, name)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["images_seen"] == total and run.data.metrics["restarts"] == 1
    assert run.data.tags["restarts"] == "1"
    [resumed] = client.get_metric_history(run.info.run_id, "resumed_at_images")
    assert resumed.value >= killed["checkpoint"] and resumed.value % 400 == 0

    # The curves continue: every log step is there once or twice (redone after the restart), images_seen is always
    # 16 per step (never reset), and what was logged after the restart starts past the checkpoint.
    history = client.get_metric_history(run.info.run_id, "images_seen")
    assert all(m.value == min(16 * m.step, total) for m in history)
    assert {m.step for m in history} == log_steps(total)
    after = [m for m in history if m.timestamp >= resumed.timestamp]
    assert after and min(m.value for m in after) > resumed.value
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {m.step for m in history}

    final = latest_checkpoint(storage, name)
    assert final.state.images_seen == total and final.state.restarts == 1
    loaded = checkpoint.load(Path(final.uri) / "model")
    assert loaded.metadata["images_seen"] == total
    print(f"\nworker killed: pid {killed['pid']} after the checkpoint at {killed['checkpoint']} images; training "
          f"resumed at {resumed.value:.0f} images {resumed.timestamp / 1000 - killed['at']:.1f} s later")


@pytest.fixture
def head_and_worker_node(monkeypatch):
    """A head node with 2 CPUs and a worker node with 1 CPU, on 127.0.0.1: two workers spread over both, and the head
    alone can still hold both. Yields (cluster, worker node); the local Ray of other tests is shut down first.

    ``ENABLE_RAY_CLUSTER`` off keeps ``ray.init`` on the loopback address (see tests/pipelines/test_train.py).
    """
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                           "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_node_lost(digits_8px, head_and_worker_node, mlflow_server, tmp_path, capfd):
    """Injected: in a run with ``max_failures=1`` on two nodes, the worker node (its raylet, object store and the Ray
    Train worker on it) is killed without warning after the first checkpoint; then, once the run has written its next
    checkpoint on the remaining node, one of its workers is SIGKILLed: one failure more than ``max_failures`` allows.

    Survived: losing the node costs one restart: both workers are placed on the head node, resume from the checkpoint
    and train on (the run's ``ray.num_nodes`` tag says 1, ``restarts`` 1). The failure past the limit stops the run
    with one line that names the last checkpoint, which is whole and loads: the same command resumes from it. Lost:
    the steps since each checkpoint. (A run with no further failure finishes: see the worker-killed test.)
    """
    from ddpm import checkpoint

    cluster, worker_node = head_and_worker_node
    storage, name, total, every = str(tmp_path / "runs"), "node-lost", 1601, 200
    client = tracking.client(mlflow_server.uri)
    events: dict = {}

    def resumed_at():
        run = run_named(client, name)
        return run is not None and run.data.metrics.get("resumed_at_images")

    def faults():
        try:
            first = wait_for(lambda: latest_checkpoint(storage, name), timeout=300, what="the first checkpoint")
            cluster.remove_node(worker_node, allow_graceful=False)
            events.update(first=first.state.images_seen, removed=time.time())
            at = wait_for(resumed_at, timeout=300, what="the restart on the remaining node", interval=0.2)
            wait_for(lambda: latest_checkpoint(storage, name).state.images_seen > at, timeout=300,
                     what="a checkpoint written on the remaining node")
            pids = wait_for(train_worker_pids, timeout=10, what="the train workers' pids")
            os.kill(max(pids), signal.SIGKILL)
            events["killed"] = time.time()
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            events["error"] = exc

    args = train_args(digits_8px, storage, name, mlflow_server.uri, total=total, every=every, max_failures=1)
    code = run_cli_beside(faults, args)
    assert "error" not in events, events["error"]
    failed_in = time.time() - events["killed"]

    run = run_named(client, name)
    [resumed] = client.get_metric_history(run.info.run_id, "resumed_at_images")
    assert run.data.metrics["restarts"] == 1 and resumed.value >= events["first"]
    assert run.data.tags["ray.num_nodes"] == "1" and run.data.tags["ray.num_workers"] == "2"
    assert run.info.status == "FAILED"

    # Ray's own log lines share stderr (one may even land between print's text and its newline): find ours
    [error] = [line for line in capfd.readouterr().err.splitlines() if line.startswith("ddpm train: error:")]
    saved = latest_checkpoint(storage, name)
    assert code == 1 and resumed.value < saved.state.images_seen < total
    assert re.match(r"ddpm train: error: training failed \(train.max_failures=1\): rank \d: worker lost: .*; "
                        rf"run the same command to resume from {re.escape(saved.uri)} "
                        rf"\({saved.state.images_seen} images\)", error), error
    assert checkpoint.load(Path(saved.uri) / "model").metadata["images_seen"] == saved.state.images_seen
    print(f"\n{error}")
    print(f"node lost after the checkpoint at {events['first']} images: training resumed on the remaining node at "
          f"{resumed.value:.0f} images {resumed.timestamp / 1000 - events['removed']:.1f} s later; a further failure "
          f"stopped the run {failed_in:.1f} s after it, naming the checkpoint at {saved.state.images_seen} images")


def _tiny_training_checkpoint(folder: Path, images_seen: int) -> None:
    """A real checkpoint folder as training writes it (model + training state), for the tiny U-Net."""
    import torch

    from ddpm import EMA, NoiseSchedule, UNet, UNetConfig
    from pipelines.train.checkpoints import TrainingState, write_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy two-core machine stall at every barrier (seconds, not ms)
    try:
        torch.manual_seed(0)
        net = UNet(UNetConfig.preset("tiny"))
        optimizer = torch.optim.Adam(net.parameters())
        net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).sum().backward()
        optimizer.step()
    finally:
        torch.set_num_threads(threads)
    state = TrainingState(step=images_seen // 16, images_seen=images_seen, restarts=0, ema_updates=1,
                          mlflow_run_id="r", world_size=1, config={}, metrics={})
    folder.mkdir(parents=True)
    write_checkpoint(folder, net=net, schedule=NoiseSchedule.linear(100), ema=EMA(net, decay=0.9),
                     optimizer=optimizer, state=state, rng_states={"rng.cpu.0": torch.get_rng_state()},
                     prediction_type="epsilon", class_names=[])


def test_corrupt_checkpoint_is_refused_at_load(tmp_path):
    """Injected: a model.safetensors cut at several lengths, and a config.json whose U-Net does not match the weights.

    Survived: ``ddpm.checkpoint.load`` refuses each with a one-line CheckpointError naming the file and the problem
    (nothing is half-loaded, nothing is unpickled). Lost: nothing; the intact copy still loads.
    """
    import json
    import shutil

    from ddpm import checkpoint
    from ddpm.checkpoint import CheckpointError

    _tiny_training_checkpoint(tmp_path / "good", 400)
    good = tmp_path / "good" / "model"
    weights = (good / "model.safetensors").read_bytes()
    for keep in (0, 4, 100, len(weights) // 2, len(weights) - 1):
        bad = tmp_path / f"truncated-{keep}"
        shutil.copytree(good, bad)
        (bad / "model.safetensors").write_bytes(weights[:keep])
        with pytest.raises(CheckpointError) as error:
            checkpoint.load(bad)
        message = str(error.value)
        assert "\n" not in message and str(bad / "model.safetensors") in message and "truncated" in message

    wrong = tmp_path / "wrong-shape"
    shutil.copytree(good, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["unet"]["base_channels"] = 8  # the weights were trained with 16
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weights do not match config.json \(\d+ problems, first: .*shape"):
        checkpoint.load(wrong)

    assert checkpoint.load(good).metadata["images_seen"] == 400


@pytest.mark.parametrize("where", ["local", "s3"])
def test_interrupted_checkpoint_is_never_the_latest(where, tmp_path, bucket):
    """Injected: the newest checkpoint folders of a run cut short as a kill mid-copy or an upload outage leaves them:
    a truncated model.safetensors, a truncated training state, a missing file, a truncated training_state.json.

    Survived: ``latest_checkpoint`` (which resuming, the end-of-run registration and the failure message use) passes
    over all of them and returns the last whole one, which loads. Lost: only the cut-short checkpoints.
    """
    from ddpm import checkpoint
    from pipelines import storage

    local = tmp_path / "runs" / "cut"
    for images in (400, 800, 1200, 1600, 2000):
        _tiny_training_checkpoint(local / f"checkpoint_{images:012d}", images)
    truncate = {800: "model/model.safetensors", 1200: "training_state.safetensors", 2000: "training_state.json"}
    for images, name in truncate.items():
        path = local / f"checkpoint_{images:012d}" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    (local / f"checkpoint_{1600:012d}" / "model" / "config.json").unlink()

    root = str(tmp_path / "runs")
    if where == "s3":  # the same folders as objects (a store that loses a part shows the same thing)
        root = f"s3://{bucket}/runs"
        for path in local.rglob("*"):
            if path.is_file():
                storage.write_bytes(storage.join(root, str(path.relative_to(local.parent))), path.read_bytes())
    latest = latest_checkpoint(root, "cut")
    assert latest.uri == storage.join(root, "cut", f"checkpoint_{400:012d}") and latest.state.images_seen == 400
    assert checkpoint.load(local / f"checkpoint_{400:012d}" / "model").metadata["images_seen"] == 400
