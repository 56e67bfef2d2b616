"""``ddpm quickstart``: the whole platform on this machine, with nothing set up beforehand.

1. a local Ray on 127.0.0.1 (``ray start --head``, so Serve outlives this command; or in-process with
   ``--stop-when-done``)
2. scikit-learn's digits written as PNGs to a local folder standing in for the bucket, then Ray Data ingest
3. Ray Train with two workers for a bounded time, tracked in the embedded MLflow (SQLite under ``.ddpm/``)
4. evaluation, registration as ``digits`` and promotion to ``production`` when the gate passes
5. Ray Serve on 127.0.0.1, one ``POST /generate`` per class, the images as ``quickstart-samples.png``

Steps 2-4 are ``ddpm pipeline`` with the ``digits`` preset; a second run reuses the data and trains a new version.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HELP = "run data -> ingest -> train -> evaluate -> register -> serve -> generate on this machine"
EXAMPLE = """example:
  ddpm quickstart                       # 5 minutes of training; Serve keeps running afterwards
  ddpm quickstart --minutes 1 --stop-when-done
"""

RAY_PORT = 6390  # the quickstart's own local cluster, away from Ray's default 6379


def start_ray(keep: bool, log) -> str:
    """The address of a local Ray on 127.0.0.1: a ``ray start`` cluster that outlives us, or one in this process."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return os.environ["RAY_ADDRESS"]
    if not keep:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
        return ray.get_runtime_context().gcs_address
    address = f"127.0.0.1:{RAY_PORT}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"], capture_output=True, text=True)
    if started.returncode == 0:
        log(f"[ray] started a local cluster at {address} (dashboard http://127.0.0.1:8265)")
    else:
        log(f"[ray] reusing the local cluster at {address}")
    ray.init(address=address)
    return address


