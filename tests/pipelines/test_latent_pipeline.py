"""Latent diffusion end to end, as ``ddpm pipeline --config configs/photos-latent.yaml`` runs it, at toy sizes:
photos -> ingest -> train-autoencoder (Ray Train) -> encode (Ray Data) -> DDPM on the latents (Ray Train) ->
evaluate -> register -> gate, against a real MLflow server. Then what the model is to its users: the registered
version pins its autoencoder, the artifact carries it, and the MLflow pyfunc model and ``ddpm generate`` give
decoded 32x32 RGB pixels, the same ones.

Each stage's own behaviour is tested in its own module (test_train_autoencoder, test_encode, test_train,
tests/ddpm/test_latent, Serve's in tests/deploy/test_serve); this one checks that they fit together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_photos_latent_recipe_runs_end_to_end(tmp_path, mlflow_server, ray_local, monkeypatch, capsys):
    import json

    import mlflow

    from ddpm import autoencoder, checkpoint
    from pipelines import registry, tracking
    from pipelines.data.dataset import load_numpy, read_manifest

    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    overrides = [
        # the data: 96 crops at 32x32 (12 per photo), latents 8x8x4 through the tiny f = 4 autoencoder
        "pipeline.photos_count=96", "pipeline.resolution=32", f"pipeline.raw_output={data / 'raw'}",
        f"pipeline.processed={data / 'processed'}", f"pipeline.latents={data / 'latents'}",
        f"pipeline.storage={tmp_path / 'runs'}", "pipeline.run_name=lat", "pipeline.register_as=lat",
        "pipeline.autoencoder_name=lat-ae", "pipeline.num_workers=1",
        "pipeline.autoencoder_set=[model.preset=tiny, train.total_images=192, train.batch_size=16, "
        "train.eval_images=16, train.scaling_images=32, train.checkpoint_every_images=96, "
        "train.sample_every_images=192, train.log_every_steps=4]",
        # the DDPM: the tiny U-Net on the latents, 192 images
        "model.preset=tiny", "train.total_images=192", "train.batch_size=32", "train.warmup_images=32",
        "train.log_every_steps=2", "train.checkpoint_every_images=96", "train.sample_every_images=192",
        # the gate: 16 samples, DDIM-4
        "pipeline.eval_samples=16", "pipeline.eval_steps=4",
    ]
    args = ["pipeline", "--config", str(ROOT / "configs" / "photos-latent.yaml"), "--tracking-uri", mlflow_server.uri]
    for item in overrides:
        args += ["--set", item]
    assert cli.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for stage in ("[ingest]", "[autoencoder]", "[encode]", "[train]", "[register]", "[gate]"):
        assert stage in out, out

    # the latents name the registered autoencoder, and the model version pins it
    latents = read_manifest(str(data / "latents"))
    assert (latents["kind"], latents["image_shape"], latents["pixel_shape"]) == ("latents", [8, 8, 4], [32, 32, 3])
    assert (latents["autoencoder"]["name"], latents["autoencoder"]["version"]) == ("lat-ae", "1")
    assert latents["counts"]["rows"] == 2 * 96  # encode_flip: every crop and its mirror
    z, _ = load_numpy(str(data / "latents"))
    assert 0.5 < z.std() < 2  # the scaling factor measured in training brings the latents near unit variance
    client = tracking.client(mlflow_server.uri)
    version = client.get_model_version("lat", "1")
    assert version.tags["autoencoder"] == "models:/lat-ae/1"
    assert client.get_run(version.run_id).data.tags["autoencoder"] == "models:/lat-ae/1"
    assert "gate.decision" in version.tags

    # the artifact carries the very autoencoder that was registered
    model_dir = registry.resolve_model("models:/lat/1", mlflow_server.uri).path
    config = json.loads((model_dir / "config.json").read_text())
    assert config["image_shape"] == [4, 8, 8] and config["autoencoder"]["image_shape"] == [3, 32, 32]
    assert config["autoencoder"]["source"]["version"] == "1"
    registered = autoencoder.load(registry.resolve_autoencoder("models:/lat-ae/1", mlflow_server.uri).path)
    carried = checkpoint.load(model_dir).autoencoder
    assert carried.config == registered.config
    for name, tensor in registered.state_dict().items():
        assert np.array_equal(carried.state_dict()[name].numpy(), tensor.numpy()), name

    # users get pixels: the pyfunc model and ddpm generate agree, bit for bit
    mlflow.set_tracking_uri(mlflow_server.uri)
    pyfunc = mlflow.pyfunc.load_model("models:/lat/1")
    images = pyfunc.predict([{"seeds": [5, 6], "sampler": "ddim", "steps": 4, "class_label": 2}])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    out_file = tmp_path / "two.npz"
    assert cli.main(["generate", "--model", "models:/lat/1", "--tracking-uri", mlflow_server.uri,
                     "--num-images", "2", "--seed", "5", "--steps", "4", "--class-label", "2",
                     "--out", str(out_file)]) == 0
    generated = np.load(out_file)
    assert np.array_equal(generated["images"], images)


def test_latent_data_refuses_random_flips_and_evaluation(tmp_path):
    """Two mistakes a user makes with latents, each a one-line error that says what to do."""
    from pipelines.config import load_config
    from pipelines.errors import UserError
    from pipelines.evaluate.quality import load_data
    from pipelines.train.driver import fit_to_dataset

    manifest = {"kind": "latents", "image_shape": [8, 8, 4], "dtype": "float32", "class_names": [],
                "source": {"uri": "s3://bucket/processed/photos"}, "format_version": 1}
    config = load_config(str(ROOT / "configs" / "photos-latent.yaml"), ["train.random_flip=true"])
    with pytest.raises(UserError, match="random_flip=false"):
        fit_to_dataset(config, manifest, "s3://bucket/latents")
    fitted = fit_to_dataset(load_config(str(ROOT / "configs" / "photos-latent.yaml"),
                                        ["train.class_conditional=false"]), manifest, "s3://bucket/latents")
    assert (fitted.model.image_size, fitted.model.in_channels) == (8, 4)  # from the manifest, not the recipe

    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(UserError, match="s3://bucket/processed/photos"):
        load_data(str(folder))
