"""Where runs are tracked, and a logger that keeps training going when the tracking server is not.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a server, ``http://mlflow.internal:5000``); unset means the embedded
default, a SQLite database and an artifact folder under the project's local data folder (``.ddpm/`` in the current
directory, or ``$DDPM_HOME``)::

    .ddpm/mlflow.db        runs, metrics, the model registry
    .ddpm/mlartifacts/     sample grids, logged models

Only the standard library is imported at module level (MLflow inside functions), so ``pipelines.registry`` and
through it Serve can use :func:`tracking_uri` cheaply.

:class:`RunLogger` is what the training loop talks to: it queues metrics, tags and small files and sends them from a
background thread, so a slow or unreachable server never stalls a step. Whatever fails is kept (bounded) and
retried; :meth:`RunLogger.close` says what never got through.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

DEFAULT_HOME = ".ddpm"


def home() -> Path:
    """The project's local data folder: ``$DDPM_HOME``, else ``.ddpm`` in the current directory (absolute)."""
    return Path(os.environ.get("DDPM_HOME") or DEFAULT_HOME).resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded default ``sqlite:///<home>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def client(uri: str | None = None):
    """An ``MlflowClient`` for ``uri`` (default: :func:`tracking_uri`); creates the embedded store's folder."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # Creating or migrating the embedded store logs a dozen INFO lines (MLflow's and alembic's) on stderr,
        # between a command's own lines; what the store did is not the user's business unless it fails.
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (restored if deleted).

    For a SQLite store the artifacts go to ``<folder of the database>/mlartifacts``: MLflow's own default would be
    ``./mlruns`` relative to whatever directory the process happens to run in.
    """
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created by a concurrent process in the meantime
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def redact_uri(uri: str) -> str:
    """``uri`` without user info, query or fragment: where credentials and signed tokens hide in a URI.

    ``https://user:secret@host/x?X-Amz-Signature=...`` -> ``https://host/x``; anything without them (a local path,
    ``sqlite:///abs/path``) comes back unchanged.
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return uri
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def flatten(mapping: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``: a nested config as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


# -- the training-time logger ---------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One queued call: ``kind`` is "metrics" (payload: list of Metric), "tag" ((key, value)) or "file" (Path)."""

    kind: str
    payload: object
    artifact_dir: str = ""
    description: str = ""


