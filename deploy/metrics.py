"""The endpoint's Prometheus metrics: what ``GET /metrics`` serves, in the text exposition format (version 0.0.4).

Two sources, one page:

- **The ingress** counts what it sees of every request: route and status, latency, the time a job queued in a sampler
  replica, images generated and model calls by model version, requests in flight. An ASGI middleware (not
  Starlette's ``BaseHTTPMiddleware``: no extra task and queue per request) times each request and reads its status.
- **Each Sampler replica** counts its batches (images and requests per batch), its requests in flight and its model
  swaps, including those its canary refused. A replica returns a snapshot of its counters with every outcome, and
  ``/metrics`` asks one replica for a fresh one; the ingress keeps the newest snapshot of each replica (by sequence
  number) and exports it with a ``replica`` label. With one replica (the default) every number is current; with
  several, a replica's numbers are as of its last answer.

Plain Python, no Ray and no FastAPI. ``prometheus_client``'s parser and
``promtool check metrics`` read what it writes (tests/deploy/test_operations.py). The numbers live in the replicas'
memory: they restart from zero with a replica, which Prometheus's ``rate()`` expects of a counter.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a 5 ms answer to a minute-long DDPM request; dense between 0.25 and 5 s, where a loaded CPU
# endpoint's requests fall, so that quantiles read from them are not pinned to a bucket's edge.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0,
                   30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images (or requests) per batch
# Routes get their own label value; anything else (a scanner's guesses) is "other", so that label sets stay few.
ROUTES = frozenset({"/generate", "/inpaint", "/edit", "/v1/model", "/healthz", "/metrics", "/", "/docs",
                    "/openapi.json"})
MAX_REPLICAS = 64  # snapshots kept, newest first; older ones belong to replicas long gone


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class Histogram:
    """Cumulative-bucket histogram, as Prometheus exports it."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bucket (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}

    @classmethod
    def from_dict(cls, data: dict) -> "Histogram":
        h = cls(tuple(data["buckets"]))
        h.counts, h.sum, h.count = list(data["counts"]), float(data["sum"]), int(data["count"])
        return h


