"""The quickstart end to end with a 30-second training budget: data -> ingest -> train (2 workers) -> evaluate ->
register -> promote -> Serve -> POST /generate -> quickstart-samples.png, in a subprocess like `make quickstart`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from tests.support import free_port
from pipelines.config import load_config
from pipelines.commands.quickstart import RAY_PORT


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def stop_kept_cluster(port: int) -> None:
    """Kill the ``ray start`` cluster whose GCS listens on ``port``, and only it (``ray stop`` would also take down
    the other Ray instances of this test session): its session's processes and everything they started."""
    gcs = [p for p in psutil.process_iter() if f"--gcs_server_port={port}" in _cmdline(p)]
    if not gcs:
        return
    session = re.search(r"--session-name=(\S+)", _cmdline(gcs[0])).group(1)
    members = [p for p in psutil.process_iter() if session in _cmdline(p)]
    for process in members + [c for p in members for c in p.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def kept_cluster():
    if any(f"--gcs_server_port={RAY_PORT}" in _cmdline(p) for p in psutil.process_iter()):
        pytest.fail(f"a Ray cluster already listens on {RAY_PORT}; stop it (`ray stop`) before running this test")
    yield
    stop_kept_cluster(RAY_PORT)


# What Ray, Ray Data, Ray Train and PyTorch printed before the quickstart kept them to their log files.
RAY_NOISE = ("(RayTrainWorker", "(TrainController", "(SplitCoordinator", "(PlacementGroupCleaner", "(raylet)",
             "Starting execution of Dataset", "Execution plan of Dataset", "Reporting training result",
             "RayDeprecationWarning", "Failed to query Ray Train Controller", "Grad strides do not match",
             "Token authentication is enabled", " INFO ", "WARNING ", "core_worker.cc",
             "Failed to infer model signature")


STEPS = 10


def test_quickstart_end_to_end(tmp_path, kept_cluster):
    """As `make quickstart` runs it on a fresh machine, twice: `ray start` keeps the cluster (and Serve) after the
    command, with a home folder that holds no Ray token yet (Ray's token authentication must still let our clients
    in); the second run reuses the cluster, replaces the first run's endpoint and completes.

    The first run's bar is set out of reach (FD-cls within 0.01x of its floor): its version is registered, not
    promoted, and served by number with a warning. The second run has no bar: the first promoted version."""
    workdir, samples = tmp_path / "home", tmp_path / "samples.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH"))}
    env["DDPM_HOME"] = str(workdir)
    env["HOME"] = str(tmp_path / "user")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    # DDIM-10 instead of the preset's 50 for the gate's samples and the grid: they were 60% of a run's time
    command = [sys.executable, "-m", "pipelines.cli", "quickstart", "--eval-samples", "100", "--workdir", str(workdir),
               "--samples", str(samples), "--port", str(port := free_port()), "--set", f"pipeline.eval_steps={STEPS}"]
    minutes = 0.5  # the training budget; its check below allows the same 2 minutes of slack as at 1 minute
    # A log every 5 steps: a half minute on a slow CPU (AVX2 only, or a busy one) may not reach the preset's 20.
    done = subprocess.run([*command, "--minutes", str(minutes), "--set", "pipeline.gate_max_ratio=0.01",
                           "--set", "train.log_every_steps=5"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = (done.stdout + done.stderr).splitlines()
    assert len(printed) < 60, "\n".join(printed)
    assert not [line for line in printed if any(noise in line for noise in RAY_NOISE)], "\n".join(printed)
    assert "ports listen on 127.0.0.1 only; token authentication on" in done.stdout  # measured, not claimed
    assert any(line.startswith("[train] ") and "img/s" in line and "left" in line for line in printed)
    assert (tmp_path / "user" / ".ray" / "auth_token").stat().st_mode & 0o077 == 0  # the token is the user's alone
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200  # Serve outlived it
    assert "ray stop" in done.stdout
    out = done.stdout
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in out  # every stage reports progress
    assert "digits version 1 (not promoted: below the bar: fd_cls" in out and "(at most 0.01x)" in out
    [warning] = [line for line in printed if "warning:" in line and "was not promoted" in line]
    assert warning.strip().startswith("warning: digits version 1 was not promoted (below the bar: fd_cls")
    assert warning.endswith("and no version holds production: serving it by version number")
    assert "[4/6] serving models:/digits/1 with Ray Serve" in out
    assert "MLflow UI" in out and "--backend-store-uri sqlite:///" in out

    grid = np.asarray(Image.open(samples))
    assert grid.shape == (10 * 17 + 1, 10 * 17 + 1)  # a row of ten 16x16 digits per class, 1-pixel gutters
    assert grid.std() > 20  # images, not a blank canvas

    # The registry holds the version, with the gate's reason, and no production alias.
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("digits", "1")
    assert (version.tags["gate.decision"], version.tags["gate.bar"], version.tags["gate.max_ratio"]) == (
        "keep", "failed", "0.01")
    assert "production" not in client.get_registered_model("digits").aliases
    # The gate scored it with the pipeline's evaluation settings (the preset's, the step count as set), guidance
    # included.
    preset = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")
    scored = json.loads(version.tags["gate.settings"])["settings"]
    assert (scored["guidance_scale"], scored["steps"], scored["num_samples"]) == (
        preset.pipeline.eval_guidance_scale, STEPS, 100)
    assert client.get_run(version.run_id).data.tags["eval.guidance_scale"] == str(preset.pipeline.eval_guidance_scale)

    # Training ran for its half minute (train.max_minutes), not to the preset's image count, and the learning rate's
    # cosine reached about 0 with the time.
    final = max((workdir / "runs").glob("digits-*/checkpoint_[0-9]*"))  # the most images
    state = json.loads((final / "training_state.json").read_text())
    assert minutes * 60 <= state["train_seconds"] < minutes * 60 + 120
    assert 0 < state["images_seen"] < preset.train.total_images
    lrs = [m.value for m in sorted(client.get_metric_history(version.run_id, "lr"), key=lambda m: m.step)]
    assert lrs[-1] < 0.02 * preset.train.lr < max(lrs)

    # Again, on the cluster and endpoint the first run left: its Sampler's CPU is given back before training.
    again = subprocess.run([*command, "--minutes", "0.2", "--set", "pipeline.gate_max_ratio=null", "--set",
                            "pipeline.gate_min_recall=null"], env=env, capture_output=True, text=True, timeout=900,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the local cluster the previous quickstart left" in again.stdout
    assert "stopped the previous quickstart's endpoint" in again.stdout
    assert "digits version 2 (promoted to production: no incumbent" in again.stdout
    assert "[4/6] serving models:/digits@production with Ray Serve" in again.stdout
    assert "was not promoted" not in again.stdout  # (the 100-sample evaluation's small-n warning is there, rightly)
    promoted = client.get_model_version_by_alias("digits", "production")
    assert str(promoted.version) == "2" and promoted.tags["gate.decision"] == "promote"
    assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
