"""``ddpm train-autoencoder`` against real components: a local Ray, S3 from moto for the checkpoints, a real MLflow
server for the run and the registry.

One scenario, in the order a user lives it (each Ray Train start costs tens of seconds on two cores):

1. a fresh run on two workers to 96 images: the MLflow run gets the held-out PSNR, the scaling factor and the grid
   of originals over reconstructions; the autoencoder is registered with its lineage tags, and
   ``resolve_autoencoder`` + ``ddpm.autoencoder.load`` give an autoencoder that encodes to (B, 4, H/4, W/4);
2. the same command with a larger ``total_images``: it resumes from the 96-image checkpoint in the same MLflow run
   and trains only the new images, then registers version 2;
3. the same command again: nothing to train, nothing new to register.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import cli

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "autoencoder-f4.yaml")
TINY = [
    "--set", "model.preset=tiny",              # f = 4, 0.24M parameters
    "--set", "train.batch_size=16",
    "--set", "train.warmup_images=16",
    "--set", "train.log_every_steps=2",
    "--set", "train.checkpoint_every_images=48",
    "--set", "train.sample_every_images=48",
    "--set", "train.eval_images=8",
    "--set", "train.scaling_images=16",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """48 photo crops of 16x16 RGB, preprocessed by the real ingest (Ray Data) into a local dataset."""
    from pipelines.data.photos import write_photos
    from pipelines.data.preprocess import preprocess
    from tests.support import start_local_ray

    start_local_ray()
    root = tmp_path_factory.mktemp("photos")
    write_photos(str(root / "raw"), count=48, size=16, seed=0)
    manifest = preprocess(str(root / "raw"), str(root / "processed"), resolution=16, channels=3, progress=None)
    return str(root / "processed"), manifest


def _train(data: str, storage: str, tracking_uri: str, total_images: int) -> int:
    return cli.main([
        "train-autoencoder", "--data", data, "--config", CONFIG, *TINY,
        "--set", f"train.total_images={total_images}",
        "--num-workers", "2", "--storage", storage, "--name", "ae-run",
        "--register-as", "tiny-ae", "--tracking-uri", tracking_uri, "--experiment", "test-train-ae",
    ])


def test_train_register_resume(photos, s3, mlflow_server, capsys):
    import torch

    from ddpm import autoencoder
    from pipelines import registry, storage, tracking

    data, manifest = photos
    s3.create_bucket(Bucket="train-autoencoder")
    runs = "s3://train-autoencoder/runs"
    client = tracking.client(mlflow_server.uri)

    # -- 1. a fresh run on two workers ----------------------------------------------------------------------------
    assert _train(data, runs, mlflow_server.uri, total_images=96) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    [run] = client.search_runs([tracking.ensure_experiment("test-train-ae", mlflow_server.uri)])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.metrics["images_seen"] == 96
    assert run.data.tags["dataset_fingerprint"] == manifest["fingerprint"]
    assert run.data.params["model.block_out_channels"] == "[16, 32, 32]"
    psnr = client.get_metric_history(run_id, "psnr_heldout")
    assert [m.step for m in psnr] == [3, 6]  # at the checkpoints of 48 and 96 images (steps of 16)
    _psnr_is_the_checkpoints_and_beats_the_untrained_model(data, manifest, runs, psnr[-1].value)
    [factor] = [m.value for m in client.get_metric_history(run_id, "scaling_factor") if m.step == 6]
    for key in ("loss", "rec_loss", "kl", "lr", "grad_norm", "images_per_sec"):
        assert client.get_metric_history(run_id, key), key
    grids = sorted(a.path for a in client.list_artifacts(run_id, "reconstructions"))
    assert grids == ["reconstructions/images_000000000048.png", "reconstructions/images_000000000096.png"]
    from PIL import Image

    assert Image.open(client.download_artifacts(run_id, grids[-1])).size == (8 * 17 + 1, 2 * 17 + 1)

    [version] = client.search_model_versions("name = 'tiny-ae'")
    tags = version.tags
    assert version.version == "1" and version.run_id == run_id
    assert tags["run_id"] == run_id and tags["images_seen"] == "96"
    assert tags["dataset_fingerprint"] == manifest["fingerprint"] and len(tags["config_hash"]) == 16
    assert tags["downsample_factor"] == "4"
    assert float(tags["metric.psnr_heldout"]) == pytest.approx(psnr[-1].value, rel=1e-4)
    assert float(tags["scaling_factor"]) == pytest.approx(factor, rel=1e-4)
    assert last_line.startswith("trained ae-run to 96 images; checkpoint s3://train-autoencoder/runs/ae-run/"
                                "checkpoint_000000000096; MLflow run ") and "models:/tiny-ae/1" in last_line
    assert f"held-out PSNR {psnr[-1].value:.2f} dB" in last_line

    folder = registry.resolve_autoencoder("models:/tiny-ae/1", mlflow_server.uri).path
    ae = autoencoder.load(folder)
    assert ae.config.scaling_factor == pytest.approx(factor, rel=1e-4)
    with torch.no_grad():
        z = ae.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (2, 4, 4, 4)

    # -- 2. the same command, further: resumes in the same run and trains only the new images --------------------
    first = storage.read_json(f"{runs}/ae-run/checkpoint_000000000096/training_state.json")
    assert _train(data, runs, mlflow_server.uri, total_images=160) == 0
    [run] = client.search_runs([tracking.ensure_experiment("test-train-ae", mlflow_server.uri)])
    assert run.info.run_id == run_id and run.data.metrics["images_seen"] == 160
    assert run.data.metrics["restarts"] == 1 and run.data.metrics["resumed_at_images"] == 96
    history = client.get_metric_history(run_id, "images_seen")
    # every logged step exactly once: steps 2, 4, 6 in the first run, 8 and 10 after resuming (nothing retrained)
    assert sorted((m.step, m.value) for m in history) == [(2, 32), (4, 64), (6, 96), (8, 128), (10, 160)]
    resumed = storage.read_json(f"{runs}/ae-run/checkpoint_000000000160/training_state.json")
    assert resumed["step"] == 10 and resumed["restarts"] == 1 and resumed["mlflow_run_id"] == run_id
    assert resumed["train_seconds"] > first["train_seconds"]
    assert [m.step for m in client.get_metric_history(run_id, "psnr_heldout")] == [3, 6, 9, 10]
    assert {v.version: v.tags["images_seen"] for v in client.search_model_versions("name = 'tiny-ae'")} == {
        "1": "96", "2": "160"}

    # -- 3. once more: the final checkpoint is there, so nothing trains and nothing new is registered -------------
    assert _train(data, runs, mlflow_server.uri, total_images=160) == 0
    assert "models:/tiny-ae/2" in capsys.readouterr().out.strip().splitlines()[-1]
    assert len(client.search_model_versions("name = 'tiny-ae'")) == 2
    assert storage.read_json(f"{runs}/ae-run/checkpoint_000000000160/training_state.json") == resumed


def _psnr_is_the_checkpoints_and_beats_the_untrained_model(data: str, manifest: dict, runs: str, logged: float):
    """The PSNR logged at 96 images is what the saved checkpoint's autoencoder gives on the held-out images, and
    more than the same autoencoder gave before training (its initial weights, from train.seed)."""
    import torch

    from ddpm import autoencoder
    from ddpm.autoencoder import Autoencoder
    from pipelines.train.autoencoder import _split
    from pipelines.train.checkpoints import stored
    from pipelines.train.autoencoder_config import load_config
    from pipelines.train.autoencoder_worker import evaluate

    config = load_config(CONFIG, [item for item in TINY if item != "--set"])
    _, held_out = _split(data, manifest, config)  # (8, 16, 16, 3) uint8, the worker's held-out images in order
    with stored(f"{runs}/ae-run/checkpoint_000000000096").as_directory() as folder:
        trained = autoencoder.load(str(Path(folder) / "model"))
    cpu = torch.device("cpu")
    assert evaluate(trained, held_out, cpu)[0] == pytest.approx(logged, abs=1e-3)
    torch.manual_seed(config.train.seed)
    untrained = Autoencoder(config.model)
    assert logged > evaluate(untrained, held_out, cpu)[0]


def _fake_dataset(folder: Path, **fields) -> str:
    """A folder with only a manifest: enough for the checks that run before anything is read."""
    folder.mkdir()
    manifest = {"format_version": 1, "image_shape": [16, 16, 3], "fingerprint": "x", "shards": [],
                "counts": {"rows": 100}, **fields}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


@pytest.mark.parametrize("fields, message", [
    ({"kind": "latents", "dtype": "float32", "image_shape": [4, 4, 4]}, "is a latent dataset (ddpm encode output)"),
    ({"image_shape": [16, 16, 1]}, "holds 1-channel images but the autoencoder takes 3; set --set model.in_channels=1"),
    ({"image_shape": [18, 18, 3]}, "holds 18x18 images, not divisible by the autoencoder's f=4"),
    ({"counts": {"rows": 8}}, "has 8 images, not more than train.eval_images=8 held out"),
])
def test_unusable_data_is_one_line(fields, message, capsys, tmp_path):
    data = _fake_dataset(tmp_path / "data", **fields)
    code = cli.main(["train-autoencoder", "--data", data, "--config", CONFIG, *TINY,
                     "--storage", str(tmp_path / "runs"), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ddpm train-autoencoder: error:") and message in err[0]


@pytest.mark.parametrize("setting, message", [
    ("train.bogus=1", "unknown key"),
    ("model.scaling_factor=0.2", "model.scaling_factor is measured during training"),
    ("train.loss=l3", "train.loss must be l1 or l2"),
])
def test_bad_config_is_one_line(setting, message, capsys, tmp_path):
    code = cli.main(["train-autoencoder", "--data", str(tmp_path), "--config", CONFIG, "--set", setting,
                     "--storage", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("ddpm train-autoencoder: error:") and message in err[0]


def test_loss_is_ldm_summed_loss_over_pixels_and_psnr_is_on_the_unit_scale():
    """loss = LDM's (pixel L1 and KL summed per image, averaged over the batch, kl_weight 1e-6) / (C*H*W)."""
    import torch

    from ddpm.autoencoder import kl_divergence
    from pipelines.train.autoencoder_worker import autoencoder_loss, psnr

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    recon = x + 0.1 * torch.randn(3, 3, 8, 8, generator=g)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    loss, rec, kl = autoencoder_loss(x, recon, mean, logvar, loss="l1", kl_weight=1e-6)
    ldm = (recon - x).abs().flatten(1).sum(1).mean() + 1e-6 * kl_divergence(mean, logvar).mean()
    assert loss.item() == pytest.approx(ldm.item() / (3 * 8 * 8), rel=1e-5)
    assert rec.item() == pytest.approx((recon - x).abs().mean().item(), rel=1e-6)
    _, rec2, _ = autoencoder_loss(x, recon, mean, logvar, loss="l2")
    assert rec2.item() == pytest.approx((recon - x).square().mean().item(), rel=1e-6)
    # an error of 0.1 in [-1, 1] is 0.05 on [0, 1]: PSNR = 10 log10(1 / 0.05^2) = 26.02 dB
    flat = torch.zeros(1, 3, 4, 4)
    assert psnr(flat, flat + 0.1).item() == pytest.approx(26.0206, abs=1e-3)
