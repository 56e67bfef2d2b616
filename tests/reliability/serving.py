"""Serve on 127.0.0.1 for the serving half of the reliability suite (test_serve_faults.py, test_abuse.py).

Applications are deployed the way ``serve deploy deploy/serve_config.yaml`` deploys them: a ``ServeDeploySchema``
handed to the Serve controller (``deploy_apps``, what the dashboard's REST endpoint calls). That is the path on which a
changed ``user_config`` reaches the running replicas in place (``Sampler.reconfigure``), the hot reload that
``serve.run`` cannot do (it restarts every replica). Replica processes are found by their Serve actor names, and
their pids asked of the actors themselves; the session's Ray runs without a dashboard, so ``ray.util.state`` has no
server to ask.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tests.support import start_local_ray, free_port

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint

from .support import wait_for  # one polling helper for the whole suite


def save_tiny(path: Path, seed: int) -> Path:
    """An unconditional tiny checkpoint (8x8x1) that predicts x_0, so images vary with the weights."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig.preset("tiny"))
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    return checkpoint.save(path, model, schedule, prediction_type="sample")


def start_serve() -> int:
    """Serve's HTTP proxy on a free port of 127.0.0.1, in the session's Ray; returns the port."""
    from ray import serve

    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def app_config(name: str, args: dict, *, deployments: list[dict] | None = None,
               env_vars: dict[str, str] | None = None) -> dict:
    """One application of a Serve config, as in deploy/serve_config.yaml, routed at ``/<name>``."""
    app = {"name": name, "route_prefix": f"/{name}", "import_path": "deploy.serve_app:build_app", "args": args}
    if deployments:
        app["deployments"] = deployments
    if env_vars:
        app["runtime_env"] = {"env_vars": env_vars}
    return app


def deploy(port: int, apps: list[dict], timeout: float = 120) -> None:
    """Apply a Serve config with ``apps`` (every application Serve should run) and wait until all are RUNNING."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": apps}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))

    def running() -> bool:
        statuses = serve.status().applications
        for app in apps:
            status = statuses.get(app["name"])
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"application {app['name']} failed to deploy: {status.message}")
            if status is None or status.status != "RUNNING":
                return False
        return True

    wait_for(running, timeout=timeout, what=f"applications {[a['name'] for a in apps]} RUNNING", interval=0.5)


def replica_pids(app: str, deployment: str) -> list[int]:
    """The process ids of the live replicas of ``deployment`` in ``app``."""
    import ray

    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#"):
            handle = ray.get_actor(actor["name"], namespace="serve")
            try:
                pids.append(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
            except ray.exceptions.RayActorError:  # a replica that died between listing and asking
                continue
    return sorted(pids)


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments[deployment].replica_states.get("RUNNING", 0) if status else 0
