"""``ddpm status`` against real components: a Ray it joins (the session's local Ray, as a second driver in a
subprocess), a real MLflow server holding a training run and a promoted model, and an endpoint that is not there.
The endpoint section against a live Serve application is in tests/deploy/test_operations.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipelines.commands.status import render, training_runs
from tests.support import free_port

pytestmark = pytest.mark.slow


def test_status_reports_ray_runs_models_and_a_missing_endpoint(mlflow_server, ray_local, tmp_path):
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint
    from pipelines import registry, tracking
    from pipelines.evaluate.gate import decide_promotion, record_decision
    from pipelines.ray_utils import auth_mode

    torch.manual_seed(0)
    checkpoint_dir = checkpoint.save(tmp_path / "checkpoint", UNet(UNetConfig.preset("tiny", num_classes=10)),
                                     NoiseSchedule.linear(100), class_names=list("0123456789"))

    uri = mlflow_server.uri
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment("status-test", uri)
    run = client.create_run(experiment, run_name="status-run")
    client.log_param(run.info.run_id, "train.total_images", "1000")
    for step, (seen, loss) in enumerate([(256, 0.5), (512, 0.25)]):
        client.log_metric(run.info.run_id, "images_seen", seen, step=step)
        client.log_metric(run.info.run_id, "loss", loss, step=step)
        client.log_metric(run.info.run_id, "images_per_sec", 400.0, step=step)
    logged = registry.log_model(checkpoint_dir, run_id=run.info.run_id, tracking_uri=uri)
    version = registry.register(logged, "status-model", tags={"images_seen": "512"}, tracking_uri=uri)
    registry.promote("status-model", version, "production", uri)
    # A first version the gate kept out of production for its absolute bar, with the tags the gate writes.
    kept = registry.register(logged, "status-kept", tags={}, tracking_uri=uri)
    blobs = {"fd_cls": 4771.0, "fd_cls_ratio": 248.5, "recall": 0.004}
    decision = decide_promotion(blobs, None, max_ratio=30.0, min_recall=0.2)
    record_decision(client, "status-kept", kept, decision, "fd_cls", "production", None, {}, 30.0, 0.2)

    gcs = ray_local.get_runtime_context().gcs_address
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": gcs}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", "--json", "--tracking-uri", uri,
                           "--endpoint", nowhere], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)

    ray = report["ray"]
    assert ray["running"] and ray["address"] == gcs and ray["nodes"] == 1 and ray["cpus"]["total"] == 2
    assert ray["token_authentication"] == auth_mode() != "unknown"  # what the cluster this test joined runs with
    assert ray["serve"] is None  # no Serve on the session's Ray
    [listed] = [r for r in report["training"]["runs"] if r["name"] == "status-run"]
    assert (listed["images_seen"], listed["total_images"], listed["loss"]) == (512, 1000, 0.25)
    [model] = [m for m in report["models"]["models"] if m["name"] == "status-model"]
    assert model["production"] == version and model["canary_reference"] is True
    [out] = [m for m in report["models"]["models"] if m["name"] == "status-kept"]
    assert out["production"] is None and out["latest_gate"]["bar"] == "failed"
    assert report["endpoint"] == {"url": nowhere, "healthy": False, "detail": "not answering (ConnectionError)"}

    screen = render(report)
    assert "status-run" in screen and "512/1,000 images (51%)" in screen
    assert f"production -> version {version}" in screen and "canary reference recorded" in screen
    assert (f"status-kept          latest version {kept}, no production version: not promoted, below the bar: "
            f"fd_cls 4771 is 248x its floor (at most 30x)") in screen
    assert f"Endpoint  {nowhere}: not answering" in screen
    assert len(screen.splitlines()) <= 25  # one screen


def test_status_finds_a_serve_on_another_port_through_the_ray_it_recorded(ray_local, tmp_path):
    """No RAY_ADDRESS and no --endpoint: the Ray comes from the record in DDPM_HOME, the endpoint from that Ray's
    Serve controller, on whatever port Serve was started (not the default 8000)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Probe:
        @api.get("/healthz")
        def healthz(self):
            return "ok"

        @api.get("/v1/model")
        def model(self):
            return {"name": "probe", "version": "7", "alias": None, "device": "cpu"}

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(Probe.bind(), name="probe", route_prefix="/")
        home = tmp_path / "home"
        home.mkdir()
        gcs = ray_local.get_runtime_context().gcs_address
        (home / "endpoint.json").write_text(json.dumps({"ray_address": gcs}))  # as a quickstart records it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"DDPM_HOME": str(home)}
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "status", "--json", "--runs", "0",
                               "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"],
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        serve.shutdown()
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    url = f"http://127.0.0.1:{port}"
    assert (report["ray"]["address"], report["ray"]["serve"]) == (gcs, url)
    assert report["endpoint"] == {"url": url, "healthy": True, "name": "probe", "version": "7", "alias": None,
                                  "device": "cpu", "canary": None, "canary_refused": None, "load_error": None}
    assert f"Serve at {url}" in render(report)


def test_status_without_a_store_says_so(tmp_path):
    assert training_runs(f"sqlite:///{tmp_path / 'none.db'}", 5)["detail"] == "no tracking store yet"
