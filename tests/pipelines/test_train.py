"""``ddpm train`` against real components: a two-node Ray cluster, S3 from moto, a real MLflow server.

One scenario, in the order a user lives it (each Ray Train start costs tens of seconds on two cores, so the checks
share runs):

1. a fresh run on two workers spread over two nodes, data and checkpoints on S3, where the last rank dies right after
   the first checkpoint (``DDPM_TEST_FAIL_AFTER_IMAGES``): Ray Train replaces it, the run ends at exactly
   ``total_images`` (the last batch is truncated and split 5/4), metrics and sample grids reach the server, and
   the model is registered with its lineage tags;
2. the same command again with a larger ``total_images``: it resumes in the same MLflow run, and while it trains
   the MLflow server is stopped and started again; training goes on and the buffered metrics arrive afterwards;
3. the same command with a ``train.max_minutes`` the run has already used up: it is finished, nothing trains.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipelines import cli

pytestmark = pytest.mark.slow

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")
TINY = [
    "--set", "model.preset=tiny",             # 8x8x1, 16 base channels
    "--set", "train.batch_size=16",
    "--set", "train.warmup_images=32",
    "--set", "train.log_every_steps=2",
    "--set", "train.checkpoint_every_images=96",
    "--set", "train.sample_every_images=96",
]


@pytest.fixture(autouse=True)
def _connect_over_loopback(monkeypatch):
    """Let ``ray.init`` reach the two-node cluster's GCS on 127.0.0.1.

    ``ray.init(address="127.0.0.1:PORT")`` rewrites a loopback address to the machine's own IP before connecting
    (``services.resolve_ip_for_localhost``), but the cluster's GCS listens on 127.0.0.1 only, so the connection
    hangs. With ``ENABLE_RAY_CLUSTER`` off, Ray's node IP lookup returns 127.0.0.1 and the address stays loopback.
    (The same two lines belong in conftest's ``ray_two_nodes``; here they apply to this module only.)
    """
    import ray._private.ray_constants as ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)


@pytest.fixture
def digits_on_s3(ray_two_nodes, s3, bucket):
    """200 of scikit-learn's digits as PNGs on S3, preprocessed to 8x8x1 Parquet shards: the real ingest path."""
    from pipelines.data.digits import write_digits
    from pipelines.data.preprocess import preprocess

    write_digits(f"s3://{bucket}/raw", limit=200)
    manifest = preprocess(f"s3://{bucket}/raw", f"s3://{bucket}/processed", resolution=8, channels=1)
    return f"s3://{bucket}/processed", manifest


def _train(data: str, bucket: str, tracking_uri: str, total_images: int, fewer_files: bool = False,
           extra: tuple[str, ...] = ()) -> int:
    """``ddpm train`` in this process; ``fewer_files``: a checkpoint and a grid every 1,600 images, not 96."""
    later = ["--set", "train.checkpoint_every_images=1600", "--set", "train.sample_every_images=1600"]
    return cli.main([
        "train", "--data", data, "--config", CONFIG, *TINY, *(later if fewer_files else []), *extra,
        "--set", f"train.total_images={total_images}",
        "--num-workers", "2", "--storage", f"s3://{bucket}/runs", "--name", "digits-run",
        "--register-as", "tiny-digits", "--tracking-uri", tracking_uri, "--experiment", "test-train",
    ])


def test_two_nodes_failure_resume_and_tracking_outage(digits_on_s3, bucket, mlflow_server, monkeypatch):
    from PIL import Image

    from pipelines import storage, tracking

    data, manifest = digits_on_s3
    client = tracking.client(mlflow_server.uri)

    # -- 1. a fresh run; the last rank raises after the first checkpoint (96 images) --------------------------------
    monkeypatch.setenv("DDPM_TEST_FAIL_AFTER_IMAGES", "96")
    assert _train(data, bucket, mlflow_server.uri, total_images=201) == 0
    monkeypatch.delenv("DDPM_TEST_FAIL_AFTER_IMAGES")

    [run] = client.search_runs([tracking.ensure_experiment("test-train", mlflow_server.uri)])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["images_seen"] == 201  # 12 steps of 16, then 9 split 5/4 across the two workers
    assert run.data.metrics["restarts"] == 1  # the failed worker was replaced, resuming from the checkpoint
    assert run.data.tags["ray.num_nodes"] == "2" and run.data.tags["ray.num_workers"] == "2"
    assert run.data.tags["dataset_fingerprint"] == manifest["fingerprint"]
    assert run.data.params["model.base_channels"] == "16" and run.data.params["model.num_classes"] == "10"
    for key in ("loss", "lr", "grad_norm", "images_per_sec"):
        assert client.get_metric_history(run_id, key), key
    grids = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert "samples/images_000000000201.png" in grids and len(grids) >= 2
    png = client.download_artifacts(run_id, grids[0])
    assert Image.open(png).size == (8 * 9 + 1, 10 * 9 + 1)  # 8 seeds per row, one row per class, 1-pixel gaps

    final = storage.read_json(f"s3://{bucket}/runs/digits-run/checkpoint_000000000201/training_state.json")
    assert final["images_seen"] == 201 and final["mlflow_run_id"] == run_id and final["restarts"] == 1
    [version] = client.search_model_versions("name = 'tiny-digits'")
    assert version.version == "1" and version.run_id == run_id
    assert version.tags["run_id"] == run_id and version.tags["images_seen"] == "201"
    assert version.tags["dataset_fingerprint"] == manifest["fingerprint"]
    assert len(version.tags["config_hash"]) == 16 and float(version.tags["metric.loss"]) > 0

    # -- 2. the same command, further: resumes in the same run while the tracking server goes away -------------
    outage: dict[str, float] = {}

    def stop_and_restart():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait for the resumed run's first metrics
            try:
                if any(m.value > 201 for m in client.get_metric_history(run_id, "images_seen")):
                    break
            except Exception:  # noqa: BLE001 - the server is busy; try again
                pass
            time.sleep(0.2)
        outage["stop"] = time.time()
        mlflow_server.stop()
        time.sleep(6)
        outage["start"] = time.time()
        mlflow_server.start()

    thread = threading.Thread(target=stop_and_restart)
    thread.start()
    try:
        assert _train(data, bucket, mlflow_server.uri, total_images=3201, fewer_files=True) == 0
    finally:
        thread.join()

    [run] = client.search_runs([tracking.ensure_experiment("test-train", mlflow_server.uri)])
    assert run.info.run_id == run_id  # the same run, reopened from the checkpoint's training state
    assert run.data.metrics["images_seen"] == 3201 and run.data.metrics["restarts"] == 2
    history = client.get_metric_history(run_id, "images_seen")
    # every log step of the resumed run arrived (step 13 ended run 1; 3000 more images = 187 steps of 16 + one of 8)
    assert {m.step for m in history} >= set(range(14, 201, 2)) | {201}
    during = [m for m in history if outage["stop"] * 1000 < m.timestamp < outage["start"] * 1000]
    assert during, "no step was logged while the server was down: the outage did not overlap training"
    assert {v.version for v in client.search_model_versions("name = 'tiny-digits'")} == {"1", "2"}
    # The training clock (train.max_minutes counts it) went on from the first run's: at least its seconds plus the
    # resumed run's first to last logged step.
    resumed = storage.read_json(f"s3://{bucket}/runs/digits-run/checkpoint_000000003201/training_state.json")
    logged = [m.timestamp for m in history if m.step > 13]
    assert resumed["train_seconds"] >= final["train_seconds"] + (max(logged) - min(logged)) / 1000

    # -- 3. a time limit that the run has already used up: nothing more to train, nothing new to register --------
    spent = resumed["train_seconds"] / 60
    limit = ("--set", f"train.max_minutes={spent / 2}")
    assert _train(data, bucket, mlflow_server.uri, total_images=6401, extra=limit) == 0
    assert {v.version for v in client.search_model_versions("name = 'tiny-digits'")} == {"1", "2"}
    assert storage.read_json(f"s3://{bucket}/runs/digits-run/checkpoint_000000003201/training_state.json") == resumed


def test_bad_config_key_is_one_line(capsys, tmp_path):
    code = cli.main(["train", "--data", str(tmp_path), "--config", CONFIG, "--set", "train.bogus=1",
                     "--storage", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("ddpm train: error:") and "train.bogus" in err[0]


def test_data_without_manifest_is_one_line(capsys, tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"not a dataset")
    code = cli.main(["train", "--data", str(tmp_path), "--config", CONFIG, "--storage", str(tmp_path / "runs"),
                     "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0] == f"ddpm train: error: no manifest.json at {tmp_path}: run ddpm preprocess first"


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    """Optimizer moments and settings, RNG states and counters survive write_checkpoint/read_checkpoint exactly."""
    import torch

    from ddpm import EMA, NoiseSchedule, UNet, UNetConfig
    from ddpm.training import train_step
    from pipelines.config import TrainConfig
    from pipelines.train.checkpoints import TrainingState, read_checkpoint, write_checkpoint

    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny"))
    optimizer = TrainConfig(optimizer="adamw", lr=1e-3, adam_beta2=0.99).build_optimizer(net.parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    ema = EMA(net, decay=0.9)
    schedule = NoiseSchedule.linear(100)
    for _ in range(2):
        train_step(net, optimizer, schedule, torch.randn(4, 1, 8, 8), lr=1e-3)
        ema.update(net)
    state = TrainingState(step=2, images_seen=8, restarts=0, ema_updates=2, mlflow_run_id="abc", world_size=1)
    rng = {"rng.cpu.0": torch.get_rng_state()}
    write_checkpoint(tmp_path, net=net, schedule=schedule, ema=ema, optimizer=optimizer, state=state,
                     rng_states=rng, prediction_type="epsilon", class_names=[])

    saved, optimizer_state, raw, ema_state, rng_back = read_checkpoint(tmp_path)
    assert saved == state
    fresh = TrainConfig(optimizer="adamw").build_optimizer(net.parameters())  # beta2 0.999, as a resumed run builds it
    fresh.load_state_dict(optimizer_state)
    assert tuple(fresh.param_groups[0]["betas"]) == (0.9, 0.99), "the checkpoint's beta2 wins on resume"
    for p in net.parameters():
        assert all(torch.equal(optimizer.state[p][k], fresh.state[p][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert all(torch.equal(raw[k], p) for k, p in net.state_dict().items())
    assert all(torch.equal(ema_state[k], v) for k, v in ema.state_dict().items())
    assert torch.equal(rng_back["rng.cpu.0"], rng["rng.cpu.0"])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "training_state.json", "training_state.safetensors"]


def test_the_row_order_depends_on_the_images_seen_not_on_the_workers():
    """Blocks of 20, 5 and 25 rows: each pass visits every row once, passes differ, and however the positions are
    cut (one worker's steps of 12, or three workers' parts of them, or a resize from 3 workers to 2 after step 4),
    position i holds the same row."""
    import numpy as np

    from pipelines.train.rows import Order

    sizes = (20, 5, 25)
    starts = np.cumsum((0,) + sizes[:-1])
    flat = lambda runs: np.concatenate([starts[b] + rows for b, rows in runs])  # noqa: E731 - (block, row) -> row id
    whole = flat(Order(sizes, seed=3).at(0, 160))  # three passes and 10 rows of a fourth
    passes = [whole[k * 50:(k + 1) * 50] for k in range(3)]
    assert all(sorted(p) == list(range(50)) for p in passes)
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])

    def run(worlds: list[int], batch: int = 12, total: int = 160) -> np.ndarray:
        """The rows each step trains on, in rank order, with world size ``worlds[step]`` (a fresh Order per
        world size, as after a restart)."""
        seen, taken = 0, []
        for world in worlds:
            order = Order(sizes, seed=3)
            n = min(batch, total - seen)
            m = -(-n // world)
            for rank in range(world):
                rows = min(max(n - rank * m, 0), m)
                if rows:
                    taken.append(flat(order.at(seen + rank * m, rows)))
            seen += n
        return np.concatenate(taken)

    steps = -(-160 // 12)
    assert np.array_equal(run([1] * steps), whole)
    assert np.array_equal(run([3] * steps), whole)
    assert np.array_equal(run([3] * 4 + [2] * (steps - 4)), whole)  # resized after step 4: nothing repeated


def test_rows_take_positions_from_blocks_in_the_object_store(ray_local):
    """Rows.take reads the numpy blocks of a materialized Ray Dataset: the images and labels at each position."""
    import numpy as np

    from pipelines.train.rows import Blocks, Rows

    items = [{"image": np.full((2, 2, 1), i, np.uint8), "label": i} for i in range(50)]
    blocks = Blocks.of(ray_local.data.from_items(items).repartition(3).materialize())
    assert blocks.num_rows == 50 and len(blocks.sizes) == 3
    rows = Rows(blocks, seed=0)
    images, labels = rows.take(45, 10)  # the end of pass 0 and the start of pass 1
    assert images.shape == (10, 2, 2, 1) and images.flags.writeable and (images[:, 0, 0, 0] == labels).all()
    assert sorted(np.concatenate([rows.take(0, 30)[1], rows.take(30, 20)[1]])) == list(range(50))
