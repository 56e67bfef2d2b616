"""``ddpm quickstart``: the whole platform on this machine, with nothing set up beforehand.

1. a local Ray on loopback (``ray start --head`` in Ray's single-machine mode, so that every Ray port listens on
   127.0.0.1 only and Serve outlives this command; or in-process with ``--stop-when-done``). A second run reuses
   that cluster and first removes the previous run's endpoint, which would otherwise hold the CPU training needs.
2. scikit-learn's digits written as PNGs to a local folder standing in for the bucket, then Ray Data ingest
3. Ray Train with two workers for a bounded time, tracked in the embedded MLflow (SQLite under ``.ddpm/``)
4. evaluation, registration as ``digits`` and promotion to ``production`` when the gate passes (the preset's
   absolute bar included: a first version that fails it is registered but not promoted)
5. Ray Serve on 127.0.0.1 (the ``production`` version; without one, the new version by number, with a warning),
   one ``POST /generate`` per class, the images as ``quickstart-samples.png``

Steps 2-4 are ``ddpm pipeline`` with the ``digits`` preset; a second run reuses the data and trains a new version.
``--recipe photos-latent`` runs latent diffusion instead (``configs/photos-latent.yaml``): crops of scikit-image's
colour photographs at 64x64, an autoencoder trained for ``--minutes``, the crops encoded to 16x16x4 latents, the DDPM
trained on them for ``--minutes``, registered as ``photos-latent`` and served as pixels (about 15 minutes in all).
``--recipe shapes-text`` conditions on text (``configs/shapes-text.yaml``): captioned scenes of coloured shapes, a
CLIP trained on their captions for half of ``--minutes``, a text-conditioned DDPM for ``--minutes``, registered as
``shapes-text``; the grid holds one row per held-out composition (a colour-shape pair training never saw), each
asked for in words through ``POST /generate``.
``--recipe shapes-unclip`` is DALL-E 2's two stages on the same data (``configs/shapes-unclip.yaml``): the CLIP for
half of ``--minutes``, a prior on its image embeddings for another half, unCLIP's decoder for ``--minutes``, prior and
decoder registered together as ``shapes-unclip``; the grid is asked for in words as for shapes-text.
Ray's and MLflow's own INFO logging stays in their log files; ``ddpm --verbose quickstart`` shows it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
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
  ddpm quickstart --recipe photos-latent   # latent diffusion on RGB photos: autoencoder, latents, DDPM, Serve
  ddpm quickstart --recipe shapes-text     # prompts: captioned shapes, a CLIP, a text-conditioned DDPM, Serve
  ddpm quickstart --recipe shapes-unclip   # DALL-E 2: captioned shapes, a CLIP, a prior and a decoder, Serve
  ddpm quickstart --set pipeline.gate_max_ratio=3   # a stricter bar for promotion
"""
# --recipe -> its preset in configs/
RECIPES = {"digits": "digits.yaml", "photos-latent": "photos-latent.yaml", "shapes-text": "shapes-text.yaml",
           "shapes-unclip": "shapes-unclip.yaml"}

RAY_PORT = 6390  # the quickstart's own local cluster, away from Ray's default 6379
APP_NAME = "ddpm"  # the Serve application `ddpm serve` deploys
SERVE_TIMEOUT_S = 300  # for `ddpm serve` to deploy, then 120 s for the endpoint to answer


def start_ray(keep: bool, log) -> tuple[str, bool]:
    """``(address, reused)`` of a local Ray: a ``ray start`` cluster that outlives us, or one in this process.

    ``reused``: a cluster the previous quickstart left (``ray start`` finds the port taken) that we joined.
    """
    import ray

    from pipelines.ray_utils import connect_options, init_ray, quiet_ray_logging

    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        return os.environ["RAY_ADDRESS"], False
    if not keep:
        init_ray()
        return ray.get_runtime_context().gcs_address, False
    address = f"127.0.0.1:{RAY_PORT}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"], capture_output=True, text=True)
    quiet_ray_logging()
    try:
        ray.init(address=address, **connect_options())
    except ConnectionError:
        if started.returncode == 0:
            raise
        said = (started.stderr.strip() or started.stdout.strip()).splitlines() or ["?"]
        raise RuntimeError(f"ray start failed and no Ray answers at {address}: {said[-1]}") from None
    quiet_ray_logging()  # again, now that the session's log folder is known
    return address, started.returncode != 0