class RunLogger:
    """Sends metrics, tags and small files to one MLflow run from a background thread.

    Why a thread: a tracking call is a network round trip, and an unreachable server costs a timeout per call; the
    training loop only appends to a queue. Why a bounded buffer: during an outage items accumulate; past
    ``max_pending`` the oldest metric batches are dropped (and counted), so memory stays flat however long the
    outage. Delivery keeps the order of the calls. A call the server *rejects* (a 4xx answer) is dropped at once and
    reported; any other failure means the server is unreachable and the item is retried every ``retry_s`` seconds.

    MLflow's own HTTP retries (several, with exponential backoff) are turned off in this process
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``): this class does the retrying, on its own schedule.
    """

    def __init__(self, run_id: str, uri: str, *, max_pending: int = 10_000, retry_s: float = 5.0,
                 request_timeout_s: int = 10):
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(request_timeout_s)
        self.run_id, self.uri = run_id, uri
        self._client = client(uri)
        self._max_pending, self._retry_s = max_pending, retry_s
        self._pending: collections.deque[_Item] = collections.deque()
        self._lost: list[str] = []  # descriptions of what will never be logged
        self._dropped_metrics = 0
        self._outage_since: float | None = None
        self._closing = False  # close() called: deliver what is left, then stop
        self._abandoned = False  # close() gave up waiting: stop after the call in flight
        self._in_flight: _Item | None = None  # taken off the queue, not yet delivered
        self._file_count = itertools.count()
        self._files = tempfile.TemporaryDirectory(prefix="ddpm-tracking-")
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- called by the training loop (never blocks on the network) ----------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._put(_Item("metrics", batch, description=f"metrics at step {step}"))

    def set_tag(self, key: str, value: str) -> None:
        self._put(_Item("tag", (key, str(value)), description=f"tag {key}"))

    def log_file(self, data: bytes, artifact_path: str) -> None:
        """Log ``data`` as the artifact ``artifact_path`` (e.g. ``samples/step_000100.png``)."""
        directory, _, name = artifact_path.rpartition("/")
        local = Path(self._files.name) / str(next(self._file_count)) / name
        local.parent.mkdir()
        local.write_bytes(data)
        self._put(_Item("file", local, directory, description=f"artifact {artifact_path}"))

    def close(self, timeout_s: float = 60.0) -> list[str]:
        """Deliver what is queued (waiting at most ``timeout_s``), stop the thread; returns what was not logged.

        A second call returns an empty list.
        """
        if self._abandoned:  # closed before
            return []
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            self._abandoned = True
            self._cond.notify()
            unsent = list(self._pending) + ([self._in_flight] if self._in_flight is not None else [])
            lost = list(self._lost) + [f"{item.description} (server unreachable)" for item in unsent]
            self._pending.clear()
        if self._dropped_metrics:
            lost.append(f"{self._dropped_metrics} metric batches dropped while the buffer was full")
        self._files.cleanup()
        return lost

    # -- the background thread ----------------------------------------------------------------------------------
    def _put(self, item: _Item) -> None:
        with self._cond:
            if len(self._pending) >= self._max_pending:
                oldest_metrics = next((i for i in self._pending if i.kind == "metrics"), None)
                if oldest_metrics is None:  # a buffer full of files and tags: refuse the newcomer instead
                    self._lost.append(f"{item.description} (buffer full)")
                    return
                self._pending.remove(oldest_metrics)
                self._dropped_metrics += 1
            self._pending.append(item)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._in_flight = self._take_batch()
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - any failure of the client is handled the same way
                if _rejected(exc):
                    self._lost.append(f"{batch.description} (rejected: {str(exc).splitlines()[0][:200]})")
                    self._in_flight = None
                    continue
                self._requeue(batch, exc)
                with self._cond:
                    if not self._abandoned:
                        self._cond.wait(self._retry_s)  # close() wakes it early for one more try
                    if self._abandoned:
                        return
                continue
            self._in_flight = None
            if self._outage_since is not None:
                log.warning("MLflow: tracking server reachable again after %.0f s; delivering buffered logs",
                            time.monotonic() - self._outage_since)
                self._outage_since = None

    def _take_batch(self) -> _Item:
        """The oldest item; consecutive metric items are merged into one ``log_batch`` call (MLflow takes 1000)."""
        item = self._pending.popleft()
        if item.kind != "metrics":
            return item
        metrics, steps = list(item.payload), [item.description]
        while (self._pending and self._pending[0].kind == "metrics"
               and len(metrics) + len(self._pending[0].payload) <= 1000):
            nxt = self._pending.popleft()
            metrics += nxt.payload
            steps.append(nxt.description)
        description = steps[0] if len(steps) == 1 else f"{steps[0]} .. {steps[-1].rsplit(' ', 1)[-1]}"
        return _Item("metrics", metrics, description=description)

    def _requeue(self, item: _Item, exc: Exception) -> None:
        with self._cond:
            if not self._abandoned:  # else close() has already counted it as lost
                self._pending.appendleft(item)
            self._in_flight = None
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow: cannot reach the tracking server at %s (%s); training goes on, logs are buffered "
                        "and retried every %.0f s", redact_uri(self.uri), str(exc).splitlines()[0][:200], self._retry_s)

    def _send(self, item: _Item) -> None:
        if item.kind == "metrics":
            self._client.log_batch(self.run_id, metrics=item.payload, synchronous=True)
        elif item.kind == "tag":
            self._client.set_tag(self.run_id, *item.payload)
        else:
            self._client.log_artifact(self.run_id, str(item.payload), item.artifact_dir or None)


def _rejected(exc: Exception) -> bool:
    """Whether the server answered and refused (4xx): retrying the same call cannot help."""
    status = getattr(exc, "get_http_status_code", lambda: None)()
    return status is not None and 400 <= status < 500
