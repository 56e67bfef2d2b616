"""Operating the endpoint, over real HTTP against one Serve application: ``GET /metrics`` after a burst (the counters
against the requests sent, parsed by prometheus_client and linted by promtool when Debian's prometheus package is
installed), the scrape config in deploy/monitoring/, and the canary that guards every model switch.

One application, ``/ops``: a tiny conditional model registered in a real MLflow server as ``ops-test``, followed
through ``models:/ops-test@production`` (alias poll every 0.5 s), behind an API key. Versions:

- 1 and 2: honest (their canary references come from their own weights, recorded by ``registry.promote``);
- 3: planted: registered with weights of seed 3, but its canary reference was recorded from version 2's weights,
  as if the artifact had been swapped after the evaluation. It must never serve.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from ddpm import checkpoint
from tests.deploy.test_serve import save_tiny
from tests.reliability.support import wait_for
from tests.support import free_port, start_local_ray, wait_http

MODEL = "ops-test"
API_KEY = "ops-key-51c2"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT = 60
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):
    from pipelines import registry, tracking

    root = tmp_path_factory.mktemp("ops-models")
    uri = mlflow_server.uri
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment("ops-test", uri)
    folders, versions = {}, []
    for seed in (1, 2, 3):
        folders[seed] = save_tiny(root / f"v{seed}", seed, num_classes=3)
        run_id = client.create_run(experiment).info.run_id
        logged = registry.log_model(folders[seed], run_id=run_id, tracking_uri=uri)
        versions.append(registry.register(logged, MODEL, tags={"weights_seed": str(seed)}, tracking_uri=uri))
    # The plant: version 3's reference made from the weights that were "evaluated" (version 2's), not its own.
    registry.record_canary(MODEL, versions[2], checkpoint.load(folders[2], weights="ema"), tracking_uri=uri)
    registry.promote(MODEL, versions[0], "production", uri)
    yield uri, versions
    cached = registry.resolve_model(f"models:/{MODEL}/{versions[0]}", tracking_uri=uri).path
    models_root = tracking.home() / "models"
    shutil.rmtree(models_root / cached.relative_to(models_root).parts[0], ignore_errors=True)


@pytest.fixture(scope="module")
def server(registry):
    from ray import serve

    from deploy.serve_app import build_app

    tracking_uri, _ = registry
    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_uri": f"models:/{MODEL}@production", "tracking_uri": tracking_uri,
                         "poll_interval_s": 0.5, "num_cpus": 0.25, "batch_wait_timeout_s": 0.05,
                         "api_key": API_KEY}), name="ops", route_prefix="/ops")
    base = f"http://127.0.0.1:{port}/ops"
    wait_http(f"{base}/healthz")
    yield base
    serve.shutdown()  # the next module starts Serve on its own port


def scrape(base: str) -> dict:
    """``{(name, frozenset(labels.items())): value}`` of every sample GET /metrics serves, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(f"{base}/metrics", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    """The sample's value (0 when absent); labels not given match anything, and matching samples are summed."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_metrics_need_the_api_key(server):
    assert requests.get(f"{server}/metrics", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{server}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{server}/metrics", headers=AUTH, timeout=TIMEOUT).status_code == 200


def test_counters_match_a_burst_of_requests(server, registry):
    """A burst of 16 concurrent requests of known outcome: every counter moves by exactly what was sent."""
    _, (v1, _, _) = registry
    before = scrape(server)
    ok = [{"num_images": 2, "steps": 3, "seed": i} for i in range(10)]
    guided = [{"num_images": 1, "steps": 3, "seed": 100 + i, "class_label": 1, "guidance_scale": 2.0}
              for i in range(3)]
    bad = [{"steps": 0}, {"num_images": 65}]  # 422s, refused before any sampling

    def post(body):
        return requests.post(f"{server}/generate", json=body, headers=AUTH, timeout=TIMEOUT).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(post, ok + guided + bad))
    assert statuses == [200] * 13 + [422] * 2
    assert requests.get(f"{server}/no-such-route", headers=AUTH, timeout=TIMEOUT).status_code == 404
    assert requests.post(f"{server}/generate", json={}, timeout=TIMEOUT).status_code == 401  # counted too
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ddpm_requests_total", route="/generate", status="200") == 13
    assert delta("ddpm_requests_total", route="/generate", status="422") == 2
    assert delta("ddpm_requests_total", route="/generate", status="401") == 1
    assert delta("ddpm_requests_total", route="other", status="404") == 1  # unknown paths share one label value
    assert delta("ddpm_request_duration_seconds_count", route="/generate") == 16
    assert delta("ddpm_request_duration_seconds_bucket", route="/generate", le="+Inf") == 16
    assert delta("ddpm_queue_duration_seconds_count") == 13
    images = 10 * 2 + 3 * 1
    assert delta("ddpm_images_generated_total", model=MODEL, version=v1) == images
    assert delta("ddpm_model_calls_total", model=MODEL, version=v1) == 10 * 2 * 3 + 3 * 1 * 3 * 2  # guidance: x2
    # The Sampler replica's own counters: every image of the burst went through one of its batches.
    assert delta("ddpm_batch_images_sum") == images
    assert delta("ddpm_batch_requests_sum") == 13
    assert 1 <= delta("ddpm_batch_images_count") <= 13
    assert value(after, "ddpm_sampler_inflight_requests") == 0
    assert value(after, "ddpm_ingress_inflight_requests") == 1  # the scrape itself
    assert value(after, "ddpm_model_info", model=MODEL, version=v1, alias="production") == 1


def test_ddpm_status_reads_the_endpoint(server, registry):
    """``ddpm status``'s endpoint section: health, the version served and its canary, with the API key."""
    from pipelines.commands.status import endpoint

    _, (v1, _, _) = registry
    assert endpoint(server, None)["detail"] == "/v1/model needs the API key: set DDPM_API_KEY"
    seen = endpoint(server, API_KEY)
    assert seen["healthy"] and (seen["name"], seen["version"], seen["alias"]) == (MODEL, v1, "production")
    assert seen["canary"]["status"] == "passed" and seen["canary_refused"] is None


def test_promtool_accepts_the_metrics_and_the_scrape_config(server, tmp_path):
    """``promtool`` (Debian's prometheus package) lints the exposition and checks deploy/monitoring/prometheus.yml."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    text = requests.get(f"{server}/metrics", headers=AUTH, timeout=TIMEOUT).text
    linted = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr

    config = tmp_path / "prometheus.yml"
    shutil.copy(ROOT / "deploy" / "monitoring" / "prometheus.yml", config)
    (tmp_path / "ddpm_api_key").write_text(API_KEY)  # the config's credentials_file, relative to the config
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_scrape_config_targets_metrics_with_the_api_key():
    config = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "ddpm-endpoint"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and "credentials_file" in job["authorization"]


def model_info(server: str) -> dict:
    return requests.get(f"{server}/v1/model", headers=AUTH, timeout=TIMEOUT).json()


def test_a_planted_version_never_serves(server, registry):
    """Version 2 (honest) takes over once its canary passes; version 3, whose weights are not those its reference
    was made from, is refused: the replica keeps serving version 2, and says so in /v1/model and /metrics."""
    from pipelines.registry import CANARY_TOLERANCE, promote

    tracking_uri, (v1, v2, v3) = registry
    info = model_info(server)
    assert info["version"] == v1 and info["canary"]["status"] == "passed" and info["canary"]["score"] == 0

    promote(MODEL, v2, "production", tracking_uri)
    assert wait_for(lambda: model_info(server)["version"] == v2, timeout=60, interval=0.5,
                    what="the honest version 2 taking over"), "the honest version 2 never took over"
    assert model_info(server)["canary"] == {"status": "passed", "score": 0.0, "tolerance": CANARY_TOLERANCE,
                                            "detail": "", "name": MODEL, "version": v2}

    promote(MODEL, v3, "production", tracking_uri)
    refused = wait_for(lambda: model_info(server)["canary_refused"], timeout=60, interval=0.5,
                       what="the canary's refusal of version 3")
    assert refused and refused["version"] == v3 and refused["status"] == "refused"
    assert refused["score"] > CANARY_TOLERANCE
    info = model_info(server)
    assert info["version"] == v2 and "canary refused" in info["load_error"]
    time.sleep(2)  # several more polls: still not retried, still version 2
    r = requests.post(f"{server}/generate", json={"num_images": 1, "steps": 2}, headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["X-Model-Version"] == v2

    samples = scrape(server)
    assert value(samples, "ddpm_model_swaps_refused_total", reason="canary") == 1  # once, not once per poll
    assert value(samples, "ddpm_model_info", version=v2) == 1 and value(samples, "ddpm_model_info", version=v3) == 0
    assert value(samples, "ddpm_canary_score", version=v3, status="refused") > CANARY_TOLERANCE

    promote(MODEL, v2, "production", tracking_uri)  # the operator's rollback: the alias back where it serves