def describe_ray(address: str, *, reused: bool, kept: bool) -> str:
    """What the quickstart's Ray is, where it listens (measured, not assumed) and how it is guarded: one line."""
    from pipelines.ray_utils import auth_mode, dashboard_url, listening_addresses

    if os.environ.get("RAY_ADDRESS"):
        where = "the cluster in RAY_ADDRESS"
    elif reused:
        where = "the local cluster the previous quickstart left"
    else:
        where = "a local cluster" if kept else "a local Ray in this process"
    ports = listening_addresses()
    if not ports:
        listening = "its listening ports could not be read"
    else:
        loopback = [a for a in ports if _is_loopback(a)]
        if len(loopback) == len(ports):
            listening = f"all {len(ports)} of its ports listen on 127.0.0.1 only"
        else:
            listening = (f"{len(ports) - len(loopback)} of its {len(ports)} ports listen on all interfaces "
                         f"(see docs/cluster.md)")
    url = dashboard_url()
    dashboard = f"; dashboard {url}" if url else ""
    return f"Ray: {where} at {address}; {listening}; token authentication {auth_mode()}{dashboard}"


def _is_loopback(address: str) -> bool:
    """``127.0.0.1:6390``, ``::ffff:127.0.0.1:6390``, ``::1:8265`` -> True; ``0.0.0.0:6390``, ``:::6390`` -> False."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.removeprefix("::ffff:").startswith("127.") or host == "::1"


def replace_previous_endpoint(log) -> None:
    """Shut down the Serve instance a previous quickstart left on this cluster: its Sampler replica holds a CPU that
    the training workers need (on a 2-CPU machine, training would wait for it for ever), and its HTTP proxy holds
    the port. The endpoint comes back, serving the new production version, at step 4."""
    import ray
    from ray import serve

    if not any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True)):
        return
    try:
        apps = sorted(serve.status().applications)
    except Exception as exc:  # a Serve that cannot be asked: leave it; the training's resource check says more
        log(f"      the previous endpoint could not be inspected ({exc}); leaving it")
        return
    serve.shutdown()
    log(f"      stopped the previous quickstart's endpoint ({', '.join(apps) or 'no applications'}): its CPU goes "
        f"to training; step 4 serves the new version")


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
    env = {**os.environ, "RAY_ADDRESS": ray_address, "MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--model", model_uri, "--host", "127.0.0.1",
           "--port", str(port), "--poll-interval-s", "10"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SERVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        from pipelines.ray_utils import resource_summary

        raise RuntimeError(f"ddpm serve did not deploy within {SERVE_TIMEOUT_S} s: the Sampler replica needs 1 CPU; "
                           f"{resource_summary()}") from None
    if done.returncode != 0:
        raise RuntimeError(f"ddpm serve failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll ``GET URL/healthz`` until it answers 200 (a refused connection counts as not yet), at most ``timeout_s``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the endpoint at {url} did not become healthy in {timeout_s:g} s")


def grid_rows(class_names: list[str], text: bool) -> list[dict]:
    """What each row of the quickstart's grid asks for: a text model, one held-out composition each (words training
    never paired); a class model, one class each; an unconditional one, 10 rows of nothing."""
    if text:
        from pipelines.data.shapes import HELD_OUT

        return [{"prompt": f"a large {colour} {shape}"} for colour, shape in HELD_OUT]
    return [{"class_label": label} for label in range(len(class_names))] or [{}] * 10


def generate_grid(url: str, rows: list[dict], per_row: int = 10, steps: int = 50, guidance_scale: float = 1.0,
                  concurrent: bool = True):
    """One ``POST /generate`` per row of :func:`grid_rows`, all sent at once (``concurrent``) so that Serve batches
    their rows together (each image's bytes do not depend on its batch-mates; benchmarks/quickstart_grid.py measures
    both ways): ``per_row`` images each, as an (H, W, C) uint8 grid in the rows' order.

    ``guidance_scale`` applies to the conditioned rows (the server refuses it without a class or a prompt).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import requests
    from PIL import Image

    from ddpm import make_grid

    def one_row(row: int) -> list[np.ndarray]:
        asked = rows[row]
        body = {"num_images": per_row, "sampler": "ddim", "steps": steps, "seed": 1000 * row, "output": "json",
                **asked}
        if asked:
            body["guidance_scale"] = guidance_scale
        response = requests.post(f"{url}/generate", json=body, timeout=300)
        response.raise_for_status()
        decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in response.json()["images"]]
        return [image[..., None] if image.ndim == 2 else image for image in decoded]

    with ThreadPoolExecutor(max_workers=len(rows) if concurrent else 1) as pool:
        images = [image for row in pool.map(one_row, range(len(rows))) for image in row]
    return make_grid(np.stack(images), ncols=per_row)


