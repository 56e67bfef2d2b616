"""The quickstart end to end with a one-minute training budget: data -> ingest -> train (2 workers) -> evaluate ->
register -> promote -> Serve -> POST /generate -> quickstart-samples.png, in a subprocess like `make quickstart`."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import free_port


def test_quickstart_end_to_end(tmp_path):
    workdir, samples = tmp_path / "home", tmp_path / "samples.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "RAY_ADDRESS"))}
    env["DDPM_HOME"] = str(workdir)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "quickstart", "--minutes", "1", "--eval-samples", "100", "--stop-when-done",
         "--workdir", str(workdir), "--samples", str(samples), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in out  # every stage reports progress
    assert "digits version 1" in out and "promoted to production" in out  # first version: no incumbent
    assert "MLflow UI" in out and "--backend-store-uri sqlite:///" in out

    grid = np.asarray(Image.open(samples))
    assert grid.shape == (10 * 17 + 1, 10 * 17 + 1)  # a row of ten 16x16 digits per class, 1-pixel gutters
    assert grid.std() > 20  # images, not a blank canvas

    # The registry really holds the promoted model.
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("digits", "production")
    assert str(version.version) == "1" and version.tags.get("gate.decision") == "promote"
