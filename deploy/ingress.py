"""The HTTP front of the endpoint: the FastAPI app, its middlewares and the Ingress deployment's routes.

The ingress holds no model and reserves no CPU. It checks the API key and the body's size (middlewares), parses the
body (pydantic, unknown fields rejected: a 422 naming the field), applies the rules every door applies
(``ddpm.settings.check_settings``), sends the job to the Sampler deployment (``deploy.sampler``) and encodes the
images it gets back as one PNG grid or JSON of base64 PNGs. What depends on the model (class labels or prompts,
step count, an edit's image size, the request's cost in U-Net rows) the sampler checks against the snapshot that
runs the job; its refusal comes back here as a 422 naming the field. A text model's answer also says what
tokenizing its prompts lost (``prompt_report`` in JSON, ``X-Prompt-*`` headers with a PNG).
"""

# No ``from __future__ import annotations`` here: Serve pickles the deployment class by value, and FastAPI must
# resolve the route annotations (GenerateRequest) from them at run time, not from strings.
import asyncio
import base64
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from ddpm import DEFAULT_STEPS, encode_png, make_grid
from ddpm.settings import MAX_IMAGES, SettingError, check_settings
from deploy.engine import Edit, Generated, Job, Outcome, Rejected, Variation
from deploy.metrics import CONTENT_TYPE, IngressMetrics, MetricsMiddleware
from deploy.schemas import MAX_EDIT_BASE64, EditRequest, GenerateRequest, InpaintRequest, VariationsRequest

log = logging.getLogger("ray.serve")

# Every other route needs the API key, when one is set. The playground page holds no data and must load to ask for it.
PUBLIC_PATHS = frozenset({"/healthz", "/"})
STATS_TIMEOUT_S = 2.0  # how long GET /metrics waits for a Sampler replica's fresh counters
PLAYGROUND = Path(__file__).with_name("static") / "index.html"
# The largest request body a route reads, refused (413) before anything parses it: /generate's JSON is a few hundred
# bytes, /inpaint's, /edit's and /variations' carry up to two base64 images. Parsing 20 MB of JSON costs seconds of the ingress's CPU.
MAX_BODY_BYTES = 64 * 2**10
MAX_BODY_BYTES_BY_PATH = {path: 2 * MAX_EDIT_BASE64 + MAX_BODY_BYTES for path in ("/inpaint", "/edit", "/variations")}