def quickstart(*, minutes: float, workdir: Path, samples: Path, port: int, keep_serving: bool,
               eval_samples: int | None = None, recipe: str = "digits", overrides: tuple[str, ...] = (),
               log=print) -> dict:
    from pipelines.ray_utils import keep_local_ray_on_loopback, verbose

    if keep_serving and not os.environ.get("RAY_ADDRESS"):
        ensure_auth_token()  # before the first ``import ray``: Ray reads RAY_AUTH_MODE once, at import
    keep_local_ray_on_loopback()  # likewise: Ray reads it at import (ddpm's CLI has done it already)
    if not verbose():  # MLflow's INFO lines ("Creating initial MLflow database tables...") stay out of the way
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    import ray

    from ddpm import encode_png
    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.commands.pipeline import run_pipeline

    t0 = time.monotonic()
    workdir = workdir.resolve()
    os.environ.setdefault("DDPM_HOME", str(workdir))
    uri = tracking.tracking_uri()
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / RECIPES[recipe], list(overrides))
    address, reused = start_ray(keep_serving, log)
    log(f"[1/6] {describe_ray(address, reused=reused, kept=keep_serving)}")
    if reused:
        replace_previous_endpoint(log)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    p = config.pipeline
    latent, text, unclip = p.latents is not None, p.clip_config is not None, p.prior_config is not None
    config = replace(config, train=replace(config.train, max_minutes=minutes), pipeline=replace(
        p, raw_output=str(workdir / "data" / f"{recipe}-raw"), processed=str(workdir / "data" / recipe),
        storage=str(workdir / "runs"), run_name=f"{recipe}-{stamp}", register_as=recipe, num_workers=2,
        eval_samples=eval_samples or p.eval_samples,
        latents=str(workdir / "data" / f"{recipe}-latents") if latent else None,
        autoencoder_set=(*p.autoencoder_set, f"train.max_minutes={minutes:g}") if latent else p.autoencoder_set,
        clip_set=(*p.clip_set, f"train.max_minutes={minutes / 2:g}") if text else p.clip_set,
        prior_set=(*p.prior_set, f"train.max_minutes={minutes / 2:g}") if unclip else p.prior_set))
    what = ("for the autoencoder, then as many for the DDPM " if latent else
            f"for the decoder, after {minutes / 2:g} for the CLIP and {minutes / 2:g} for the prior " if unclip else
            f"for the DDPM, after {minutes / 2:g} for the CLIP " if text else "")
    log(f"[2/6] training budget: {minutes:g} minutes {what}(train.max_minutes; the learning rate decays over it), "
        f"at most {config.train.total_images:,} images")

    stages = "data -> ingest" + (" -> train-autoencoder -> encode" if latent else "") + (
        " -> train-clip" if text else "") + (" -> train-prior -> train (decoder) -> unclip" if unclip else " -> train")
    log(f"[3/6] pipeline: {stages} -> evaluate -> register -> gate")
    result = run_pipeline(config, tracking_uri=uri, log=lambda msg: log("      " + msg))

    served = served_uri(recipe, result.version, p.promote_to, uri)
    if not served.endswith(f"@{p.promote_to}"):
        log(f"      warning: {recipe} version {result.version} was not promoted ({result.gate_reason}) and no version "
            f"holds {p.promote_to}: serving it by version number")
    log(f"[4/6] serving {served} with Ray Serve")
    port = free_port(port)
    url = serve_model(served, port=port, ray_address=address, tracking_uri=uri, log=log)
    (tracking.home() / "endpoint.json").write_text(json.dumps({"url": url, "ray_address": address}))  # ddpm status

    from pipelines.data.dataset import read_manifest

    rows = grid_rows(read_manifest(result.processed).get("class_names") or [], text)
    log("[5/6] generating " + ("one row per held-out composition, asked for in words," if text else
                                "one row per class") + f" through POST {url}/generate")
    # The images the gate scored: DDIM-50 with the preset's guidance.
    grid = generate_grid(url, rows, steps=config.pipeline.eval_steps,
                         guidance_scale=config.pipeline.eval_guidance_scale)
    samples.write_bytes(encode_png(grid))

    summary = {
        "model": f"{recipe} version {result.version}", "promoted": result.promoted, "gate": result.gate_reason,
        "metrics": result.metrics, "samples": str(samples), "endpoint": url,
        "seconds": {**{k: round(v) for k, v in result.seconds.items()}, "total": round(time.monotonic() - t0)},
    }
    log("[6/6] done\n")
    log(f"  model      {recipe} version {result.version} "
        f"({'promoted to production' if result.promoted else 'not promoted'}: {result.gate_reason})")
    log(f"  samples    {samples}")
    log(f"  MLflow UI  {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {uri} "
        f"--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000")
    asked = {"prompt": "a small green circle above a red square"} if text else {"class_label": 3}
    body = json.dumps({"num_images": 16, "sampler": "ddim", "steps": config.pipeline.eval_steps, "seed": 0,
                       **asked, "guidance_scale": config.pipeline.eval_guidance_scale})
    if keep_serving:
        log(f"  try it     curl -s -X POST {url}/generate -H 'Content-Type: application/json' -d '{body}' "
            f"-o {recipe}.png")
        log(f"  metrics    curl -s {url}/metrics    # Prometheus text; deploy/monitoring/prometheus.yml scrapes it")
        log(f"  status     {Path(sys.executable).with_name('ddpm')} status")
        log(f"  stop       {Path(sys.executable).with_name('ray')} stop    # stops Serve and the local Ray")
    else:
        ray.shutdown()
        log("  Serve and Ray were stopped (--stop-when-done)")
    log(f"  timings    {summary['seconds']}")
    return summary


