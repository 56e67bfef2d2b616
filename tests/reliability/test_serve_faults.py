"""Serving faults: a Sampler replica SIGKILLed under load, and a corrupt model pushed through a hot reload.

One application (``/faults``: a tiny 8x8 checkpoint, one Sampler replica) deployed through a Serve config, as
``serve deploy`` does, so that a changed ``user_config`` reaches the live replica in place. Each test says what was
injected, what survived and what was lost; the numbers it measures are printed (``pytest -s``) and recorded as
user properties of the test in the JUnit XML.

Bounds stated and asserted here (measured on the shared 2-core machine: no failed request, 6 to 8 s to recover):

- replica killed: at most ``CONCURRENCY`` failed requests (those in flight when it died; the ingress retries each once,
  so normally none fail), every failure a 5xx (never a dropped connection), ``RECOVERY_BOUND_S`` from SIGKILL to the
  first answer to a request sent after it, and every request sent after that answered 200.
- corrupt reload: refused with the loader's message in ``GET /v1/model``'s ``load_error``, the same replica process
  keeps serving version 1 byte for byte, and a good version deployed afterwards is swapped in.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import signal
import threading
import time

import pytest
import requests

from .serving import app_config, deploy, replica_pids, running_replicas, save_tiny, start_serve, wait_for

APP = "faults"
REQUESTS, CONCURRENCY, KILL_AFTER = 60, 8, 15  # the load: 60 requests from 8 clients; SIGKILL after 15 answers
LOAD_TIME_LIMIT_S = 120
RECOVERY_BOUND_S = 30.0
BODY = {"num_images": 1, "sampler": "ddim", "steps": 8}
TIMEOUT = 60  # seconds, any single HTTP call


def sampler_config(model_uri: str) -> dict:
    """The Sampler's whole ``user_config`` (deploy.schemas.SamplerConfig), as a Serve config would give it."""
    return {"model_uri": model_uri, "batch_wait_timeout_s": 0.01, "micro_batch": 16}


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """Serve with ``/faults`` on version 1; yields (base URL, redeploy(model_uri), folder of checkpoints)."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve-faults")
    v1 = save_tiny(root / "v1", seed=1)
    port = start_serve()
    args = {"model_uri": str(v1), "num_cpus": 0.25, "max_cost": 5000, "min_replicas": 1, "max_replicas": 1}

    def redeploy(model_uri: str) -> None:
        """The hot reload: the same application with only the Sampler's user_config changed."""
        sampler = {"name": "Sampler", "user_config": sampler_config(model_uri)}
        deploy(port, [app_config(APP, args, deployments=[sampler])])

    redeploy(str(v1))
    yield f"http://127.0.0.1:{port}/{APP}", redeploy, root
    serve.shutdown()


