"""``ddpm serve``: run the sampling endpoint (``deploy.serve_app``) on Ray Serve, locally or on the cluster in
``RAY_ADDRESS``.

Every flag maps to one argument of ``deploy.serve_app:build_app``, so this command and ``serve deploy
deploy/serve_config.yaml`` build the same application. Ray and Serve are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import time
from pathlib import Path

HELP = "serve a model over HTTP with Ray Serve (POST /generate: PNG grid or JSON of base64 PNGs)"
EXAMPLE = """example:
  ddpm serve --model models:/digits@production --blocking
  ddpm serve --model .ddpm/local/digits --port 8080 --max-replicas 2 --blocking
  DDPM_API_KEY=change-me ddpm serve --model models:/digits/3 --num-gpus 1 --blocking
  ddpm serve --model models:/digits@production --host 0.0.0.0 --api-key-file /run/secrets/ddpm-api-key --blocking

  curl -s -X POST http://127.0.0.1:8000/generate -H 'Content-Type: application/json' \\
       -d '{"num_images": 16, "sampler": "ddim", "steps": 50, "seed": 0}' -o grid.png

With a local Ray (RAY_ADDRESS unset) the server lives as long as this command. On a cluster, leave out
--blocking to deploy and return; the application keeps running until `serve shutdown`.

The API key comes from $DDPM_API_KEY or --api-key-file; --api-key works too but puts the key in the process list
and the shell history. A --host other than a loopback address (0.0.0.0, a LAN address) needs a key, or --insecure.
"""


# (AppArgs field, flag type, help); the flag is --field-name.
REPLICA_FLAGS = (
    ("min_replicas", int, ""),
    ("max_replicas", int, ""),
    ("target_ongoing_requests", float, "queued + running requests per replica that autoscaling aims for"),
    ("upscale_delay_s", float, ""),
    ("downscale_delay_s", float, ""),
    ("max_ongoing_requests", int, "requests a replica accepts at once; at least what one batch holds"),
    ("num_cpus", float, "CPUs per replica"),
    ("num_gpus", float, "GPUs per replica; > 0 samples on the GPU in bf16"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from deploy.schemas import AppArgs

    defaults = {name: field.default for name, field in AppArgs.model_fields.items()}
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="URI",
                       help="models:/NAME@ALIAS (followed as it moves), models:/NAME/VERSION, or a checkpoint folder")
    model.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    model.add_argument("--poll-interval-s", type=float, default=defaults["poll_interval_s"],
                       help="how often replicas check where the alias points (0: never) [%(default)s]")

    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to bind [%(default)s]")
    http.add_argument("--port", type=int, default=8000, help="[%(default)s]")
    key = http.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="require 'Authorization: Bearer KEY' on every route but /healthz and the playground, KEY "
                          "being this file's first line (default: $DDPM_API_KEY; neither: no key)")
    key.add_argument("--api-key", default=None, metavar="KEY",
                     help="the same, with the key itself: visible in `ps` and the shell history, so prefer "
                          "$DDPM_API_KEY or --api-key-file")
    http.add_argument("--insecure", action="store_true",
                      help="serve on a --host other than loopback without an API key (refused otherwise)")
    http.add_argument("--max-cost", type=int, default=defaults["max_cost"],
                      help="the largest cost of one request in U-Net rows: num_images x steps (x 2 when guided, "
                           "plus a latent model's decoder) [%(default)s]")
    http.add_argument("--name", default="ddpm", help="the Serve application's name [%(default)s]")

    batching = parser.add_argument_group("batching")
    batching.add_argument("--no-batching", dest="batching", action="store_false",
                          help="run each request on its own (no @serve.batch)")
    batching.add_argument("--max-batch-images", type=int, default=defaults["max_batch_images"],
                          help="images per batch, across requests [%(default)s]")
    batching.add_argument("--batch-wait-timeout-s", type=float, default=defaults["batch_wait_timeout_s"],
                          help="how long a batch waits to fill up [%(default)s]")
    batching.add_argument("--micro-batch", type=int, default=defaults["micro_batch"],
                          help="rows per forward pass, fixed so that batching never changes an image (the same "
                               "pixels as ddpm generate --batch-size at the same value); "
                               "0: each request's own size, only with --no-batching [%(default)s]")

    # One flag per replica setting of AppArgs, with its default (and description) from there: one source of truth.
    scaling = parser.add_argument_group("sampler replicas")
    for name, kind, help_text in REPLICA_FLAGS:
        scaling.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name],
                             help=f"{help_text or AppArgs.model_fields[name].description or ''} [%(default)s]".lstrip())

    parser.add_argument("--blocking", action="store_true",
                        help="stay in the foreground until Ctrl-C, then shut Serve down")


def app_args(args: argparse.Namespace) -> dict:
    """The ``build_app`` arguments for these flags (the API key only when one was given)."""
    out = {
        "model_uri": args.model, "tracking_uri": args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        "poll_interval_s": args.poll_interval_s, "max_cost": args.max_cost,
        "batching": args.batching, "max_batch_images": args.max_batch_images,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "micro_batch": args.micro_batch or None,
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing_requests, "upscale_delay_s": args.upscale_delay_s,
        "downscale_delay_s": args.downscale_delay_s, "max_ongoing_requests": args.max_ongoing_requests,
        "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
    }
    api_key = read_api_key(args)
    if api_key:
        out["api_key"] = api_key
    return out


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file (its first line, stripped), --api-key, or $DDPM_API_KEY, in that order."""
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
                from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {path}: its first line is empty")
        return key
    return args.api_key or os.environ.get("DDPM_API_KEY") or None


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without a key: a --host that is not a loopback address needs an API key
    or an explicit --insecure."""
    if api_key or insecure:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"--host {host} serves beyond this machine without an API key: set DDPM_API_KEY or "
                         f"--api-key-file, or pass --insecure to serve it open")


def _connect_ray() -> bool:
    """Join ``RAY_ADDRESS``, or start a local Ray on 127.0.0.1; True when this process started Ray itself.

    ``address="local"`` keeps ``ray.init`` from silently joining a cluster that ``ray start`` left running.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    return True