# -- a Sampler replica's counters -----------------------------------------------------------------------------------
class ReplicaStats:
    """What one Sampler replica counts; :meth:`snapshot` is the plain dict it sends to the ingress."""

    def __init__(self, replica: str):
        self.replica = replica
        self.seq = 0
        self.batch_images = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.inflight = 0
        self.swaps = 0  # versions switched to after the first load
        self.refused: dict[str, int] = {}  # reason ("canary", "load") -> count
        self.model: dict = {}  # name, version, alias of what it serves
        self.canary: dict = {}  # the last canary verdict (CanaryVerdict.to_dict) and its version
        self.cancelled = 0  # requests whose client went away before their images were finished
        self.image_steps_saved = 0  # what those requests had still to run: images x model calls

    def batch(self, requests: int, images: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_images.observe(images)

    def cancel(self, image_steps_saved: int) -> None:
        self.cancelled += 1
        self.image_steps_saved += image_steps_saved

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def snapshot(self) -> dict:
        self.seq += 1
        return {"replica": self.replica, "seq": self.seq, "batch_images": self.batch_images.to_dict(),
                "batch_requests": self.batch_requests.to_dict(), "inflight": self.inflight, "swaps": self.swaps,
                "refused": dict(self.refused), "model": dict(self.model), "canary": dict(self.canary),
                "cancelled": self.cancelled, "image_steps_saved": self.image_steps_saved}


# -- the ingress's registry -----------------------------------------------------------------------------------------
@dataclass
class IngressMetrics:
    """Everything ``GET /metrics`` exports; one per ingress replica (one event loop: no locks needed)."""

    requests: dict = field(default_factory=dict)  # (route, status) -> count
    latency: dict = field(default_factory=dict)  # route -> Histogram of seconds
    queue: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    images: dict = field(default_factory=dict)  # (model, version) -> images generated
    model_calls: dict = field(default_factory=dict)  # (model, version) -> network evaluations, summed over images
    inflight: int = 0
    replicas: dict = field(default_factory=dict)  # replica -> its newest snapshot
    started: float = field(default_factory=time.time)

    def request(self, route: str, status: int, seconds: float) -> None:
        key = (route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.latency.get(route)
        if histogram is None:
            histogram = self.latency[route] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def generated(self, model: dict, images: int, model_calls: int, queue_s: float) -> None:
        key = (model.get("name") or "", model.get("version") or "")
        self.images[key] = self.images.get(key, 0) + images
        self.model_calls[key] = self.model_calls.get(key, 0) + model_calls
        self.queue.observe(queue_s)

    def replica(self, snapshot: dict | None) -> None:
        """Keep ``snapshot`` if it is the newest of its replica."""
        if not snapshot:
            return
        name = snapshot["replica"]
        kept = self.replicas.get(name)
        if kept is None or snapshot["seq"] > kept["seq"]:
            self.replicas.pop(name, None)
            self.replicas[name] = snapshot  # re-inserted: the dict's order is oldest to newest update
            while len(self.replicas) > MAX_REPLICAS:
                self.replicas.pop(next(iter(self.replicas)))

    # -- the text format --------------------------------------------------------------------------------------------
    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("ddpm_requests_total", "counter", "HTTP requests answered, by route and status code.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f"ddpm_requests_total{_labels(route=route, status=status)} {n}")
        family("ddpm_request_duration_seconds", "histogram",
               "Time from a request's arrival at the ingress to the end of its answer.")
        for route, h in sorted(self.latency.items()):
            _histogram(out, "ddpm_request_duration_seconds", h, route=route)
        family("ddpm_queue_duration_seconds", "histogram",
               "Time a generation job waited in a Sampler replica before its batch started.")
        _histogram(out, "ddpm_queue_duration_seconds", self.queue)
        family("ddpm_images_generated_total", "counter", "Images returned, by the model version that made them.")
        for (model, version), n in sorted(self.images.items()):
            out.append(f"ddpm_images_generated_total{_labels(model=model, version=version)} {n}")
        family("ddpm_model_calls_total", "counter",
               "Network evaluations per image (steps, RePaint's resampling, x2 with classifier-free guidance), "
               "summed over the images returned.")
        for (model, version), n in sorted(self.model_calls.items()):
            out.append(f"ddpm_model_calls_total{_labels(model=model, version=version)} {n}")
        family("ddpm_ingress_inflight_requests", "gauge", "Requests the ingress is answering now.")
        out.append(f"ddpm_ingress_inflight_requests {self.inflight}")

        replicas = sorted(self.replicas.values(), key=lambda s: s["replica"])
        family("ddpm_sampler_inflight_requests", "gauge", "Jobs a Sampler replica holds (queued or running).")
        for s in replicas:
            out.append(f"ddpm_sampler_inflight_requests{_labels(replica=s['replica'])} {s['inflight']}")
        for metric, key, what in (("ddpm_batch_images", "batch_images", "Images per batch a Sampler replica ran."),
                                  ("ddpm_batch_requests", "batch_requests",
                                   "Requests per batch a Sampler replica ran.")):
            family(metric, "histogram", what)
            for s in replicas:
                _histogram(out, metric, Histogram.from_dict(s[key]), replica=s["replica"])
        family("ddpm_model_info", "gauge", "The model version each Sampler replica serves (value 1).")
        for s in replicas:
            m = s["model"]
            labels = _labels(replica=s["replica"], model=m.get("name") or "", version=m.get("version") or "",
                             alias=m.get("alias") or "")
            out.append(f"ddpm_model_info{labels} 1")
        family("ddpm_model_swaps_total", "counter", "Model versions a Sampler replica switched to after its first.")
        for s in replicas:
            out.append(f"ddpm_model_swaps_total{_labels(replica=s['replica'])} {s['swaps']}")
        family("ddpm_model_swaps_refused_total", "counter",
               "Model versions a Sampler replica refused to switch to: reason canary (its images did not match "
               "those recorded at promotion) or load (it could not be loaded).")
        for s in replicas:
            for reason in ("canary", "load"):
                out.append(f"ddpm_model_swaps_refused_total{_labels(replica=s['replica'], reason=reason)} "
                           f"{s['refused'].get(reason, 0)}")
        family("ddpm_cancelled_requests_total", "counter",
               "Requests whose client went away before their images were finished (their rows left the batch).")
        for s in replicas:
            out.append(f"ddpm_cancelled_requests_total{_labels(replica=s['replica'])} {s['cancelled']}")
        family("ddpm_cancelled_image_steps_total", "counter",
               "What cancelled requests had still to run when they left, in images x model calls: work saved.")
        for s in replicas:
            out.append(f"ddpm_cancelled_image_steps_total{_labels(replica=s['replica'])} "
                       f"{s['image_steps_saved']}")
        family("ddpm_canary_score", "gauge",
               "The last canary's mean absolute difference from the reference, in 0-255 pixel levels, by version.")
        for s in replicas:
            c = s["canary"]
            if c.get("score") is not None:
                labels = _labels(replica=s["replica"], version=c.get("version") or "", status=c.get("status") or "")
                out.append(f"ddpm_canary_score{labels} {_number(c['score'])}")
        family("ddpm_ingress_start_time_seconds", "gauge", "When this ingress replica started (Unix time).")
        out.append(f"ddpm_ingress_start_time_seconds {_number(self.started)}")
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _histogram(out: list[str], name: str, h: Histogram, **labels) -> None:
    cumulative = 0
    for bound, n in zip(h.buckets, h.counts):
        cumulative += n
        out.append(f"{name}_bucket{_labels(**labels, le=_number(bound))} {cumulative}")
    out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {h.count}")
    out.append(f"{name}_sum{_labels(**labels)} {_number(h.sum)}")
    out.append(f"{name}_count{_labels(**labels)} {h.count}")


class MetricsMiddleware:
    """ASGI middleware: each HTTP request's route, status and duration into ``app.state.metrics``
    (an :class:`IngressMetrics`, set by the ingress); a no-op until it is set."""

    def __init__(self, app, route_of):
        self.app = app
        self.route_of = route_of  # scope -> the route inside the application (without Serve's route prefix)

    async def __call__(self, scope, receive, send):
        metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None) if scope["type"] == "http" \
            else None
        if metrics is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.inflight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.inflight -= 1
            metrics.request(route_label(self.route_of(scope)), status, time.perf_counter() - started)
