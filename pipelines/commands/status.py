"""``ddpm status``: one screen of where things stand.

- **Ray**: the cluster in ``RAY_ADDRESS``, else the one the quickstart recorded (``endpoint.json`` in the data
  folder), else the quickstart's local cluster, else the last ``ray start`` on this machine (Ray's own record):
  nodes, CPUs and GPUs (free of total), running jobs, where its ports listen and whether token authentication is on,
  and the HTTP address of its Serve, if one runs (asked of Serve's controller: whatever port it was started on).
- **Training**: the latest runs in the tracking store, with their progress (images seen of the total, loss,
  images/s) and state.
- **Models**: each registered model's production version, its gate score and whether it has a canary reference;
  a model without one says why its latest version is not in production (the gate's record on it).
- **Endpoint**: health and the version it serves (``--endpoint``, else the Serve found through Ray, else the one the
  quickstart last started, else ``http://127.0.0.1:8000``), with the API key from ``$DDPM_API_KEY`` when it needs one.

Every section is read on its own and says why it is empty; nothing is started. ``--json`` prints the same as one
JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

HELP = "show the Ray cluster, the latest training runs, the production models and the endpoint on one screen"
EXAMPLE = """example:
  ddpm status
  ddpm status --json | jq .models
  RAY_ADDRESS=10.0.0.5:6379 DDPM_API_KEY=... ddpm status --endpoint https://ddpm.example.org
