"""The model registry against a real MLflow server: register, list, promote, resolve, generate, pyfunc.

The model is a tiny untrained U-Net saved in the core's checkpoint format: what is under test is the way from a
checkpoint folder to a registered version and back, not the quality of the images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli
from pipelines.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture
def checkpoint_dir(tmp_path):
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint

    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", num_classes=10))
    return checkpoint.save(tmp_path / "checkpoint", net, NoiseSchedule.linear(100), class_names=list("0123456789"))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private DDPM_HOME, so the download cache starts empty."""
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _register(checkpoint_dir: Path, name: str, uri: str) -> tuple[str, str]:
    from pipelines import registry, tracking

    client = tracking.client(uri)
    run = client.create_run(tracking.ensure_experiment("test-registry", uri))
    model_uri = registry.log_model(checkpoint_dir, run_id=run.info.run_id, tracking_uri=uri)
    tags = {"run_id": run.info.run_id, "dataset_fingerprint": "f" * 64, "config_hash": "c" * 16}
    return run.info.run_id, registry.register(model_uri, name, tags=tags, tracking_uri=uri)


def test_register_promote_resolve_and_generate(checkpoint_dir, home, mlflow_server, tmp_path, capsys):
    import mlflow
    import torch
    from PIL import Image

    from ddpm import checkpoint
    from pipelines import registry

    uri, name = mlflow_server.uri, f"tiny-{uuid.uuid4().hex[:6]}"
    run_id, version = _register(checkpoint_dir, name, uri)
    assert version == "1"
    assert registry.find_version(name, {"run_id": run_id}, uri) == "1"

    # promote through the CLI, and see it in the listing
    assert cli.main(["models", "promote", name, "1", "--alias", "production", "--tracking-uri", uri]) == 0
    assert cli.main(["models", "list", name, "--tracking-uri", uri]) == 0
    listing = capsys.readouterr().out
    assert "production" in listing and run_id in listing and "dataset_fingerprint=ffffffffffff" in listing
    assert cli.main(["models", "list", "--tracking-uri", uri]) == 0
    assert name in capsys.readouterr().out

    # resolve the alias: a local folder with the same weights, cached by name and version
    resolved = registry.resolve_model(f"models:/{name}@production", tracking_uri=uri)
    assert (resolved.name, resolved.version, resolved.alias) == (name, "1", "production")
    assert resolved.path.is_relative_to(home / "models")
    original, downloaded = checkpoint.load(checkpoint_dir), checkpoint.load(resolved.path)
    assert all(torch.equal(a, b) for a, b in zip(original.model.parameters(), downloaded.model.parameters()))
    assert registry.resolve_model(f"models:/{name}/1", tracking_uri=uri).path == resolved.path

    # a second version, promoted: the alias moves and Serve's check sees it
    _register(checkpoint_dir, name, uri)
    assert registry.current_version(name, "production", tracking_uri=uri) == "1"
    registry.promote(name, "2", "production", tracking_uri=uri)
    assert registry.current_version(name, "production", tracking_uri=uri) == "2"
    registry.promote(name, "1", "production", tracking_uri=uri)

    # ddpm generate from the alias, in a subprocess as a user runs it
    env = {**os.environ, "DDPM_HOME": str(home)}
    base = [sys.executable, "-m", "pipelines.cli", "generate", "--model", f"models:/{name}@production",
            "--tracking-uri", uri, "--sampler", "ddim", "--steps", "3", "--class-label", "3"]
    npz, png = tmp_path / "images.npz", tmp_path / "grid.png"
    subprocess.run([*base, "--num-images", "5", "--seed", "7", "--out", str(npz)], check=True, env=env)
    subprocess.run([*base, "--num-images", "4", "--seed", "7", "--out", str(png)], check=True, env=env)
    images = np.load(npz)["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert Image.open(png).size == (2 * 9 + 1, 2 * 9 + 1)  # 2x2 grid of 8x8 images, 1-pixel gaps

    # the pyfunc flavour gives the same images for the same seeds (it runs the same core)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    out = model.predict([{"seeds": [8, 9], "sampler": "ddim", "steps": 3, "class_label": 3}])
    np.testing.assert_array_equal(out, images[1:3])


def test_resolve_local_paths_and_errors(checkpoint_dir, home, mlflow_server, tmp_path):
    from pipelines import registry

    assert registry.resolve_model(str(checkpoint_dir)).path == checkpoint_dir
    # a training checkpoint holds the model folder one level down
    training = tmp_path / "checkpoint_000000000100"
    (training / "model").mkdir(parents=True)
    for f in checkpoint_dir.iterdir():
        (training / "model" / f.name).write_bytes(f.read_bytes())
    assert registry.resolve_model(str(training)).path == training / "model"

    with pytest.raises(UserError, match="no such checkpoint folder"):
        registry.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no ddpm checkpoint"):
        registry.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        registry.resolve_model("models:/just-a-name", tracking_uri=mlflow_server.uri)
    with pytest.raises(UserError, match="models:/no-such-model@production"):
        registry.resolve_model("models:/no-such-model@production", tracking_uri=mlflow_server.uri)


def test_promote_unknown_version_is_one_line(mlflow_server, capsys):
    code = cli.main(["models", "promote", "no-such-model", "3", "--alias", "staging",
                     "--tracking-uri", mlflow_server.uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("ddpm models: error: cannot promote no-such-model")


def test_generate_from_the_embedded_store(checkpoint_dir, tmp_path):
    """No MLFLOW_TRACKING_URI: register into .ddpm/ and generate from it in a fresh process (the quickstart path)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DDPM_HOME": str(tmp_path / "home")}
    script = (f"from pipelines import registry, tracking; uri = tracking.tracking_uri(); "
              f"run = tracking.client(uri).create_run(tracking.ensure_experiment('quick', uri)); "
              f"v = registry.register(registry.log_model({str(checkpoint_dir)!r}, run_id=run.info.run_id, "
              f"tracking_uri=uri), 'quick', tags={{}}, tracking_uri=uri); registry.promote('quick', v, 'production')")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    out = tmp_path / "x.npz"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", "models:/quick@production",
                    "--num-images", "2", "--steps", "2", "--out", str(out)], check=True, env=env, cwd=tmp_path)
    assert np.load(out)["images"].shape == (2, 8, 8, 1)
    assert (tmp_path / "home" / "mlflow.db").is_file() and (tmp_path / "home" / "mlartifacts").is_dir()


def test_the_pyfunc_example_in_the_docs_runs_as_written(checkpoint_dir, tmp_path):
    """docs/training.md's pyfunc block, run by bash from a checkout whose embedded store holds digits@production."""
    # A fresh shell: none of the tracking or registry URIs that earlier tests left in this process's environment
    # (mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI, which would send the block to a test's server).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "DDPM_HOME"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is this environment's
    script = (f"from pipelines import registry, tracking; uri = tracking.tracking_uri(); "
              f"run = tracking.client(uri).create_run(tracking.ensure_experiment('docs', uri)); "
              f"v = registry.register(registry.log_model({str(checkpoint_dir)!r}, run_id=run.info.run_id, "
              f"tracking_uri=uri), 'digits', tags={{}}, tracking_uri=uri); registry.promote('digits', v, 'production')")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    block = doc.split("<!-- doc-check: pyfunc", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    done = subprocess.run(["bash", "-c", block], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(3, 8, 8, 1) uint8"  # the tiny test model: 8x8 grey


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_run_folder_resolves_to_its_latest_checkpoint_and_says_which(checkpoint_dir, tmp_path):
    """Ray Train keeps checkpoint_<images seen> folders; a run resolves to the largest, printed with its hash."""
    import hashlib

    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint
    from pipelines import registry

    run = tmp_path / "runs" / "lat1"
    _copy(checkpoint_dir, run / "checkpoint_000000000128" / "model")
    torch.manual_seed(1)  # other weights, so the hash tells the two apart
    latest = checkpoint.save(run / "checkpoint_000000000256" / "model", UNet(UNetConfig.preset("tiny", num_classes=10)),
                             NoiseSchedule.linear(100), class_names=list("0123456789"))
    said = []
    assert registry.resolve_model(str(run), say=said.append).path == latest
    digest = hashlib.sha256((latest / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert said == [f"using {latest} (weights sha256 {digest})"]
    # the same rule for an autoencoder's run: a latent DDPM's checkpoints carry one each
    from ddpm import autoencoder
    from ddpm.autoencoder import Autoencoder, AutoencoderConfig

    ae_run = tmp_path / "runs-ae" / "ae1"
    for images in (128, 256):
        autoencoder.save(ae_run / f"checkpoint_{images:012d}" / "model", Autoencoder(AutoencoderConfig.preset("tiny")))
    resolved = registry.resolve_autoencoder(str(ae_run), say=said.append)
    assert resolved.path == ae_run / "checkpoint_000000000256" / "model"

    # a folder of runs is refused in one line, not resolved to whichever sorts first
    _copy(checkpoint_dir, tmp_path / "runs" / "lat0" / "checkpoint_000000000512" / "model")
    with pytest.raises(UserError, match=r"holds several training runs .*lat0.*lat1.*; name one of them"):
        registry.resolve_model(str(tmp_path / "runs"))


def test_cache_refuses_names_that_leave_it(home, mlflow_server):
    from pipelines import registry
    from pipelines.registry import cache

    for uri in ("models:/../x/1", "models:/a/../../b/1", "models:/..@production", "models:/a\\b/2"):
        with pytest.raises(UserError, match="may not hold"):
            registry.resolve_model(uri, tracking_uri=mlflow_server.uri)
    assert not (home / "models").exists() and not (home.parent / "x").exists()
    # characters a folder name must not hold are encoded; the folder stays inside the cache
    odd = cache.folder(mlflow_server.uri, "a:b*c?", "3")
    assert odd.parent.name == "a%3Ab%2Ac%3F" and odd.is_relative_to(home / "models")


def test_cache_evicts_least_recently_used_versions_but_never_the_one_in_use(tmp_path):
    import os
    import time

    from pipelines.registry import cache

    root = tmp_path / "models"
    now = time.time()
    versions = []
    for i, name in enumerate(["old", "middle", "new"]):
        version = root / "server" / name / "1"
        version.mkdir(parents=True)
        (version / "model.safetensors").write_bytes(b"x" * 1000)
        (version / cache.USED).touch()
        os.utime(version / cache.USED, (now - 100 + i, now - 100 + i))  # old < middle < new
        versions.append(version)
    old, middle, new = versions
    # 3,000 bytes against a limit of 1,500: the two least recently used go, oldest first
    assert cache.evict(1500, keep=new, under=root) == [old, middle]
    assert new.is_dir() and not old.exists() and not middle.exists()
    # the one in use stays even when it alone is over the limit
    assert cache.evict(10, keep=new, under=root) == [] and new.is_dir()
    assert [p.name for p in (root / "server").iterdir()] == ["new"]  # no leftovers of the renamed folders


def test_the_cache_limit_comes_from_the_environment(monkeypatch):
    from pipelines.registry import cache

    monkeypatch.setenv(cache.LIMIT_ENV, "0.5")
    assert cache.limit_bytes() == 2**29
    monkeypatch.delenv(cache.LIMIT_ENV)
    assert cache.limit_bytes() == int(cache.DEFAULT_LIMIT_GB * 2**30)
    for bad in ("lots", "-1", "0"):
        monkeypatch.setenv(cache.LIMIT_ENV, bad)
        with pytest.raises(UserError, match=cache.LIMIT_ENV):
            cache.limit_bytes()


def test_an_autoencoder_version_is_logged_quietly_and_takes_an_alias(home, mlflow_server, tmp_path):
    """As ``ddpm train-autoencoder --register-as`` logs it (in a fresh process: MLflow's warnings reach stderr), then
    ``ddpm models promote photos-ae 1 --alias production`` and ``ddpm encode --autoencoder models:/...@production``'s
    resolution; no DDPM canary is recorded for it."""
    from ddpm import autoencoder
    from ddpm.autoencoder import Autoencoder, AutoencoderConfig
    from pipelines import registry, tracking

    folder = autoencoder.save(tmp_path / "ae", Autoencoder(AutoencoderConfig.preset("tiny")))
    uri, name = mlflow_server.uri, f"ae-{uuid.uuid4().hex[:6]}"
    script = (f"from pipelines import registry, tracking; uri = {uri!r}; "
              f"run = tracking.client(uri).create_run(tracking.ensure_experiment('test-registry', uri)); "
              f"print(registry.register(registry.log_autoencoder({str(folder)!r}, run_id=run.info.run_id, "
              f"tracking_uri=uri), {name!r}, tags={{}}, tracking_uri=uri))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DDPM_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to infer model signature" not in done.stderr, done.stderr  # MLflow's warnings, both ways
    assert "An input example was not provided" not in done.stderr, done.stderr
    version = done.stdout.strip().splitlines()[-1]

    assert cli.main(["models", "promote", name, version, "--alias", "production", "--tracking-uri", uri]) == 0
    resolved = registry.resolve_autoencoder(f"models:/{name}@production", tracking_uri=uri)
    assert (resolved.version, autoencoder.load(resolved.path).config) == (version, autoencoder.load(folder).config)
    assert registry.version_kind(name, version, uri) == "autoencoder"
    assert not any(k.startswith("canary.") for k in tracking.client(uri).get_model_version(name, version).tags)
