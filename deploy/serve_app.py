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
   one generation path (``ddpm.generate_images``; ``ddpm.inpaint_images`` for ``POST /inpaint``), each image with its
   own noise generator, and the network always runs at one fixed batch shape (``micro_batch``), so a request's PNG
   bytes are the same whether it ran alone or batched, and the same as ``ddpm generate`` returns (``ddpm.generation``
   explains why the fixed shape is needed).
2. **A model swap is one reference assignment.** Each batch reads ``self._served`` once and runs to the end on that
   immutable snapshot; a new version is loaded beside it and then assigned. In-flight requests finish on the weights
   they started with, the next batch gets the new ones, and no request waits for a load.
3. **Bad input never reaches the model.** The ingress validates the body (pydantic, unknown fields rejected) and
   the cost; the sampler checks what depends on the model (class labels, step count, an edit's image size)
   against the snapshot that will run the batch. Every rejection is a 4xx that names the field.
4. **No version serves before its canary passes.** A replica that loads a registered version first samples the
   canary seeds with it and compares the images with those recorded when the version was promoted
   (``pipelines.registry.check_canary``); on a mismatch it keeps serving what it served, says why in the log,
   ``GET /v1/model`` and ``GET /metrics``, and does not try that version again until the alias moves.

``GET /metrics`` serves Prometheus text (``deploy.metrics``): requests by route and status, latency and queue-time
histograms, images and model calls by version, batch sizes and in-flight requests per replica, canary refusals.
"""

# No ``from __future__ import annotations`` here: Serve pickles the deployment classes by value, and FastAPI must
# resolve the route annotations (GenerateRequest) from them at run time, not from strings.
import asyncio
import base64
import hmac
import json
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ddpm import DEFAULT_STEPS, encode_png, make_grid
from ddpm.settings import SettingError, check_settings
from deploy.engine import (Edit, Generated, Job, Queued, Rejected, ServedModel, load_served, network_call,
                           pick_device, run_batch)
from deploy.metrics import CONTENT_TYPE, IngressMetrics, MetricsMiddleware, ReplicaStats
from deploy.schemas import MAX_EDIT_BASE64, MAX_IMAGES, AppArgs, GenerateRequest, InpaintRequest, SamplerConfig

log = logging.getLogger("ray.serve")

# Every other route needs the API key, when one is set. The playground page holds no data and must load to ask for it.
PUBLIC_PATHS = frozenset({"/healthz", "/"})
STATS_TIMEOUT_S = 2.0  # how long GET /metrics waits for a Sampler replica's fresh counters
PLAYGROUND = Path(__file__).with_name("static") / "index.html"
# The largest request body a route reads, refused (413) before anything parses it: /generate's JSON is a few hundred
# bytes, /inpaint's carries two base64 images. Parsing 20 MB of JSON costs seconds of the ingress's CPU.
MAX_BODY_BYTES = 64 * 2**10
MAX_BODY_BYTES_BY_PATH = {"/inpaint": 2 * MAX_EDIT_BASE64 + MAX_BODY_BYTES}


# -- the sampler deployment ---------------------------------------------------------------------------------------
Outcome = Generated | Rejected


class CanaryRefused(Exception):
    """A version whose canary images did not match those recorded at its promotion (the message says by how much)."""


def _replica_id() -> str:
    """This replica's Serve id (unique per replica, stable for its life), for the ``replica`` label of /metrics."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a test calling the class directly)
        return f"pid-{os.getpid()}"


def _count_images(items: list[Queued]) -> int:
    """The size of a batch: images, not requests (a request carries up to 64)."""
    return sum(item.job.num_images for item in items)


class MergingRunner:
    """Runs batches one at a time and merges every batch that queued up while the previous one ran.

    ``@serve.batch`` gathers concurrent requests into batches, but in Ray 2.60 it closes each batch
    ``batch_wait_timeout_s`` after its first request even while the previous batch is still running. Under load
    that makes a row of small batches waiting their turn, and with a fixed forward size a small batch costs as much
    as a full one. So batches are handed to this runner instead, which starts the next run the moment the last one
    ends, with everything that waited meanwhile (whole batches, in arrival order, up to ``max_images``).
    """

    def __init__(self, run: Callable[[list[Queued]], Awaitable[list[Outcome]]], max_images: int):
        self.run = run
        self.max_images = max_images
        self._waiting: deque[tuple[list[Queued], asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def submit(self, batch: list[Queued]) -> list[Outcome]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            taken, images = [], 0
            while self._waiting:
                batch, future = self._waiting[0]
                if future.done():  # cancelled: its client went away while it waited
                    self._waiting.popleft()
                    continue
                if taken and images + _count_images(batch) > self.max_images:
                    break
                taken.append(self._waiting.popleft())
                images += _count_images(batch)
            if not taken:
                return
            try:
                outcomes = await self.run([item for batch, _ in taken for item in batch])
            except Exception as exc:  # a failed run fails its own requests, not the runner
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for batch, future in taken:
                if not future.done():
                    future.set_result(outcomes[start:start + len(batch)])
                start += len(batch)


# A health check every 2 s instead of Serve's 10: a dead replica is noticed and replaced that much sooner
# (tests/reliability/test_serve_faults.py; the recovery times are in benchmarks/RESULTS.md).
@serve.deployment(name="Sampler", max_ongoing_requests=64, health_check_period_s=2)
class Sampler:
    """Holds one model on its device and samples for the ingress; configured through ``user_config``.

    Serve calls :meth:`reconfigure` once before the replica takes traffic and again, in place, whenever the
    ``user_config`` in the Serve config changes (a new ``model_uri`` swaps the model without restarting anything).
    With an alias URI the replica also polls the registry and swaps when the alias moves.
    """

    def __init__(self):
        self.device = pick_device()
        self.config: SamplerConfig | None = None
        self._served: ServedModel | None = None
        self._load_lock = asyncio.Lock()  # one load at a time, so an older load never overwrites a newer one
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")  # keeps the event loop free
        self._runner = MergingRunner(self._run, max_images=64)
        self._watcher: asyncio.Task | None = None
        self.load_error: str | None = None  # why the last model swap was refused (GET /v1/model shows it)
        self.stats = ReplicaStats(_replica_id())  # GET /metrics
        self.gate: dict = {}  # the served version's gate record (gate.* tags), for GET /v1/model
        self.canary: dict = {}  # the served version's canary verdict, for GET /v1/model
        self.canary_refused: dict | None = None  # the last version its canary refused, until a swap succeeds
        self._refused: tuple[str | None, str | None] | None = None  # (name, version) its canary refused

    async def reconfigure(self, user_config: dict) -> None:
        config = SamplerConfig(**user_config)
        old = self.config
        if old is None:
            await self._load(config)  # raises on failure: a replica without a model must not start
        elif (old.model_uri, old.tracking_uri) != (config.model_uri, config.tracking_uri):
            try:
                await self._load(config)
            except Exception as exc:
                # Raising here would make Serve stop this live replica, and the endpoint with it. Refuse the new
                # model instead: keep serving the old one, say why in the log and in GET /v1/model, and keep the
                # old URI so that deploying the same URI again (once its files are fixed) retries the load.
                if not isinstance(exc, CanaryRefused):
                    self.stats.refuse("load")
                self.load_error = f"{config.model_uri}: {exc}"
                log.error("refused to swap in %s; still serving %s", self.load_error, old.model_uri)
                config = config.model_copy(update={"model_uri": old.model_uri, "tracking_uri": old.tracking_uri})
        self.config = config
        self._batched.set_max_batch_size(config.max_batch_images)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._runner.max_images = config.max_batch_images
        if self._watcher is not None:
            self._watcher.cancel()
        served = self._served
        if served.alias is not None and config.poll_interval_s > 0:
            self._watcher = asyncio.create_task(self._follow_alias(config))

    async def _load(self, config: SamplerConfig) -> None:
        """Load ``config.model_uri``, run its canary, and swap it in; raises :class:`CanaryRefused` (and keeps the
        current model) when the canary fails."""
        async with self._load_lock:
            served = await asyncio.to_thread(load_served, config.model_uri, config.tracking_uri, self.device)
            verdict, gate = await asyncio.to_thread(self._check, served, config)
            record = verdict.to_dict() | {"name": served.name, "version": served.version}
            self.stats.canary = record
            if verdict.refused:
                self.stats.refuse("canary")
                self.canary_refused = record
                raise CanaryRefused(verdict.detail)
            if self._served is not None:
                self.stats.swaps += 1
            self._served = served  # the swap: batches already running keep the snapshot they read
            self.gate, self.canary, self.canary_refused = gate, record, None
            self.stats.model = served.identity()
            self.load_error = None
            self._refused = None
        log.info("serving %s version %s (alias %s) on %s; canary %s%s", served.name or config.model_uri,
                 served.version, served.alias, served.device, verdict.status,
                 f" (score {verdict.score:.3g} <= {verdict.tolerance:g})" if verdict.score is not None else
                 f" ({verdict.detail})")

    def _check(self, served: ServedModel, config: SamplerConfig):
        """The canary's verdict on ``served`` with this replica's own forward, and the version's gate record."""
        from pipelines.registry import check_canary, gate_summary

        forward = network_call(served, config.micro_batch if config.batching else None)
        verdict = check_canary(served.loaded, served.name, served.version, config.tracking_uri, forward=forward)
        gate = {}
        if served.version is not None:
            try:
                gate = gate_summary(served.name, served.version, config.tracking_uri)
            except Exception:  # the gate record is for people; its absence never stops a load
                gate = {}
        return verdict, gate

    async def _follow_alias(self, config: SamplerConfig) -> None:
        """Every ``poll_interval_s``, look up the alias; load and swap in the version it points at when it moved."""
        from pipelines.registry import current_version

        while True:
            await asyncio.sleep(config.poll_interval_s)
            served = self._served
            version = None
            try:
                version = await asyncio.to_thread(current_version, served.name, served.alias, config.tracking_uri)
                if version != served.version and self._refused != (served.name, version):
                    log.info("models:/%s@%s moved from version %s to %s", served.name, served.alias,
                             served.version, version)
                    await self._load(config)
            except CanaryRefused as exc:  # not retried until the alias moves again: the weights will not change
                self._refused = (served.name, version)
                self.load_error = f"models:/{served.name}/{version}: canary refused: {exc}"
                log.error("refused models:/%s/%s: %s; still serving version %s", served.name, version, exc,
                          served.version)
            except Exception as exc:  # an unreachable registry must not take the model down: retry next time
                if version is not None:
                    self.stats.refuse("load")
                self.load_error = f"models:/{served.name}@{served.alias}: {exc}"
                log.warning("could not follow models:/%s@%s (still serving version %s): %s", served.name,
                            served.alias, served.version, exc)

    async def model_info(self) -> dict:
        return self._served.describe() | {"load_error": self.load_error, "canary": self.canary,
                                          "canary_refused": self.canary_refused, "gate": self.gate,
                                          "replica": self.stats.replica}

    async def stats_snapshot(self) -> dict:
        """This replica's counters for GET /metrics (deploy.metrics.ReplicaStats)."""
        return self.stats.snapshot()

    async def generate(self, job: Job, with_stats: bool = True) -> tuple[Outcome, dict | None]:
        """The job's outcome, and a snapshot of this replica's counters for the ingress's GET /metrics (None when
        the ingress's metrics are switched off)."""
        item = Queued(job, time.monotonic())
        self.stats.inflight += 1
        try:
            if self.config.batching:
                outcome = await self._batched(item)
            else:
                outcome = (await self._run([item]))[0]
        finally:
            self.stats.inflight -= 1
        return outcome, self.stats.snapshot() if with_stats else None

    # Up to 64 batches may be open at once (max_ongoing_requests bounds the requests anyway): they must reach the
    # runner while it is busy, to be merged, instead of waiting in @serve.batch's own queue one at a time. (Serve
    # logs a warning that 64 * 64 exceeds max_ongoing_requests; it counts max_batch_size in requests, here images.)
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, max_concurrent_batches=64, batch_size_fn=_count_images)
    async def _batched(self, items: list[Queued]) -> list[Outcome]:
        return await self._runner.submit(items)

    async def _run(self, items: list[Queued]) -> list[Outcome]:
        served = self._served  # the snapshot this batch runs on to the end, whatever swaps happen meanwhile
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._compute, run_batch, served, items, self.config.micro_batch)
        ran = next((o.batch for o in outcomes if isinstance(o, Generated)), None)
        if ran is not None:
            self.stats.batch(ran["requests"], ran["images"])
        return outcomes


# -- the HTTP ingress -----------------------------------------------------------------------------------------------
api = FastAPI(
    title="DDPM sampler",
    description="POST /generate samples images from the served diffusion model; POST /inpaint fills the white part "
                "of a mask in an image with it; GET /v1/model describes it.",
)


def _route_path(request: Request) -> str:
    """The request's path inside the application, without the Serve route prefix."""
    return _route_path_of(request.scope)


def _route_path_of(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


@api.middleware("http")
async def limit_body_size(request: Request, call_next):
    """A body over its route's limit is a 413. Registered before (so run after) the API key check: a client
    without the key learns nothing, and a chunked body (no Content-Length) is read only for a client with it."""
    limit = MAX_BODY_BYTES_BY_PATH.get(_route_path(request), MAX_BODY_BYTES)
    too_large = f"request body too large: this route reads at most {limit} bytes"
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > limit:
            return JSONResponse({"detail": f"{too_large}, Content-Length says {length}"}, status_code=413)
    elif request.method in ("POST", "PUT", "PATCH"):
        # A chunked body has no length up front: read it chunk by chunk and stop at the limit, so that a client
        # streaming gigabytes costs at most ``limit`` bytes of memory here.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return JSONResponse({"detail": f"{too_large}; stopped reading a chunked body there"},
                                    status_code=413)
            chunks.append(chunk)
        # Starlette's middleware hands a cached ``_body`` to the route (starlette.middleware.base._CachedRequest).
        request._body = b"".join(chunks)
    return await call_next(request)


@api.middleware("http")
async def require_api_key(request: Request, call_next):
    """With an API key set, every route but /healthz needs ``Authorization: Bearer <key>``, compared in constant
    time so that response times leak nothing about the key."""
    key: SecretStr | None = getattr(request.app.state, "api_key", None)
    if key is not None and _route_path(request) not in PUBLIC_PATHS:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            return JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer <key>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


# Outermost (added last): counts every answer, the 401s and 413s of the middlewares above included.
api.add_middleware(MetricsMiddleware, route_of=lambda scope: _route_path_of(scope))


def _echo(value, limit: int = 200):
    """What a 422 shows of an offending input: the value itself when it is small, plain JSON, else a clipped repr."""
    try:
        text = json.dumps(value, allow_nan=False)
        if len(text) <= limit:
            return value
    except (TypeError, ValueError):  # bytes, NaN, infinity
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, except for each error's ``input``: the default handler echoes a large body back whole, and
    fails with a 500 on an input it cannot encode (a body that is not UTF-8, a NaN)."""
    errors = [error | {"input": _echo(error["input"])} if "input" in error else error for error in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def _reject(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, so clients parse one format."""
    return HTTPException(422, detail=[{"type": "value_error", "loc": ["body", field], "msg": message}])


def _base64(field: str, text: str) -> bytes:
    """The bytes of a base64 field; a ``data:image/png;base64,`` prefix (a browser canvas's URL) is allowed."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        raise _reject(field, "not valid base64 (standard alphabet, with padding)") from None


def _job(body: GenerateRequest, edit: Edit | None = None) -> Job:
    """The body's job with its defaults filled in (the sampler's step count, a random seed when none is given), after
    the rules every door applies (``ddpm.settings.check_settings``, what ``ddpm generate`` and the pyfunc model use)."""
    resample = {} if edit is None else {"resample_jumps": edit.resample_jumps, "resample_times": edit.resample_times}
    try:
        check_settings(sampler=body.sampler, steps=body.steps, eta=body.eta, seed=body.seed,
                       class_label=body.class_label, guidance_scale=body.guidance_scale, **resample)
    except SettingError as exc:
        raise _reject(exc.field, exc.reason) from None
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    steps = body.steps if body.steps is not None else DEFAULT_STEPS[body.sampler]
    return Job(body.num_images, body.sampler, steps, body.eta, seed, body.class_label, body.guidance_scale, edit)


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
        self.metrics = IngressMetrics()
        self.metrics_on = True
        api.state.metrics = self.metrics  # read by MetricsMiddleware

    async def set_metrics(self, enabled: bool) -> None:
        """Switch the metrics' bookkeeping on or off at run time, through a Serve handle (not over HTTP):
        benchmarks/soak.py measures what it costs. Off, GET /metrics serves the numbers as they stood."""
        self.metrics_on = bool(enabled)
        api.state.metrics = self.metrics if self.metrics_on else None

    async def _sample(self, job: Job) -> Outcome:
        """The sampler's outcome for ``job``. A replica that dies mid-request (killed, out of memory) costs one retry
        on another replica, not the request: a job is a pure function of its seed, so the retry gives the same
        images. A second loss is a 503 that says to retry."""
        for attempt in (1, 2):
            try:
                outcome, stats = await self.sampler.generate.remote(job, self.metrics_on)
                self.metrics.replica(stats)
                return outcome
            except RayActorError as exc:
                log.warning("sampler replica lost during a request (attempt %d of 2): %s", attempt, exc)
        raise HTTPException(503, "the sampler replica was lost while sampling; retry in a few seconds",
                            headers={"Retry-After": "5"})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground page (deploy/static/index.html): static, so public; it asks for the API key itself."""
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @api.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(self) -> Response:
        """Prometheus text (deploy.metrics); needs the API key when one is set, like every route but /healthz."""
        try:  # a fresh snapshot of one replica's counters (every replica's arrive with the requests it answers)
            self.metrics.replica(await asyncio.wait_for(self.sampler.stats_snapshot.remote(), STATS_TIMEOUT_S))
        except Exception as exc:  # a busy or lost replica: serve what is known rather than nothing
            log.warning("GET /metrics: no fresh counters from a Sampler replica: %s", exc)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/v1/model")
    async def model(self) -> dict:
        return await self.sampler.model_info.remote() | {"max_num_images": MAX_IMAGES, "max_cost": self.max_cost}

    @api.post("/generate")
    async def generate(self, body: GenerateRequest = Body(default_factory=GenerateRequest)) -> Response:
        started = time.monotonic()
        return await self._answer(_job(body), body.output, started)

    @api.post("/inpaint")
    async def inpaint(self, body: InpaintRequest) -> Response:
        """Fill the white part of ``mask`` in ``image``; answers like ``/generate``, one image per seed."""
        started = time.monotonic()
        edit = Edit(_base64("image", body.image), _base64("mask", body.mask), body.resize, body.resample_jumps,
                    body.resample_times)
        return await self._answer(_job(body, edit), body.output, started)

    async def _answer(self, job: Job, output: str, started: float) -> Response:
        """Check the job's cost, run it on the sampler, and encode its images as one PNG grid or as JSON."""
        calls = job.model_calls()
        if job.num_images * calls > self.max_cost:
            if calls == job.steps:
                raise _reject("steps", f"num_images * steps = {job.num_images} * {calls} = {job.num_images * calls} "
                                       f"exceeds this server's budget of {self.max_cost} image-steps per request")
            raise _reject("resample_times", f"num_images * model calls = {job.num_images} * {calls} = "
                                            f"{job.num_images * calls} (steps plus RePaint's resampling) exceeds "
                                            f"this server's budget of {self.max_cost} image-steps per request")
        outcome = await self._sample(job)
        if isinstance(outcome, Rejected):
            raise _reject(outcome.field, outcome.message)
        if self.metrics_on:
            guided = job.class_label is not None and job.guidance_scale != 1.0  # two network rows per image
            images = len(outcome.images)
            self.metrics.generated(outcome.model, images, images * calls * (2 if guided else 1),
                                   outcome.timings_ms["queue"] / 1000)

        if output == "png":
            headers = {"X-Seed": str(job.seed), "X-Batch-Requests": str(outcome.batch["requests"]),
                       "X-Batch-Images": str(outcome.batch["images"])}
            if outcome.model["version"] is not None:  # a checkpoint folder has no name or version
                headers |= {"X-Model-Name": outcome.model["name"], "X-Model-Version": outcome.model["version"]}
            return Response(encode_png(make_grid(outcome.images)), media_type="image/png", headers=headers)
        encode_started = time.monotonic()
        images = [base64.b64encode(encode_png(image)).decode("ascii") for image in outcome.images]
        done = time.monotonic()
        timings = outcome.timings_ms | {"encode": (done - encode_started) * 1000, "total": (done - started) * 1000}
        return JSONResponse({"images": images, "seeds": outcome.seeds, "model": outcome.model,
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
