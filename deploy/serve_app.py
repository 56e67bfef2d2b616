"""The sampling endpoint on Ray Serve: a FastAPI ingress in front of an autoscaling, batching sampler.

::

    HTTP ──> Ingress   deploy/ingress.py: FastAPI, API key, body limits, validation, PNG / JSON encoding
               │  handle.generate.remote(Job)          (no model, no CPU reserved)
               ▼
             Sampler   deploy/sampler.py: one model per replica, on its device; @serve.batch gathers concurrent
                       requests (deploy/batching.py merges the batches that waited); follows a registry alias and
                       swaps weights without downtime, after the new version's canary passes
               │  run_batch(snapshot, jobs)
               ▼
             engine    deploy/engine.py: checks each job against the model (settings, cost), calls the core

``ddpm serve --model models:/digits@production`` and ``serve deploy deploy/serve_config.yaml`` build the same
application with :func:`build_app` (import path ``deploy.serve_app:build_app``).

The properties the design rests on:

1. **An image depends only on its seed and settings** (its prompt or class label included). Requests that share
   settings (prompts and labels are per image) run as one call to the core's one generation path
   (``ddpm.generate_images``; ``ddpm.inpaint_images`` for ``POST /inpaint``), each image with its
   own noise generator, and the network always runs at one fixed batch shape (``micro_batch``), so a request's PNG
   bytes are the same whether it ran alone or batched, and the same as ``ddpm generate`` returns (``ddpm.generation``
   explains why the fixed shape is needed).
2. **A model swap is one reference assignment** (``deploy.sampler``).
3. **Bad input never reaches the model.** The ingress validates the body (pydantic, unknown fields rejected); the
   sampler checks what depends on the model (class labels or prompts, step count, an edit's image size, the cost in
   U-Net rows) against the snapshot that will run the batch. Every rejection is a 4xx that names the field.
4. **No version serves before its canary passes** (``deploy.sampler``).

``GET /metrics`` serves Prometheus text (``deploy.metrics``): requests by route and status, latency and queue-time
histograms, images and model calls by version, batch sizes and in-flight requests per replica, canary refusals.
"""

from __future__ import annotations

from ray.serve import Application

from deploy.ingress import Ingress
from deploy.sampler import Sampler
from deploy.schemas import AppArgs


def build_app(args: dict) -> Application:
    """The application from its arguments (see ``deploy.schemas.AppArgs``): ``serve deploy``'s and ``ddpm serve``'s.

    The deployment options set here are defaults: a Serve config's ``deployments:`` section overrides them.
    """
    a = AppArgs(**args)
    sampler = Sampler.options(
        user_config=a.sampler_config().model_dump(),
        max_ongoing_requests=a.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests, "look_back_period_s": a.look_back_period_s,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
    ).bind()
    return Ingress.bind(sampler, a.api_key)