def served_uri(name: str, version: str, alias: str, tracking_uri: str) -> str:
    """``models:/NAME@ALIAS`` when a version holds the alias, else ``models:/NAME/VERSION`` (the one just trained)."""
    from pipelines.errors import UserError
    from pipelines.registry import current_version

    try:
        current_version(name, alias, tracking_uri)
        return f"models:/{name}@{alias}"
    except UserError:
        return f"models:/{name}/{version}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget [%(default)s]")
    parser.add_argument("--workdir", default=".ddpm", help="data, runs and the MLflow store [%(default)s]")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="digits",
                        help="digits (16x16 grey digits, pixel space), photos-latent (64x64 RGB photos, latent "
                             "diffusion), shapes-text (32x32 captioned shapes, prompts) or shapes-unclip (the same "
                             "shapes, DALL-E 2's prior and decoder) [%(default)s]")
    parser.add_argument("--samples", default="quickstart-samples.png", help="the grid of generated images")
    parser.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (another if taken) [%(default)s]")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="samples for the evaluation that gates promotion [the recipe's pipeline.eval_samples: "
                             "500, 200 for shapes-text]")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a value of the recipe's preset, e.g. pipeline.gate_max_ratio=3; repeatable")
    parser.add_argument("--stop-when-done", action="store_true",
                        help="run Ray in this process and stop Serve at the end (tests, CI)")


def main(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise ValueError("--minutes must be positive")
    quickstart(minutes=args.minutes, workdir=Path(args.workdir), samples=Path(args.samples), port=args.port,
               keep_serving=not args.stop_when_done, eval_samples=args.eval_samples, recipe=args.recipe,
               overrides=tuple(args.set))
    return 0