def ensure_auth_token() -> None:
    """Run the cluster and every client of it (this driver, ``ddpm serve``) with Ray's token authentication on.

    Ray 2.60's ``ray start`` turns token authentication on by itself once ``~/.ray/auth_token`` exists, while its
    clients stay in ``RAY_AUTH_MODE=disabled`` unless told, and are then refused ("InvalidAuthToken"). Saying
    ``token`` for all of them, in this process's environment (which ``ray start`` and ``ddpm serve`` inherit), makes
    both sides agree; a token is generated into ``~/.ray/auth_token`` (mode 600) when none exists. Must run before
    ``ray`` is imported in this process: Ray reads the mode once, at import.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return  # the user chose no authentication
    os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def serve_model(model_uri: str, *, port: int, ray_address: str, tracking_uri: str, log) -> str:
    """Deploy the endpoint with ``ddpm serve`` on the running cluster and wait until it answers; returns its URL.

    ``ddpm serve`` lives in ``deploy/``, which ``pipelines/`` does not import: it runs as its own process, joins the
    cluster through RAY_ADDRESS, deploys, and returns while the application keeps running in the cluster.
    """
    import requests

    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--model", model_uri, "--host", "127.0.0.1",
           "--port", str(port), "--poll-interval-s", "10"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"ddpm serve failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the endpoint at {url} did not become healthy in 120 s")


def generate_grid(url: str, class_names: list[str], per_class: int = 10, steps: int = 50,
                  guidance_scale: float = 1.0):
    """One request per class (or 10 unconditional ones): rows of ``per_class`` images, as an (H, W, C) uint8 grid.

    ``guidance_scale`` applies to the class rows (the server refuses it without a class).
    """
    import numpy as np
    import requests
    from PIL import Image

    from ddpm import make_grid

    labels = list(range(len(class_names))) or [None] * 10
    rows = []
    for row, label in enumerate(labels):
        body = {"num_images": per_class, "sampler": "ddim", "steps": steps, "seed": 1000 * row,
                "class_label": label, "output": "json"}
        if label is not None:
            body["guidance_scale"] = guidance_scale
        response = requests.post(f"{url}/generate", json=body, timeout=300)
        response.raise_for_status()
        for png in response.json()["images"]:
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
            rows.append(image[..., None] if image.ndim == 2 else image)
    return make_grid(np.stack(rows), ncols=per_class)


def quickstart(*, minutes: float, workdir: Path, samples: Path, port: int, keep_serving: bool,
               eval_samples: int = 500, log=print) -> dict:
    if keep_serving and not os.environ.get("RAY_ADDRESS"):
        ensure_auth_token()  # before the first ``import ray``: Ray reads RAY_AUTH_MODE once, at import
    import ray

    from ddpm import encode_png
    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.commands.pipeline import run_pipeline

    t0 = time.monotonic()
    workdir = workdir.resolve()
    os.environ.setdefault("DDPM_HOME", str(workdir))
    uri = tracking.tracking_uri()
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")
    log("[1/6] Ray: local, on 127.0.0.1")
    address = start_ray(keep_serving, log)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = replace(config, train=replace(config.train, max_minutes=minutes), pipeline=replace(
        config.pipeline, raw="digits", raw_output=str(workdir / "data" / "digits-raw"),
        processed=str(workdir / "data" / "digits"), storage=str(workdir / "runs"), run_name=f"digits-{stamp}",
        register_as="digits", num_workers=2, eval_samples=eval_samples))
    log(f"[2/6] training budget: {minutes:g} minutes (train.max_minutes; the learning rate decays over it), "
        f"at most {config.train.total_images:,} images")

    log("[3/6] pipeline: data -> ingest -> train -> evaluate -> register -> gate")
    result = run_pipeline(config, tracking_uri=uri, log=lambda msg: log("      " + msg))

    log("[4/6] serving models:/digits@production with Ray Serve")
    port = free_port(port)
    url = serve_model("models:/digits@production", port=port, ray_address=address, tracking_uri=uri, log=log)

    log(f"[5/6] generating one row per class through POST {url}/generate")
    from pipelines.data.dataset import read_manifest

    class_names = read_manifest(result.processed).get("class_names") or []
    # The images the gate scored: DDIM-50 with the preset's guidance.
    grid = generate_grid(url, class_names, steps=config.pipeline.eval_steps,
                         guidance_scale=config.pipeline.eval_guidance_scale)
    samples.write_bytes(encode_png(grid))

    summary = {
        "model": f"digits version {result.version}", "promoted": result.promoted, "gate": result.gate_reason,
        "metrics": result.metrics, "samples": str(samples), "endpoint": url,
        "seconds": {**{k: round(v) for k, v in result.seconds.items()}, "total": round(time.monotonic() - t0)},
    }
    log("[6/6] done\n")
    log(f"  model      digits version {result.version} "
        f"({'promoted to production' if result.promoted else 'not promoted'}: {result.gate_reason})")
    log(f"  samples    {samples}")
    log(f"  MLflow UI  {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {uri} "
        f"--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000")
    body = json.dumps({"num_images": 16, "sampler": "ddim", "steps": config.pipeline.eval_steps, "seed": 0,
                       "class_label": 3, "guidance_scale": config.pipeline.eval_guidance_scale})
    if keep_serving:
        log(f"  try it     curl -s -X POST {url}/generate -H 'Content-Type: application/json' -d '{body}' "
            f"-o digits.png")
        log(f"  stop       {Path(sys.executable).with_name('ray')} stop    # stops Serve and the local Ray")
    else:
        ray.shutdown()
        log("  Serve and Ray were stopped (--stop-when-done)")
    log(f"  timings    {summary['seconds']}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget [%(default)s]")
    parser.add_argument("--workdir", default=".ddpm", help="data, runs and the MLflow store [%(default)s]")
    parser.add_argument("--samples", default="quickstart-samples.png", help="the grid of generated digits")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (another if taken) [%(default)s]")
    parser.add_argument("--eval-samples", type=int, default=500,
                        help="samples for the evaluation that gates promotion [%(default)s]")
    parser.add_argument("--stop-when-done", action="store_true",
                        help="run Ray in this process and stop Serve at the end (tests, CI)")


def main(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise ValueError("--minutes must be positive")
    quickstart(minutes=args.minutes, workdir=Path(args.workdir), samples=Path(args.samples), port=args.port,
               keep_serving=not args.stop_when_done, eval_samples=args.eval_samples)
    return 0