def test_sampler_replica_killed_under_load_recovers_in_seconds(faults, record_property):
    """Injected: SIGKILL of the only Sampler replica's process, with 8 requests in flight.
    Survived: the endpoint (a new replica within seconds), every request sent after the recovery.
    Lost: at most the requests in flight (retried once by the ingress: normally none)."""
    base, _, _ = faults
    (pid,) = replica_pids(APP, "Sampler")
    lock = threading.Lock()
    queue = iter(range(REQUESTS))
    results: list[tuple[float, float, int | str]] = []  # (sent, answered, status or exception), monotonic seconds
    killed_at: list[float] = []
    deadline = time.monotonic() + LOAD_TIME_LIMIT_S

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                seed = next(queue, None)
            if seed is None:
                return
            sent = time.monotonic()
            try:
                r = session.post(f"{base}/generate", json=BODY | {"seed": seed}, timeout=TIMEOUT)
                status: int | str = r.status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            with lock:
                results.append((sent, time.monotonic(), status))
                if len(results) == KILL_AFTER:
                    killed_at.append(time.monotonic())
                    os.kill(pid, signal.SIGKILL)

    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        for future in [pool.submit(client) for _ in range(CONCURRENCY)]:
            future.result()

    assert killed_at, "the load ended before the kill"
    kill = killed_at[0]
    assert len(results) == REQUESTS, f"only {len(results)} of {REQUESTS} requests in {LOAD_TIME_LIMIT_S} s"
    failed = [(round(sent - kill, 2), status) for sent, _, status in results if status != 200]
    after_kill = sorted((sent, answered, status) for sent, answered, status in results if sent >= kill)
    assert after_kill, "no request was sent after the kill"
    recovered_at = min((answered for _, answered, status in after_kill if status == 200), default=None)
    assert recovered_at is not None, f"no request sent after the kill succeeded: {after_kill}"
    recovery_s = recovered_at - kill
    in_flight = sum(1 for sent, answered, _ in results if sent < kill < answered)
    print(f"\nreplica killed: {in_flight} requests in flight, {len(failed)} of {REQUESTS} failed {failed}, "
          f"recovered {recovery_s:.1f} s after SIGKILL")
    record_property("failed_requests", len(failed))
    record_property("recovery_s", round(recovery_s, 2))

    assert len(failed) <= CONCURRENCY, failed
    assert all(isinstance(status, int) and status >= 500 for _, status in failed), f"not a 5xx: {failed}"
    assert recovery_s < RECOVERY_BOUND_S
    late = [(round(sent - kill, 2), status) for sent, _, status in results if sent >= recovered_at and status != 200]
    assert not late, f"requests sent after the recovery failed: {late}"

    # A new process serves now; the old one is gone.
    assert running_replicas(APP, "Sampler") == 1
    (new_pid,) = replica_pids(APP, "Sampler")
    assert new_pid != pid
    for seed in range(3):
        assert requests.post(f"{base}/generate", json=BODY | {"seed": seed}, timeout=TIMEOUT).status_code == 200


def _image(base: str) -> bytes:
    r = requests.post(f"{base}/generate", json={"num_images": 2, "steps": 4, "seed": 7}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.content


def _model_info(base: str) -> dict:
    return requests.get(f"{base}/v1/model", timeout=TIMEOUT).json()


def test_corrupt_model_in_a_hot_reload_is_refused_and_the_old_one_keeps_serving(faults, record_property):
    """Injected: a user_config pointing at a truncated model.safetensors, then at a config.json whose shapes do not
    match the weights. Survived: the live replica (same process) and version 1, byte for byte.
    Lost: nothing; a good version deployed afterwards is swapped in."""
    base, redeploy, root = faults
    redeploy(str(root / "v1"))
    v1_image = _image(base)
    (pid,) = replica_pids(APP, "Sampler")

    truncated = shutil.copytree(root / "v1", root / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    wrong_shape = shutil.copytree(root / "v1", root / "wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["unet"]["base_channels"] *= 2
    (wrong_shape / "config.json").write_text(json.dumps(config))

    for bad, complaint in [(truncated, "truncated"), (wrong_shape, "do not match")]:
        started = time.monotonic()
        redeploy(str(bad))
        error = wait_for(lambda bad=bad: (_model_info(base)["load_error"] or "").startswith(str(bad)) and
                         _model_info(base)["load_error"], timeout=60, what=f"the refusal of {bad.name}", interval=0.2)
        print(f"\n{bad.name}: refused in {time.monotonic() - started:.1f} s: {error}")
        assert complaint in error
        assert replica_pids(APP, "Sampler") == [pid], "the live replica was replaced"
        assert _image(base) == v1_image, "not version 1 any more"

    # A good version after the refusals: swapped in place, and the refusal cleared.
    v2 = save_tiny(root / "v2", seed=2)
    started = time.monotonic()
    redeploy(str(v2))
    wait_for(lambda: _model_info(base)["load_error"] is None and _image(base) != v1_image, timeout=60,
             what="the swap to version 2", interval=0.2)
    record_property("swap_after_refusal_s", round(time.monotonic() - started, 2))
    assert replica_pids(APP, "Sampler") == [pid]