"""

QUICKSTART_RAY = "127.0.0.1:6390"  # pipelines.commands.quickstart.RAY_PORT
ENDPOINT_FILE = "endpoint.json"  # written by the quickstart into the data folder: where its endpoint runs
DEFAULT_ENDPOINT = "http://127.0.0.1:8000"


# -- the sections ---------------------------------------------------------------------------------------------------
def ray_address(recorded: dict) -> str | None:
    """``RAY_ADDRESS``, else the first that listens of: the Ray the quickstart recorded, the quickstart's port, the
    last ``ray start`` on this machine (``/tmp/ray/ray_current_cluster``, Ray's record)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    candidates = [recorded.get("ray_address"), QUICKSTART_RAY]
    try:
        from ray._private.services import find_bootstrap_address  # reads a file: no cluster is started or joined

        candidates.append(find_bootstrap_address(None))
    except Exception:  # a private function: without it, the other two places
        pass
    return next((a for a in candidates if isinstance(a, str) and ":" in a and _listening(a)), None)


def ray_status(recorded: dict | None = None) -> dict:
    """The cluster's nodes, resources, running jobs and Serve; ``{"running": False, ...}`` when there is none."""
    address = ray_address(recorded or {})
    if not address:
        return {"running": False, "detail": f"no RAY_ADDRESS, no recorded cluster, none at {QUICKSTART_RAY} and no "
                                            f"`ray start` on this machine"}
    token = Path.home() / ".ray" / "auth_token"
    if not os.environ.get("RAY_AUTH_MODE") and token.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"  # what `ray start` turned on for the cluster (see the quickstart)
    import ray

    from pipelines.ray_utils import auth_mode, connect_options, dashboard_url, listening_addresses, quiet_ray_logging

    quiet_ray_logging()
    try:
        ray.init(address=address, **connect_options())
    except Exception as exc:
        return {"running": False, "address": address, "detail": f"cannot join: {str(exc).splitlines()[0]}"}
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        total, free = ray.cluster_resources(), ray.available_resources()
        jobs = _running_jobs()
        ports = listening_addresses()
        return {
            "running": True, "address": address, "nodes": len(nodes),
            "cpus": {"total": total.get("CPU", 0), "free": free.get("CPU", 0)},
            "gpus": {"total": total.get("GPU", 0), "free": free.get("GPU", 0)},
            "jobs": jobs, "token_authentication": auth_mode(), "dashboard": dashboard_url(),
            "ports": {"listening": len(ports), "on_all_interfaces": [p for p in ports if not _loopback(p)]},
            "serve": serve_address(),
        }
    finally:
        ray.shutdown()


def serve_address() -> str | None:
    """``http://HOST:PORT`` of the joined cluster's Serve (its controller's HTTP options), None without a Serve."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        options = ray.get(controller.get_http_config.remote(), timeout=10)
    except Exception:  # no Serve on this cluster (ValueError: no such actor), or it is not answering
        return None
    host = "127.0.0.1" if options.host in ("0.0.0.0", "", None) else options.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{options.port}{options.root_path or ''}"


def _running_jobs() -> list[dict]:
    """Running jobs but this one: submitted jobs (Ray's job table) and drivers connected to the cluster."""
    import ray

    mine = ray.get_runtime_context().get_job_id()
    found = []
    try:
        from ray._private.state import state  # the GCS's job table, which works without the dashboard

        for job in state.job_table():
            if job.get("IsDead") or job.get("JobID") == mine:
                continue
            entry = job.get("Entrypoint") or job.get("DriverInfo", {}).get("Entrypoint") or ""
            found.append({"job_id": job.get("JobID"), "entrypoint": entry[:120],
                          "started": _iso(job.get("StartTime", 0) / 1000)})
    except Exception:
        pass
    return found


def training_runs(tracking_uri: str | None, limit: int) -> dict:
    """The latest ``limit`` runs of every experiment, newest first, with their last logged progress."""
    from pipelines import tracking

    uri = tracking_uri or tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {"tracking_uri": tracking.redact_uri(uri), "runs": [], "detail": "no tracking store yet"}
    try:
        client = tracking.client(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=limit) \
            if experiments else []
    except Exception as exc:
        return {"tracking_uri": tracking.redact_uri(uri), "runs": [], "detail": str(exc).splitlines()[0]}
    out = []
    for run in runs:
        metrics, params = run.data.metrics, run.data.params
        total = _int(params.get("train.total_images"))
        seen = _int(metrics.get("images_seen"))
        out.append({
            "name": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status,
            "started": _iso(run.info.start_time / 1000), "images_seen": seen, "total_images": total,
            "max_minutes": params.get("train.max_minutes"), "loss": metrics.get("loss"),
            "images_per_sec": metrics.get("images_per_sec"),
        })
    return {"tracking_uri": tracking.redact_uri(uri), "runs": out}


def models(tracking_uri: str | None) -> dict:
    """Each registered model's production version, with the gate's record and whether a canary reference exists."""
    from pipelines import registry, tracking

    uri = tracking_uri or tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {"models": [], "detail": "no tracking store yet"}
    try:
        rows = registry.list_models(tracking_uri=uri)
    except Exception as exc:
        return {"models": [], "detail": str(exc).splitlines()[0]}
    out = []
    client = tracking.client(uri)
    for row in rows:
        version = row["aliases"].get("production")
        entry = {"name": row["name"], "latest": row["latest"], "production": version}
        if version is None and row["latest"] is not None:  # why the latest is not in production, if the gate said
            entry["latest_gate"] = registry.gate_summary(row["name"], str(row["latest"]), uri)
        if version is not None:
            tags = client.get_model_version(row["name"], version).tags
            entry["gate"] = registry.gate_summary(row["name"], version, uri)
            entry["canary_reference"] = registry.CANARY_TAG in tags
            entry["images_seen"] = _int(tags.get("images_seen"))
        out.append(entry)
    return {"models": out}


def endpoint(url: str, api_key: str | None) -> dict:
    """The endpoint's health and the model it serves."""
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        health = requests.get(f"{url}/healthz", timeout=3)
    except requests.RequestException as exc:
        return {"url": url, "healthy": False, "detail": f"not answering ({type(exc).__name__})"}
    out = {"url": url, "healthy": health.status_code == 200}
    try:
        info = requests.get(f"{url}/v1/model", headers=headers, timeout=10)
    except requests.RequestException as exc:
        return out | {"detail": f"/v1/model: {type(exc).__name__}"}
    if info.status_code == 401:
        return out | {"detail": "/v1/model needs the API key: set DDPM_API_KEY"}
    if info.status_code != 200:
        return out | {"detail": f"/v1/model answered {info.status_code}"}
    body = info.json()
    return out | {k: body.get(k) for k in ("name", "version", "alias", "device", "canary", "canary_refused",
                                            "load_error")}


# -- the command ------------------------------------------------------------------------------------------------------
def status(*, tracking_uri: str | None = None, endpoint_url: str | None = None, api_key: str | None = None,
           runs: int = 5) -> dict:
    from pipelines import tracking

    try:  # what the quickstart recorded: {"url": ..., "ray_address": ...}
        recorded = json.loads((tracking.home() / ENDPOINT_FILE).read_text())
        recorded = recorded if isinstance(recorded, dict) else {}
    except (OSError, ValueError):
        recorded = {}
    ray = ray_status(recorded)
    if endpoint_url is None:
        endpoint_url = ray.get("serve") or recorded.get("url") or DEFAULT_ENDPOINT
    return {"ray": ray, "training": training_runs(tracking_uri, runs), "models": models(tracking_uri),
            "endpoint": endpoint(str(endpoint_url).rstrip("/"), api_key or os.environ.get("DDPM_API_KEY"))}


def render(report: dict) -> str:
    """The report as one screen of text."""
    lines = []
    r = report["ray"]
    if not r.get("running"):
        lines.append(f"Ray       not running ({r.get('detail', '')})")
    else:
        jobs = r["jobs"]
        cpus, gpus = r["cpus"], r["gpus"]
        lines.append(f"Ray       {r['address']}: {r['nodes']} node(s), CPU {cpus['free']:g}/{cpus['total']:g} free, "
                     f"GPU {gpus['free']:g}/{gpus['total']:g} free; {len(jobs)} running job(s)")
        for job in jobs[:5]:
            lines.append(f"          job {job['job_id']} since {job['started']}  {job['entrypoint']}")
        exposed = r["ports"]["on_all_interfaces"]
        where = (f"all {r['ports']['listening']} ports on loopback" if not exposed else
                 f"{len(exposed)} of {r['ports']['listening']} ports on all interfaces")
        lines.append(f"          {where}; token authentication {r['token_authentication']}"
                     + (f"; dashboard {r['dashboard']}" if r.get("dashboard") else "")
                     + (f"; Serve at {r['serve']}" if r.get("serve") else "; no Serve"))

    t = report["training"]
    lines.append(f"Training  {t['tracking_uri']}" + (f" ({t['detail']})" if t.get("detail") else ""))
    for run in t["runs"]:
        seen, total = run["images_seen"], run["total_images"]
        progress = f"{seen:,}/{total:,} images ({100 * seen / total:.0f}%)" if seen is not None and total else \
            (f"{seen:,} images" if seen is not None else "no progress logged")
        loss = f"  loss {run['loss']:.4f}" if run["loss"] is not None else ""
        rate = f"  {run['images_per_sec']:,.0f} img/s" if run["images_per_sec"] is not None else ""
        lines.append(f"  {run['name'] or run['run_id'][:12]:<28} {run['status']:<9} {progress}{loss}{rate}  "
                     f"started {run['started']}")

    m = report["models"]
    empty = f"    ({m['detail']})" if m.get("detail") else ("" if m["models"] else "    none registered")
    lines.append("Models" + empty)
    for model in m["models"]:
        if model["production"] is None:
            why = (model.get("latest_gate") or {}).get("reason")
            lines.append(f"  {model['name']:<20} latest version {model['latest']}, no production version"
                         + (f": not promoted, {why}" if why else ""))
            continue
        gate = model.get("gate") or {}
        score = (f"gate {gate['metric']} {gate['value']:.4g} ({gate['decision']})" if gate.get("value") is not None
                 else "no gate record")
        canary = "canary reference recorded" if model.get("canary_reference") else "no canary reference"
        lines.append(f"  {model['name']:<20} production -> version {model['production']} "
                     f"(latest {model['latest']}); {score}; {canary}")

    e = report["endpoint"]
    if not e["healthy"]:
        lines.append(f"Endpoint  {e['url']}: {e.get('detail', 'unhealthy')}")
    elif "version" not in e:
        lines.append(f"Endpoint  {e['url']}: healthy; {e.get('detail', '')}")
    else:
        canary = (e.get("canary") or {}).get("status", "unknown")
        served = f"{e['name']} version {e['version']}" if e.get("version") else "a checkpoint folder"
        lines.append(f"Endpoint  {e['url']}: healthy; serving {served}"
                     + (f" ({e['alias']})" if e.get("alias") else "") + f" on {e.get('device')}; canary {canary}")
        if e.get("canary_refused"):
            refused = e["canary_refused"]
            lines.append(f"          refused version {refused.get('version')}: canary score "
                         f"{refused.get('score')} > {refused.get('tolerance')}")
    return "\n".join(lines)


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host.startswith("127.") or host == "::1"


def _int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else "?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help=f"the endpoint to check (default: the quickstart's last, else {DEFAULT_ENDPOINT})")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server (default: $MLFLOW_TRACKING_URI, else the embedded store in .ddpm/)")
    parser.add_argument("--runs", type=int, default=5, help="how many of the latest training runs [%(default)s]")


def main(args: argparse.Namespace) -> int:
    if args.runs < 0:
        raise ValueError("--runs must be at least 0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    report = status(tracking_uri=args.tracking_uri, endpoint_url=args.endpoint, runs=args.runs)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0
