"""Connecting to Ray the same way in every stage, and keeping Ray's own logging out of the terminal.

By default a stage prints only its own progress. Ray's INFO lines, Ray Data's per-dataset banners and progress
reports, and everything Ray's worker processes print (Ray Train's controller, the training workers, Ray Data's split
coordinator) go to the Ray session's log files (``<session>/logs/``: ``worker-*.out``, ``ray-data/ray-data.log``,
``ddpm-driver-<pid>.log`` for this process's Ray loggers, and ``ddpm-driver-<pid>.err`` for what native code writes
to this process's file descriptor 2), not to the terminal. ``ddpm --verbose <command>`` (environment:
``DDPM_VERBOSE=1``) brings them all back. Warnings and errors of this process's Ray loggers, and everything written
through Python's ``sys.stderr`` (our one-line errors, tracebacks, warnings), are printed either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

VERBOSE_ENV = "DDPM_VERBOSE"
# Ray's single-machine mode (its default on macOS and Windows): the node's address is 127.0.0.1 and every Ray port
# (GCS, raylet, object manager, workers, agents) listens on loopback only. Read once, when ``ray`` is imported.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


def keep_local_ray_on_loopback() -> bool:
    """Before ``ray`` is imported: when this process will start its own Ray (``RAY_ADDRESS`` unset), make it a
    loopback-only, single-machine Ray. Returns whether the setting is in force (it is inherited by ``ray start`` and
    every child process).

    Why not ``--node-ip-address=127.0.0.1`` / ``ray.init(_node_ip_address="127.0.0.1")``: Ray 2.60 replaces a loopback
    address given there with the machine's own (``ray._private.services.resolve_ip_for_localhost``) and its gRPC
    servers listen on all interfaces (measured: ``ss -ltn`` showed ``*:PORT`` for the GCS, the raylet and the workers).
    In single-machine mode the same processes listen on 127.0.0.1 only. A multi-node cluster needs the opposite, and
    gets it: nothing is set when ``RAY_ADDRESS`` names a cluster to join, or when the user set the variable.
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
    return os.environ.get(SINGLE_MACHINE_ENV, "").lower() in ("0", "false")


def verbose() -> bool:
    """Whether Ray's own output should reach the terminal (``ddpm --verbose``, ``DDPM_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def init_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS``, or start a local Ray on this machine when it is unset; no-op if connected.

    ``address="local"`` matters: without it ``ray.init()`` silently joins whatever cluster ``ray start`` last left
    on this machine. Started through the ``ddpm`` command, the local instance is a single-machine Ray whose ports
    all listen on 127.0.0.1 (:func:`keep_local_ray_on_loopback`); started from Python without it, Ray 2.60 binds
    its GCS, raylet and worker ports on all interfaces whatever ``_node_ip_address`` says, and token authentication
    (on once ``~/.ray/auth_token`` exists) is what guards them (docs/cluster.md, "The network"). The dashboard runs,
    on 127.0.0.1 only: Ray Train's placement-group cleaner asks its State API whether the trainer is alive, and
    without it warns every few seconds that it cannot.
    """
    import ray

    if not ray.is_initialized():
        quiet_ray_logging()  # before ray.init too: it logs as it starts
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**connect_options())
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
                     dashboard_host="127.0.0.1", **connect_options())
    quiet_ray_logging()


def connect_options() -> dict:
    """``ray.init`` keyword arguments: quiet by default (see the module docstring), Ray's usual output when verbose."""
    if verbose():
        return {}
    return {"log_to_driver": False, "configure_logging": False}


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Ray's notice that token authentication is on, which the quickstart prints in its own words.
_DROP_NOTICE = _DropMessage(_AUTH_NOTICE)
# Ray Data's "no available CPUs" warning, off the terminal (``ray-data.log`` keeps it). Ray Data checks
# ``ray.available_resources()`` each time a dataset is executed, an already materialised one included, and that view
# lags the tasks that just finished: the quickstart printed it right after reading its training set, before the
# training workers existed (tests/pipelines/test_quickstart.py, 2026-12-07). A stage that truly waits for a CPU shows
# it in its own progress lines, which stop.
_DROP_CPU_WARNING = _DropMessage("Warning: The Ray cluster currently does not have any available CPUs")


