"""The Sampler deployment: one model per replica, on its device, and its lifecycle.

It loads the model (``deploy.engine.load_served``), runs its canary before serving it, follows a registry alias and
swaps weights without downtime, and samples for the ingress: ``@serve.batch`` gathers concurrent requests, the
merging runner (``deploy.batching``) joins the batches that waited, and ``deploy.engine.run_batch`` checks each job
against the snapshot that runs it (settings, cost) and calls the core.

**A model swap is one reference assignment.** Each batch reads ``self._served`` once and runs to the end on that
immutable snapshot; a new version is loaded beside it and then assigned. In-flight requests finish on the weights
they started with, the next batch gets the new ones, and no request waits for a load.

**No version serves before its canary passes.** A replica that loads a registered version first samples the canary
seeds with it and compares the images with those recorded when the version was promoted
(``pipelines.registry.check_canary``); on a mismatch it keeps serving what it served, says why in the log,
``GET /v1/model`` and ``GET /metrics``, and does not try that version again until the alias moves.
"""

# No ``from __future__ import annotations`` here: Serve pickles the deployment class by value.
import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from deploy.batching import MergingRunner, count_images
from deploy.engine import (Cancelled, Control, Generated, Job, Outcome, Queued, ServedModel, load_served,
                           network_call, pick_device, precheck, run_batch)
from deploy.metrics import ReplicaStats
from deploy.schemas import SamplerConfig

log = logging.getLogger("ray.serve")
PROGRESS_INTERVAL_S = 0.1  # the most often a stream reports progress: DDPM-1000 would otherwise send 1,000 events


class CanaryRefused(Exception):
    """A version whose canary images did not match those recorded at its promotion (the message says by how much)."""


def _replica_id() -> str:
    """This replica's Serve id (unique per replica, stable for its life), for the ``replica`` label of /metrics."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a test calling the class directly)
        return f"pid-{os.getpid()}"


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
                                          "replica": self.stats.replica, "max_cost": self.config.max_cost}

    async def stats_snapshot(self) -> dict:
        """This replica's counters for GET /metrics (deploy.metrics.ReplicaStats)."""
        return self.stats.snapshot()

    async def generate(self, job: Job, with_stats: bool = True) -> tuple[Outcome, dict | None]:
        """The job's outcome, and a snapshot of this replica's counters for the ingress's GET /metrics (None when
        the ingress's metrics are switched off)."""
        outcome = await self._outcome(Queued(job, time.monotonic()))
        return outcome, self.stats.snapshot() if with_stats else None

    async def generate_stream(self, job: Job, with_stats: bool = True):
        """``generate`` as a stream (a Serve streaming call): ("accepted", None) or ("rejected", Rejected) first,
        checked against the model before the job queues; then ("progress", {step, steps, images_done}) after each
        model call of the job (at most every ``PROGRESS_INTERVAL_S``, the last one always); then ("outcome",
        (Outcome, stats)). Closing the stream cancels the job like a disconnected client."""
        rejected = await asyncio.to_thread(precheck, job, self._served, self.config.max_cost)
        if rejected is not None:
            yield "rejected", rejected
            return
        yield "accepted", None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        last = [0.0]

        def progress(step: int, steps: int, images_done: int) -> None:  # on the sampling thread
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL_S or step == steps:
                last[0] = now
                loop.call_soon_threadsafe(events.put_nowait, {"step": step, "steps": steps,
                                                              "images_done": images_done})

        task = asyncio.create_task(self._outcome(Queued(job, time.monotonic(), Control(progress))))
        task.add_done_callback(lambda _: events.put_nowait(None))  # after every progress event already posted
        try:
            while (event := await events.get()) is not None:
                yield "progress", event
            yield "outcome", (await task, self.stats.snapshot() if with_stats else None)
        finally:
            task.cancel()  # the stream was closed early (GeneratorExit or CancelledError): the job leaves its batch

    async def _outcome(self, item: Queued) -> Outcome:
        """Run ``item`` (batched or alone). A cancelled caller (the client went away) takes its rows out of the
        running batch at the next model call (``Control``); what that saved is counted here or by :meth:`_run`."""
        self.stats.inflight += 1
        try:
            if self.config.batching:
                return await self._batched(item)
            # Shielded: a cancelled caller must not stop _run from counting what the cancellation saved.
            return (await asyncio.shield(self._run([item])))[0]
        except asyncio.CancelledError:
            if item.control.cancel():  # no run had taken it: all of it is saved
                self.stats.cancel(item.job.num_images * item.job.model_calls())
            raise
        finally:
            self.stats.inflight -= 1

    # Up to 64 batches may be open at once (max_ongoing_requests bounds the requests anyway): they must reach the
    # runner while it is busy, to be merged, instead of waiting in @serve.batch's own queue one at a time. (Serve
    # logs a warning that 64 * 64 exceeds max_ongoing_requests; it counts max_batch_size in requests, here images.)
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, max_concurrent_batches=64, batch_size_fn=count_images)
    async def _batched(self, items: list[Queued]) -> list[Outcome]:
        return await self._runner.submit(items)

    async def _run(self, items: list[Queued]) -> list[Outcome]:
        served = self._served  # the snapshot this batch runs on to the end, whatever swaps happen meanwhile
        loop = asyncio.get_running_loop()
        outcomes = await loop.run_in_executor(self._compute, run_batch, served, items, self.config.micro_batch,
                                              self.config.max_cost)
        ran = next((o.batch for o in outcomes if isinstance(o, Generated)), None)
        if ran is not None:
            self.stats.batch(ran["requests"], ran["images"])
        for outcome in outcomes:
            if isinstance(outcome, Cancelled) and outcome.ran:  # the others were counted as their callers left
                self.stats.cancel(outcome.image_steps_saved)
        return outcomes