def _our_serve_listens(host: str, port: int) -> bool:
    """Whether this process is connected to a Ray whose Serve proxy already answers on ``host:port`` (a second
    application deployed from the same driver); a port held by anything else must be free."""
    import ray
    import requests

    if not ray.is_initialized():
        return False
    try:
        return requests.get(f"http://{host}:{port}/-/routes", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` for a moment: a port that is taken, or an address that is not this machine's, is one line
    now instead of a proxy actor's traceback after Ray has started."""
    import errno
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        why = "is in use by another program" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
        raise ValueError(f"--port {port} on {host} {why}; pick another with --port") from None


def replica_error(exc: BaseException) -> str:
    """The last line of the exception a replica raised, out of Serve's deployment-failure text (which holds the
    replica's traceback), e.g. ``CheckpointError: model.safetensors: unreadable or truncated``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (named or lines or [type(exc).__name__])[-1]


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from ray import serve

    from deploy.serve_app import build_app

    arguments = app_args(args)
    check_exposure(args.host, arguments.get("api_key"), args.insecure)
    try:
        app = build_app(arguments)  # validates every argument before Ray starts
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                                   for e in exc.errors())) from None
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is in [1, 65535]")
    if not os.environ.get("RAY_ADDRESS"):
        # Local replicas share this machine's model cache: resolving and loading here first turns a bad URI or a
        # damaged checkpoint into one clear line (Serve would only report that the deployment failed) and leaves
        # the download in the cache for them. On a cluster the port and the files are the cluster's.
        from ddpm import checkpoint
        from pipelines.registry import resolve_model

        checkpoint.load(resolve_model(args.model, tracking_uri=args.tracking_uri).path)
        if not _our_serve_listens(args.host, args.port):  # else serve.start below reuses that proxy
            check_port_free(args.host, args.port)
    started_ray = _connect_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(app, name=args.name, route_prefix="/")
    except RuntimeError as exc:  # Serve's "Deploying application ... failed": the replica's own error is inside
        raise RuntimeError(f"the {args.name} application did not start: {replica_error(exc)}") from None
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.model} at {url}  (POST {url}/generate, GET {url}/v1/model, GET {url}/healthz)")
    if not (args.blocking or started_ray):
        return 0
    if not args.blocking:
        print("Ray was started by this command, so the server stops with it; press Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down")
        serve.shutdown()
    return 0
