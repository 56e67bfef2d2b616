"""The sampling endpoint on Ray Serve: a FastAPI ingress in front of an autoscaling, batching sampler.

::

    HTTP ──> Ingress   FastAPI: validation, API key, cost budget, PNG / JSON encoding (no model, no CPU reserved)
               │  handle.generate.remote(Job)
               ▼
             Sampler   one model per replica, on its device; @serve.batch gathers concurrent requests;
                       follows a registry alias and swaps weights without downtime

``ddpm serve --model models:/digits@production`` and ``serve deploy deploy/serve_config.yaml`` build the same
application with :func:`build_app` (import path ``deploy.serve_app:build_app``).

Three properties the design rests on:

1. **An image depends only on its seed and settings.** Requests that share settings run as one call to the core's
   pure ``ddpm.sample``, but every image draws its noise from its own generator (``ddpm.noise_from_seeds``), and every
   forward pass runs exactly ``micro_batch`` rows, padding the last chunk. The fixed size matters: CPU (oneDNN, MKL)
   and GPU kernels pick different algorithms for different batch sizes, so the same row computed in a batch of 1 and
   in a batch of 5 differs in its last bits, and once in a while in a pixel. At one fixed size a row's result does
   not depend on the other rows, so a request's PNG bytes are the same whether it ran alone or batched.
2. **A model swap is one reference assignment.** Each batch reads ``self._served`` once and runs to the end on that
   immutable snapshot; a new version is loaded beside it and then assigned. In-flight requests finish on the weights
   they started with, the next batch gets the new ones, and no request waits for a load.
3. **Bad input never reaches the model.** The ingress validates the body (pydantic, unknown fields rejected) and
   the cost; the sampler checks what depends on the model (class labels, step count) against the snapshot that
   will run the batch. Every rejection is a 4xx that names the field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ddpm import DEFAULT_STEPS, SAMPLERS, checkpoint, encode_png, make_grid, noise_from_seeds, sample, to_uint8
from deploy.schemas import MAX_IMAGES, AppArgs, GenerateRequest, SamplerConfig

log = logging.getLogger("ray.serve")

PUBLIC_PATHS = frozenset({"/healthz"})  # every other route needs the API key, when one is set


# -- the work, as plain data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request, with its defaults filled in, as the ingress sends it to a sampler replica."""

    num_images: int
    sampler: str
    steps: int
    eta: float
    seed: int
    class_label: int | None
    guidance_scale: float

    def seeds(self) -> list[int]:
        """Image i's seed: (seed + i) mod 2^32."""
        return [(self.seed + i) % 2**32 for i in range(self.num_images)]

    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one call to ``ddpm.sample``.

        The key holds every setting that ``sample`` takes once per batch: sampler, step count, eta, guidance scale
        and the conditioning mode (class labels themselves are per image). A setting the sampler ignores is
        normalized away (eta outside DDIM, guidance without labels) so that it does not split batches for nothing.
        """
        conditional = self.class_label is not None
        return (self.sampler, self.steps, self.eta if self.sampler == "ddim" else 0.0,
                self.guidance_scale if conditional else 1.0, conditional)


@dataclass(frozen=True)
class Queued:
    """A job and when its replica received it (``time.monotonic``), to report the time it spent queued."""

    job: Job
    received: float


@dataclass(frozen=True)
class Generated:
    images: np.ndarray  # (N, H, W, C) uint8
    seeds: list[int]
    model: dict  # name, version, alias of the weights that made the images
    timings_ms: dict
    batch: dict  # requests and images that shared the forward passes


@dataclass(frozen=True)
class Rejected:
    """A request that cannot run on this model; the ingress turns it into a 422 naming ``field``."""

    field: str
    message: str


@dataclass(frozen=True)
class ServedModel:
    """An immutable snapshot of what a replica serves: replaced as a whole, never modified."""

    loaded: checkpoint.LoadedModel  # EMA weights, eval mode, on ``device``
    device: torch.device
    name: str | None
    version: str | None
    alias: str | None

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias}

    def describe(self) -> dict:
        c = self.loaded.config
        classes = self.loaded.class_names or [str(i) for i in range(c.num_classes)]
        return self.identity() | {
            "resolution": c.image_size, "channels": c.in_channels, "num_classes": c.num_classes, "classes": classes,
            "samplers": list(SAMPLERS), "default_steps": dict(DEFAULT_STEPS),
            "num_timesteps": self.loaded.schedule.num_timesteps, "prediction_type": self.loaded.prediction_type,
            "max_num_images": MAX_IMAGES, "device": str(self.device),
        }


# -- the engine: pure PyTorch, no Ray -------------------------------------------------------------------------------
def load_served(uri: str, tracking_uri: str | None, device: torch.device) -> ServedModel:
    """Resolve ``uri`` (registry alias or version, or a checkpoint folder) and load its EMA weights onto ``device``."""
    from pipelines.registry import resolve_model  # MLflow is imported only when a replica loads a model

    resolved = resolve_model(uri, tracking_uri=tracking_uri)
    loaded = checkpoint.load(resolved.path, device=device, weights="ema")
    return ServedModel(loaded, device, resolved.name, resolved.version, resolved.alias)


def fixed_size_forward(model: torch.nn.Module, size: int):
    """``model`` as a callable that always runs exactly ``size`` rows at a time, padding the last chunk.

    This is what makes batching invisible in the output (see the module docstring, point 1): with the shape fixed,
    each row goes through the same kernels whatever the other rows are, so it comes out bit-identical.
    """

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], size):
            n = min(size, x.shape[0] - start)
            # Fresh, padded buffers every time: same shape, same strides, same alignment for every chunk.
            xs = x.new_zeros((size, *x.shape[1:]))
            xs[:n] = x[start:start + n]
            ts = t.new_full((size,), int(t[start]))  # samplers run one timestep for the whole batch
            ts[:n] = t[start:start + n]
            if y is None:
                out = model(xs, ts)
            else:
                ys = y.new_full((size,), -1)  # padding rows take the null class
                ys[:n] = y[start:start + n]
                out = model(xs, ts, ys)
            outputs.append(out[:n])
        return torch.cat(outputs)

    return forward


def check(job: Job, served: ServedModel) -> Rejected | None:
    """What a valid body can still get wrong about this particular model."""
    cfg, T = served.loaded.config, served.loaded.schedule.num_timesteps
    if job.steps > T:
        return Rejected("steps", f"steps must be at most {T}, this model's number of timesteps; got {job.steps}")
    if job.class_label is None:
        if job.guidance_scale != 1.0:
            return Rejected("guidance_scale", "guidance_scale applies only with a class_label")
        return None
    if cfg.num_classes == 0:
        return Rejected("class_label", "this model is unconditional: send class_label null or leave it out")
    if not 0 <= job.class_label < cfg.num_classes:
        return Rejected("class_label", f"unknown class {job.class_label}; this model has classes "
                                       f"0..{cfg.num_classes - 1} (see GET /v1/model)")
    return None


def generate_images(served: ServedModel, jobs: list[Job], micro_batch: int | None) -> list[np.ndarray]:
    """Sample every job's images, one ``ddpm.sample`` call per group of jobs that share settings.

    Returns one (num_images, H, W, C) uint8 array per job, in order.
    """
    loaded = served.loaded
    model = loaded.model if micro_batch is None else fixed_size_forward(loaded.model, micro_batch)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key(), []).append(i)

    results: list[np.ndarray] = [None] * len(jobs)  # type: ignore[list-item]
    for members in groups.values():
        group = [jobs[i] for i in members]
        settings = group[0]
        # Noise: one CPU generator per image, seeded from the image's own seed.
        seeds = [s for job in group for s in job.seeds()]
        x_T, generators = noise_from_seeds(seeds, loaded.image_shape, served.device)  # (N, C, H, W)
        labels = None
        if settings.class_label is not None:
            labels = torch.tensor([job.class_label for job in group for _ in range(job.num_images)], device=served.device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if served.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            x_0 = sample(model, loaded.schedule, x_T, sampler=settings.sampler, steps=settings.steps,
                         eta=settings.eta, prediction_type=loaded.prediction_type, class_labels=labels,
                         guidance_scale=settings.guidance_scale, generator=generators)
        images = to_uint8(x_0)  # (N, H, W, C)
        offset = 0
        for i, job in zip(members, group):
            results[i] = images[offset:offset + job.num_images]
            offset += job.num_images
    return results


def run_batch(served: ServedModel, items: list[Queued], micro_batch: int | None) -> list[Generated | Rejected]:
    """Check each queued job against ``served``, then sample all the valid ones together."""
    started = time.monotonic()
    outcomes: list[Generated | Rejected | None] = [check(item.job, served) for item in items]
    valid = [i for i, outcome in enumerate(outcomes) if outcome is None]
    images = generate_images(served, [items[i].job for i in valid], micro_batch)
    sample_ms = (time.monotonic() - started) * 1000
    batch = {"requests": len(valid), "images": sum(items[i].job.num_images for i in valid)}
    for i, imgs in zip(valid, images):
        outcomes[i] = Generated(imgs, items[i].job.seeds(), served.identity(),
                                {"queue": (started - items[i].received) * 1000, "sample": sample_ms}, batch)
    return outcomes  # type: ignore[return-value]


def _count_images(items: list[Queued]) -> int:
    """The size of a batch for @serve.batch: images, not requests (a request carries up to 64)."""
    return sum(item.job.num_images for item in items)


# -- the sampler deployment ---------------------------------------------------------------------------------------
@serve.deployment(name="Sampler", max_ongoing_requests=64)
class Sampler:
    """Holds one model on its device and samples for the ingress; configured through ``user_config``.

    Serve calls :meth:`reconfigure` once before the replica takes traffic and again, in place, whenever the
    ``user_config`` in the Serve config changes (a new ``model_uri`` swaps the model without restarting anything).
    With an alias URI the replica also polls the registry and swaps when the alias moves.
    """

    def __init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels run to run
            torch.backends.cudnn.deterministic = True
        self.config: SamplerConfig | None = None
        self._served: ServedModel | None = None
        self._load_lock = asyncio.Lock()  # one load at a time, so an older load never overwrites a newer one
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")  # keeps the event loop free
        self._watcher: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        config = SamplerConfig(**user_config)
        old = self.config
        if old is None or (old.model_uri, old.tracking_uri) != (config.model_uri, config.tracking_uri):
            await self._load(config)  # raises on failure: a new replica fails to start, a live one keeps its model
        self.config = config
        self._batched.set_max_batch_size(config.max_batch_images)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if self._watcher is not None:
            self._watcher.cancel()
        served = self._served
        if served.alias is not None and config.poll_interval_s > 0:
            self._watcher = asyncio.create_task(self._follow_alias(config))

    async def _load(self, config: SamplerConfig) -> None:
        async with self._load_lock:
            served = await asyncio.to_thread(load_served, config.model_uri, config.tracking_uri, self.device)
            self._served = served  # the swap: batches already running keep the snapshot they read
        log.info("serving %s version %s (alias %s) on %s", served.name or config.model_uri, served.version,
                 served.alias, served.device)

    async def _follow_alias(self, config: SamplerConfig) -> None:
        """Every ``poll_interval_s``, look up the alias; load and swap in the version it points at when it moved."""
        from pipelines.registry import current_version

        while True:
            await asyncio.sleep(config.poll_interval_s)
            served = self._served
            try:
                version = await asyncio.to_thread(current_version, served.name, served.alias, config.tracking_uri)
                if version != served.version:
                    log.info("models:/%s@%s moved from version %s to %s", served.name, served.alias,
                             served.version, version)
                    await self._load(config)
            except Exception as exc:  # an unreachable registry must not take the model down: retry next time
                log.warning("could not follow models:/%s@%s (still serving version %s): %s", served.name,
                            served.alias, served.version, exc)

    async def model_info(self) -> dict:
        return self._served.describe()

    async def generate(self, job: Job) -> Generated | Rejected:
        item = Queued(job, time.monotonic())
        if self.config.batching:
            return await self._batched(item)
        return (await self._run([item]))[0]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_count_images)
    async def _batched(self, items: list[Queued]) -> list[Generated | Rejected]:
        return await self._run(items)

    async def _run(self, items: list[Queued]) -> list[Generated | Rejected]:
        served = self._served  # the snapshot this batch runs on to the end, whatever swaps happen meanwhile
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, run_batch, served, items, self.config.micro_batch)


# -- the HTTP ingress -----------------------------------------------------------------------------------------------
api = FastAPI(
    title="DDPM sampler",
    description="POST /generate samples images from the served diffusion model; GET /v1/model describes it.",
)


def _route_path(request: Request) -> str:
    """The request's path inside the application, without the Serve route prefix."""
    path, root = request.scope["path"], request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