api = FastAPI(
    title="DDPM sampler",
    description="POST /generate samples images from the served diffusion model; POST /inpaint fills the white part "
                "of a mask in an image with it; POST /edit redraws an image (or its masked part) toward a new prompt "
                "or class; POST /variations draws new images from an image's CLIP embedding (unCLIP's decoder); "
                "GET /v1/model describes it.",
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


def _job(body: GenerateRequest, edit: Edit | None = None, variation: Variation | None = None) -> Job:
    """The body's job with its defaults filled in (the sampler's step count, a random seed when none is given), after
    the rules every door applies (``ddpm.settings.check_settings``, what ``ddpm generate`` and the pyfunc model use)."""
    resample = {} if edit is None else {"resample_jumps": edit.resample_jumps, "resample_times": edit.resample_times,
                                        "strength": edit.strength}
    try:
        check_settings(sampler=body.sampler, steps=body.steps, eta=body.eta, seed=body.seed,
                       class_label=body.class_label, guidance_scale=body.guidance_scale,
                       num_images=body.num_images, prompt=body.prompt, negative_prompt=body.negative_prompt,
                       image=variation, prior_steps=body.prior_steps,
                       prior_guidance_scale=body.prior_guidance_scale, **resample)
    except SettingError as exc:
        raise _reject(exc.field, exc.reason) from None
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    steps = body.steps if body.steps is not None else DEFAULT_STEPS[body.sampler]
    return Job(body.num_images, body.sampler, steps, body.eta, seed, body.class_label, body.guidance_scale, edit,
               prompt=body.prompt, negative_prompt=body.negative_prompt, variation=variation,
               prior_steps=body.prior_steps, prior_guidance_scale=body.prior_guidance_scale)


def _prompt_headers(report: dict) -> dict[str, str]:
    """A text model's PNG answer says what tokenizing lost (``deploy.engine.prompt_report``):
    ``X-Prompt-Dropped-Tokens`` (the prompt's tokens past the context) and, when there are any,
    ``X-Prompt-Warnings`` (the warnings as one JSON list). Header values are Latin-1, and a prompt's words may not
    be: the JSON escapes everything outside ASCII."""
    headers = {"X-Prompt-Dropped-Tokens": str(report.get("prompt", {}).get("dropped_tokens", 0))}
    if report["warnings"]:
        headers["X-Prompt-Warnings"] = json.dumps(report["warnings"], ensure_ascii=True)
    return headers


def _event(name: str, data: dict) -> str:
    """One Server-Sent Event: its name and its data as one line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _json_answer(outcome: Generated, started: float) -> dict:
    """The JSON answer: base64 PNGs, seeds, model, timings (ms), batch, and a text model's prompt report."""
    encode_started = time.monotonic()
    images = [base64.b64encode(encode_png(image)).decode("ascii") for image in outcome.images]
    done = time.monotonic()
    timings = outcome.timings_ms | {"encode": (done - encode_started) * 1000, "total": (done - started) * 1000}
    answer = {"images": images, "seeds": outcome.seeds, "model": outcome.model,
              "timings_ms": {k: round(v, 2) for k, v in timings.items()}, "batch": outcome.batch}
    if outcome.prompt_report is not None:
        answer["prompt_report"] = outcome.prompt_report
    return answer


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Validates, budgets and encodes; the sampling happens in the :class:`Sampler` deployment."""

    def __init__(self, sampler: DeploymentHandle, api_key: SecretStr | None):
        self.sampler = sampler
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
        return await self.sampler.model_info.remote() | {"max_num_images": MAX_IMAGES}

    @api.post("/generate")
    async def generate(self, body: GenerateRequest = Body(default_factory=GenerateRequest)) -> Response:
        started = time.monotonic()
        return await self._answer(_job(body), body, started)

    @api.post("/inpaint")
    async def inpaint(self, body: InpaintRequest) -> Response:
        """Fill the white part of ``mask`` in ``image``; answers like ``/generate``, one image per seed."""
        return await self._edit(body)

    @api.post("/edit")
    async def edit(self, body: EditRequest) -> Response:
        """Edit ``image`` (or the white part of ``mask``) toward the request's prompt or class, keeping its layout
        to a degree set by ``strength`` (SDEdit); answers like ``/generate``, one image per seed."""
        return await self._edit(body)

    @api.post("/variations")
    async def variations(self, body: VariationsRequest) -> Response:
        """New images from ``image``'s CLIP embedding through unCLIP's decoder, one per seed; with ``toward``, from
        the slerp of the two images' embeddings at ``mix``. Answers like ``/generate``. A model that is not unCLIP's
        decoder refuses it (422, ``image``)."""
        started = time.monotonic()
        toward = None if body.toward is None else _base64("toward", body.toward)
        variation = Variation(_base64("image", body.image), body.resize, toward,
                              0.5 if body.mix is None else body.mix)
        return await self._answer(_job(body, variation=variation), body, started)

    async def _edit(self, body: EditRequest) -> Response:
        started = time.monotonic()
        mask = None if body.mask is None else _base64("mask", body.mask)
        edit = Edit(_base64("image", body.image), mask, body.resize, body.resample_jumps, body.resample_times,
                    body.strength)
        return await self._answer(_job(body, edit), body, started)

    async def _answer(self, job: Job, body: GenerateRequest, started: float) -> Response:
        """Run the job on the sampler (which checks it against the model, its cost included) and encode its images as
        one PNG grid or as JSON, or as a stream of events (:meth:`_stream`)."""
        if body.stream:
            if "output" in body.model_fields_set and body.output != "json":
                raise _reject("output", "a stream sends its result as JSON (event: result): leave output out or "
                                        "set it to json")
            return await self._stream(job, started)
        outcome = await self._sample(job)
        if isinstance(outcome, Rejected):
            raise _reject(outcome.field, outcome.message)
        self._count(job, outcome)
        if body.output == "png":
            headers = {"X-Seed": str(job.seed), "X-Batch-Requests": str(outcome.batch["requests"]),
                       "X-Batch-Images": str(outcome.batch["images"])}
            if outcome.model["version"] is not None:  # a checkpoint folder has no name or version
                headers |= {"X-Model-Name": outcome.model["name"], "X-Model-Version": outcome.model["version"]}
            if outcome.prompt_report is not None:
                headers |= _prompt_headers(outcome.prompt_report)
            return Response(encode_png(make_grid(outcome.images)), media_type="image/png", headers=headers)
        return JSONResponse(_json_answer(outcome, started))

    def _count(self, job: Job, outcome: Generated) -> None:
        if self.metrics_on:
            images = len(outcome.images)
            self.metrics.generated(outcome.model, images, images * job.network_rows(),
                                   outcome.timings_ms["queue"] / 1000)

    async def _stream(self, job: Job, started: float) -> StreamingResponse:
        """Server-Sent Events: ``progress`` ({step, steps, images_done, num_images}) as the sampler runs the job,
        then ``result`` (the JSON answer) or ``error`` ({status, detail}). A refusal the sampler finds before the
        job queues is a plain 422, like the non-streaming answer's. A client that closes the stream cancels the job:
        Serve cancels this request and the sampler's call with it, and the job's images leave their batch."""
        events = self.sampler.options(stream=True).generate_stream.remote(job, self.metrics_on)
        kind, value = await events.__anext__()  # "accepted", or "rejected" before anything was queued
        if kind == "rejected":
            raise _reject(value.field, value.message)

        async def source():
            try:
                async for kind, value in events:
                    if kind == "progress":
                        yield _event("progress", value | {"num_images": job.num_images})
                        continue
                    outcome, stats = value
                    self.metrics.replica(stats)
                    if isinstance(outcome, Rejected):  # a model swapped in meanwhile refused it
                        yield _event("error", {"status": 422, "detail": [{"type": "value_error",
                                                                          "loc": ["body", outcome.field],
                                                                          "msg": outcome.message}]})
                    else:
                        self._count(job, outcome)
                        yield _event("result", _json_answer(outcome, started))
            except RayActorError as exc:
                log.warning("sampler replica lost during a streamed request: %s", exc)
                yield _event("error", {"status": 503, "detail": "the sampler replica was lost while sampling; "
                                                                "retry in a few seconds"})
            finally:
                events.cancel()  # a no-op once the stream is finished; else the job leaves its batch

        return StreamingResponse(source(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Seed": str(job.seed)})

