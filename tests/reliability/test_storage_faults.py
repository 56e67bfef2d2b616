"""Object store and tracking outages: the S3 endpoint or the MLflow server dies mid-job, then comes back.

The S3 endpoint that dies is :class:`~tests.reliability.support.S3Endpoint`, a process in front of the session's
moto server: SIGKILL refuses and resets every connection, as a dead endpoint does, while the objects stay in the store
behind it (as they do in a real store during an outage), so each test can check afterwards that nothing was lost.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import pytest

from pipelines import cli, storage, tracking
from pipelines.data.digits import write_digits

from .support import log_steps, run_cli_beside, run_named, train_args, train_worker_pids, wait_for

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("digits_8px")  # Ray Data sets up its log handler before capfd swaps stderr, not under it
def test_s3_outage_during_ingest(s3, bucket, s3_endpoint, ray_local, capfd):
    """Injected: the S3 endpoint is SIGKILLed while ``ddpm preprocess`` is writing its shards (after the first one).

    Survived: the previous good output, manifest.json and every shard it names, byte for byte. The job fails within
    seconds with one line naming the URI and the endpoint (no traceback). Once the endpoint is back, the same command
    completes, with the same fingerprint, and deletes the failed run's leftovers. Lost: nothing.
    """
    raw, out = f"s3://{bucket}/raw", f"s3://{bucket}/processed"
    write_digits(raw, limit=120)  # through the session's endpoint, not the one that will die
    args = ["preprocess", "--input", raw, "--output", out, "--resolution", "8", "--channels", "1",
            "--batch-size", "8", "--endpoint-url", s3_endpoint.url]  # 15 tasks, 15 shards
    assert cli.main(args) == 0
    good = storage.read_json(storage.join(out, "manifest.json"))
    committed = ["manifest.json", *good["shards"]]
    before = {key: storage.read_bytes(storage.join(out, key)) for key in committed}
    capfd.readouterr()

    # -- the outage: kill the endpoint as soon as the second run's first shard is in the store ---------------------
    def new_shards():
        return [e.key for e in storage.list_files(out) if e.key.endswith(".parquet") and e.key not in committed]

    killed: dict[str, float] = {}

    def kill_after_first_shard():
        try:
            wait_for(new_shards, timeout=60, what="the second run's first shard", interval=0.02)
        finally:
            s3_endpoint.kill()
            killed["at"] = time.monotonic()

    code = run_cli_beside(kill_after_first_shard, args)
    failed_in = time.monotonic() - killed["at"]
    err = capfd.readouterr().err
    assert code == 1
    # Ray's own log lines share stderr (one may even land between print's text and its newline): find ours
    [error] = [line for line in err.splitlines() if line.startswith("ddpm preprocess: error:")]
    assert re.match(rf"ddpm preprocess: error: {out}/data-\w+: cannot connect to the S3 endpoint "
                        rf"{s3_endpoint.url}", error), err[-2000:]
    assert "Traceback" not in err
    assert failed_in < 30, f"the job took {failed_in:.0f} s to notice the outage"
    assert {key: storage.read_bytes(storage.join(out, key)) for key in committed} == before
    leftovers = new_shards()
    assert leftovers  # the failed run's partial generation (named by no manifest: invisible to readers)

    # -- recovery: the endpoint comes back, the same command completes ----------------------------------------------
    restarted = time.monotonic()
    s3_endpoint.start()
    assert cli.main(args) == 0
    recovered_in = time.monotonic() - restarted
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["fingerprint"] == good["fingerprint"] and manifest["counts"]["rows"] == 120
    remaining = {e.key for e in storage.list_files(out)}
    assert remaining == {"manifest.json", *manifest["shards"]}  # old generation and the failed run's leftovers gone
    print(f"\nS3 outage during ingest: failed {failed_in:.1f} s after the kill with one line; "
          f"rerun after the endpoint returned completed in {recovered_in:.1f} s")


def test_s3_outage_during_checkpoint_upload(digits_8px, ray_local, s3, bucket, s3_endpoint, mlflow_server,
                                            monkeypatch):
    """Injected: the S3 endpoint that holds the checkpoints is SIGKILLed as soon as the first checkpoint is in the
    store, and stays down until the run has hit it, for 4 to 30 s; then it comes back.

    Two things write to the store right after a checkpoint, and the outage hits whichever comes first:
    Ray Train's controller, registering the checkpoint (it writes its own snapshot), or the upload of the next one.
    Survived, either way: the run ends at exactly ``total_images``. A failed upload waits for the store and training
    goes on without a restart; a failed controller write stops Ray Train, and the driver waits for the store and goes
    on from the last complete checkpoint (``restarts`` 1). Every checkpoint folder in the store is whole, the final
    one loads. Lost: nothing but, on the second path, the steps since the checkpoint.
    """
    from tests.support import S3_PORT

    from ddpm import checkpoint
    from pipelines.train.checkpoints import complete_checkpoint, latest_checkpoint

    direct = f"http://127.0.0.1:{S3_PORT}"  # the store itself, for the test's own looks: never down
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint.url)  # what the training driver and its workers use
    runs, name, total, every = f"s3://{bucket}/runs", "upload-outage", 801, 400
    client = tracking.client(mlflow_server.uri)
    events: dict = {}

    def upload_blocked() -> bool:  # metrics are logged just before a checkpoint: the second one is being uploaded
        run = run_named(client, name)
        return run is not None and run.data.metrics.get("images_seen", 0) >= 2 * every

    def hit() -> bool:  # the outage has met the run: an upload is waiting for it, or Ray Train stopped the workers
        return upload_blocked() or not train_worker_pids()

    def outage():
        try:
            wait_for(lambda: latest_checkpoint(runs, name, direct), timeout=300, what="the first checkpoint")
            s3_endpoint.kill()
            events["killed"] = time.monotonic()
            time.sleep(4)
            wait_for(hit, timeout=26, what="the run meeting the outage", interval=0.2)
            time.sleep(2)  # an upload that fails retries after 1 s, then 2 s: it has failed at least twice
            events["blocked_upload"] = upload_blocked()
            events["stored_before_restart"] = latest_checkpoint(runs, name, direct).state.images_seen
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            events["error"] = exc
        finally:
            s3_endpoint.start()
            events["restarted"] = time.monotonic()

    args = train_args(digits_8px, runs, name, mlflow_server.uri, total=total, every=every, workers=1)
    code = run_cli_beside(outage, args)
    assert "error" not in events, events["error"]
    assert code == 0

    run = run_named(client, name)
    assert run.info.status == "FINISHED" and run.data.metrics["images_seen"] == total
    restarts = run.data.metrics.get("restarts", 0)
    if restarts == 0:  # the outage met the upload of the second checkpoint, which waited for the store
        assert events["blocked_upload"] and events["stored_before_restart"] == every
        path = "the checkpoint upload waited for the store; no restart"
    else:  # it met Ray Train's controller writing its snapshot: the driver waited for the store and went on
        assert restarts == 1
        [resumed] = client.get_metric_history(run.info.run_id, "resumed_at_images")
        path = f"Ray Train's controller stopped; resumed at {resumed.value:.0f} images after the store returned"
    folders = {e.key.split("/")[0] for e in storage.list_files(storage.join(runs, name), direct)
               if e.key.startswith("checkpoint_0")}
    assert f"checkpoint_{total:012d}" in folders
    for folder in folders:  # each one whole, none cut short by the outage
        assert complete_checkpoint(storage.join(runs, name, folder), direct) is not None, folder
    final = latest_checkpoint(runs, name, direct)
    assert final.state.images_seen == total
    local = Path(tempfile.mkdtemp()) / "model"
    local.mkdir()
    for entry in storage.list_files(storage.join(final.uri, "model"), direct):
        (local / entry.key).write_bytes(storage.read_bytes(storage.join(final.uri, "model", entry.key), direct))
    assert checkpoint.load(local).metadata["images_seen"] == total
    print(f"\nS3 outage during checkpoints: down {events['restarted'] - events['killed']:.1f} s; {path}")


def test_tracking_outage_during_training(digits_8px, ray_local, mlflow_server, tmp_path, capsys):
    """Injected: the MLflow server is stopped (SIGTERM) once the run's first metrics have arrived, and started again
    after training has written a checkpoint without it.

    Survived: training never stops (a checkpoint is written while the server is down; the run ends at exactly
    ``total_images``); the metrics logged during the outage are buffered and delivered after the server returns,
    so every log step is in the run's history; the run is FINISHED and nothing is reported as unlogged. Lost: nothing.
    """
    from pipelines.train.checkpoints import latest_checkpoint

    runs, name, total, every = str(tmp_path / "runs"), "tracking-outage", 801, 400
    client = tracking.client(mlflow_server.uri)
    events: dict = {}

    def outage():
        try:
            wait_for(lambda: (run := run_named(client, name)) and "images_seen" in run.data.metrics,
                     timeout=300, what="the first metrics", interval=0.2)
            mlflow_server.stop()
            events["stopped"] = time.time()
            first = wait_for(lambda: latest_checkpoint(runs, name), timeout=120, what="a checkpoint during the outage")
            events["checkpoint_during_outage"] = first.state.images_seen
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            events["error"] = exc
        finally:
            if mlflow_server.proc is None:
                mlflow_server.start()
            events["started"] = time.time()
        if "error" in events:
            return
        try:  # the logger retries every 5 s: what was buffered arrives soon after the server is back
            run_id = run_named(client, name).info.run_id
            wait_for(lambda: any(events["stopped"] * 1000 < m.timestamp < events["started"] * 1000
                                 for m in client.get_metric_history(run_id, "images_seen")),
                     timeout=120, what="the buffered metrics", interval=0.2)
            events["delivered"] = time.time()
        except Exception as exc:  # noqa: BLE001
            events["error"] = exc

    args = train_args(digits_8px, runs, name, mlflow_server.uri, total=total, every=every, workers=1)
    code = run_cli_beside(outage, args)
    assert "error" not in events, events["error"]
    assert code == 0 and events["checkpoint_during_outage"] >= every
    assert "not logged to MLflow" not in capsys.readouterr().out

    run = run_named(client, name)
    assert run.info.status == "FINISHED" and run.data.metrics["images_seen"] == total
    history = client.get_metric_history(run.info.run_id, "images_seen")
    assert {m.step for m in history} == log_steps(total)  # every log step, none lost
    during = [m for m in history if events["stopped"] * 1000 < m.timestamp < events["started"] * 1000]
    assert during, "nothing was logged while the server was down: the outage did not overlap training"
    # MLflow keeps the client's timestamp, so a buffered metric shows when it was logged, not when it arrived
    print(f"\ntracking outage: server down {events['started'] - events['stopped']:.1f} s (its restart included); "
          f"{len(during)} log steps buffered, delivered {events['delivered'] - events['started']:.1f} s after it "
          f"was back")