@api.middleware("http")
async def require_api_key(request: Request, call_next):
    """With an API key set, every route but /healthz needs ``Authorization: Bearer <key>`` (compared in constant time)."""
    key: SecretStr | None = getattr(request.app.state, "api_key", None)
    if key is not None and _route_path(request) not in PUBLIC_PATHS:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            return JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer <key>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


def _reject(field: str, message: str, status: int = 422) -> HTTPException:
    """An error shaped like FastAPI's own validation errors, so clients parse one format."""
    return HTTPException(status, detail=[{"type": "value_error", "loc": ["body", field], "msg": message}])


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Validates, budgets and encodes; the sampling happens in the :class:`Sampler` deployment."""

    def __init__(self, sampler: DeploymentHandle, api_key: SecretStr | None, max_cost: int):
        self.sampler = sampler
        self.max_cost = max_cost
        if api_key is None and os.environ.get("DDPM_API_KEY"):
            api_key = SecretStr(os.environ["DDPM_API_KEY"])
        api.state.api_key = api_key  # read by require_api_key; one app per replica process

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict:
        return await self.sampler.model_info.remote() | {"max_cost": self.max_cost}

    @api.post("/generate")
    async def generate(self, body: GenerateRequest = Body(default_factory=GenerateRequest)) -> Response:
        started = time.monotonic()
        steps = body.steps or DEFAULT_STEPS[body.sampler]
        if body.num_images * steps > self.max_cost:
            raise _reject("steps", f"num_images * steps = {body.num_images} * {steps} = {body.num_images * steps} "
                                   f"exceeds this server's budget of {self.max_cost} image-steps per request")
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        job = Job(body.num_images, body.sampler, steps, body.eta, seed, body.class_label, body.guidance_scale)
        outcome = await self.sampler.generate.remote(job)
        if isinstance(outcome, Rejected):
            raise _reject(outcome.field, outcome.message)

        encode_started = time.monotonic()
        if body.output == "png":
            content = encode_png(make_grid(outcome.images))
        else:
            encoded = [base64.b64encode(encode_png(image)).decode("ascii") for image in outcome.images]
        done = time.monotonic()
        timings = outcome.timings_ms | {"encode": (done - encode_started) * 1000, "total": (done - started) * 1000}
        if body.output == "png":
            headers = {"X-Seed": str(seed), "X-Model-Name": str(outcome.model["name"]),
                       "X-Model-Version": str(outcome.model["version"]),
                       "X-Batch-Requests": str(outcome.batch["requests"]),
                       "X-Batch-Images": str(outcome.batch["images"])}
            return Response(content, media_type="image/png", headers=headers)
        return JSONResponse({"images": encoded, "seeds": outcome.seeds, "model": outcome.model,
                             "timings_ms": {k: round(v, 2) for k, v in timings.items()}, "batch": outcome.batch})


# -- the application ------------------------------------------------------------------------------------------------
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
    return Ingress.bind(sampler, a.api_key, a.max_cost)