def quiet_ray_logging() -> None:
    """Ray's and Ray Data's INFO lines to the session's log files only; warnings still reach the terminal.

    Idempotent, and a no-op when verbose. Ray Data's dataset banners ("Starting execution of Dataset ...",
    "Execution plan of ...") and progress reports are INFO records of the ``ray.data`` logger, whose file handler
    (``ray-data.log``) keeps them while its console handler is raised to WARNING.
    """
    if verbose():
        return
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DROP_NOTICE)
    ray_logger = logging.getLogger("ray")
    mine = {getattr(h, "_ddpm", None) for h in ray_logger.handlers}
    if "console" not in mine:
        if ray_logger.level == logging.NOTSET or ray_logger.level > logging.INFO:
            ray_logger.setLevel(logging.INFO)
        for handler in ray_logger.handlers:  # what ray.init(configure_logging=True) installed, if anything
            handler.setLevel(max(handler.level, logging.WARNING))
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console._ddpm = "console"
        ray_logger.addHandler(console)
        ray_logger.propagate = False
    session = _session_log_dir()
    if "file" not in mine and session is not None:
        to_file = logging.FileHandler(os.path.join(session, f"ddpm-driver-{os.getpid()}.log"), delay=True)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_file._ddpm = "file"
        ray_logger.addHandler(to_file)
    if session is not None:
        _native_stderr_to(os.path.join(session, f"ddpm-driver-{os.getpid()}.err"))
    try:
        import ray.data
        from ray.data._internal.logging import SessionFileHandler
    except ImportError:  # ray[data] not installed: nothing of Ray Data's to quiet
        return
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if _DROP_CPU_WARNING not in handler.filters:
                handler.addFilter(_DROP_CPU_WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # a bar per pass per worker; the stages print their own progress
    # Ray Data warns, once per process, that it was just told so; spend that "once" here, where it was decided.
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")


_NATIVE_STDERR: dict[str, str] = {}  # {"path": where file descriptor 2 now goes}, once per process


def _native_stderr_to(path: str) -> None:
    """Point file descriptor 2 at ``path`` and keep Python's ``sys.stderr`` on the terminal. Once per process.

    Why the descriptor: the driver's core worker starts Ray's C++ log (``RayLog::StartRayLog``, Ray 2.60) with two
    sinks, the session's ``python-core-driver-*.log`` (INFO and above) and a stderr sink for ERROR and above that no
    setting turns off (``RAY_BACKEND_LOG_LEVEL`` sets both sinks' level; ``RAY_LOG_TO_STDERR=1`` moves the file's
    lines to the terminal too). Lines such as ``core_worker.cc: ... has constructor arguments in the object store
    and max_restarts > 0`` are thus already in the session's log and reach the terminal only through fd 2.

    ``sys.stderr`` becomes a stream on a duplicate of the old fd 2, and logging handlers that wrote to the old one
    move to it, so our errors, tracebacks and warnings still print. Child processes started later inherit the file
    as their fd 2 (the stages capture their children's output). Skipped when ``sys.stderr`` is not this process's
    fd 2 (pytest's capture, an embedding host): its writes do not go through fd 2 then.
    """
    if _NATIVE_STDERR or sys.stderr is None or sys.stderr is not sys.__stderr__:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except (OSError, ValueError):  # no fd behind sys.stderr, or the log folder is not writable: leave fd 2 as is
        return
    old = sys.stderr
    old.flush()
    terminal = os.dup(2)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=old.encoding, errors=old.errors)
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(sys.stderr)
    _NATIVE_STDERR["path"] = path


def _session_log_dir() -> str | None:
    """``<session>/logs`` of the Ray this process is connected to, or None."""
    try:
        import ray

        node = ray._private.worker._global_node
        return None if node is None else os.path.join(node.get_session_dir_path(), "logs")
    except Exception:
        return None


# -- what the connected Ray is: for the quickstart's first line, `ddpm status`, and "what holds the CPUs" -----------
def auth_mode() -> str:
    """``on`` when Ray's token authentication is on for this process (and so for the cluster it joined), else
    ``off``."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return "on" if is_token_auth_enabled() else "off"
    except Exception:  # a private module: say so rather than guess
        return "unknown"


def dashboard_url() -> str | None:
    """``http://HOST:PORT`` of the connected cluster's dashboard, or None."""
    try:
        import ray

        url = ray._private.worker.get_dashboard_url()
        return f"http://{url}" if url else None
    except Exception:
        return None


def listening_addresses() -> list[str]:
    """``HOST:PORT`` of every TCP port the connected Ray's processes on this machine listen on (the GCS, raylet and
    agents of its session, and the workers they started), measured from the sockets themselves; empty when that
    cannot be read (another machine's cluster, no permission)."""
    try:
        import ray
        import psutil  # Ray ships it (ray/thirdparty_files), and imports it with itself

        session = ray._private.worker._global_node.session_name
        members = []
        for process in psutil.process_iter(["cmdline"]):
            if session in " ".join(process.info["cmdline"] or []):
                members.append(process)
        everyone = {p.pid: p for p in members}
        for process in members:
            with contextlib.suppress(psutil.Error):
                everyone |= {c.pid: c for c in process.children(recursive=True)}
        found = set()
        for process in everyone.values():
            with contextlib.suppress(psutil.Error):
                for conn in process.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        return sorted(found)
    except Exception:
        return []


def live_actor_classes() -> str:
    """The live actors of the connected cluster by class, e.g. ``ServeReplica:ddpm:Sampler, TrainController``; ""
    when unknown. From the GCS's actor table, which works without the dashboard."""
    try:
        from ray._private.state import actors

        live = [a.get("ActorClassName", "?") for a in actors().values() if a.get("State") == "ALIVE"]
    except Exception:
        return ""
    counts = {name: live.count(name) for name in sorted(set(live))}
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())


def resource_summary() -> str:
    """``2 of 2 CPU free ...; live actors: ...``: what a stage that waits for resources reports."""
    try:
        import ray

        total, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"{free.get(k, 0):g} of {total[k]:g} {k} free" for k in ("CPU", "GPU") if total.get(k)]
        holders = live_actor_classes()
        return "; ".join(parts) + (f"; live actors: {holders}" if holders else "")
    except Exception as exc:
        return f"the cluster's resources could not be read ({exc})"
