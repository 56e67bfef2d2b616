"""The local cache of registered versions: ``<DDPM_HOME>/models/<hash of the server>/<name>/<version>/``.

A version is downloaded once, atomically (a temporary folder renamed into place), and touched on every use. When
the cache outgrows its limit (``$DDPM_MODEL_CACHE_GB``, default :data:`DEFAULT_LIMIT_GB`), the least recently used
versions are removed until it fits, never the one just resolved: a Serve replica that follows an alias keeps the
version it serves, not every version it ever served.

Model names come from URIs: a name that could leave the cache folder (a path separator, ``..``) is refused, and the
characters a folder name must not hold are percent-encoded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from pipelines import tracking
from pipelines.errors import UserError

DEFAULT_LIMIT_GB = 10.0  # a few hundred of the small models here; a handful of large ones
LIMIT_ENV = "DDPM_MODEL_CACHE_GB"
USED = ".last-used"  # touched on every resolution: its mtime orders the versions for eviction


def check_name(name: str, uri: str) -> str:
    """``name`` if it is a registered-model name that cannot leave the cache folder, else a UserError."""
    if "/" in name or "\\" in name or ".." in name or "\x00" in name or name.strip() != name or not name:
        raise UserError(f"{uri}: the model name {name!r} may not hold '/', '\\', '..' or surrounding spaces")
    return name


def root() -> Path:
    return tracking.home() / "models"


def folder(tracking_uri: str, name: str, version: str) -> Path:
    """Where ``name`` version ``version`` of the server ``tracking_uri`` is cached: the same name on two servers is
    two models. Letters, digits, ``.``, ``_`` and ``-`` are kept; any other character is percent-encoded."""
    check_name(name, f"models:/{name}/{version}")
    if not str(version).isdigit():
        raise UserError(f"models:/{name}/{version}: a version is a number")
    server = hashlib.sha256(tracking.redact_uri(tracking_uri).encode()).hexdigest()[:12]
    return root() / server / quote(name, safe="._-") / str(version)


def limit_bytes() -> int:
    raw = os.environ.get(LIMIT_ENV, "")
    try:
        gb = float(raw) if raw else DEFAULT_LIMIT_GB
    except ValueError:
        raise UserError(f"${LIMIT_ENV} must be a number of GB, got {raw!r}") from None
    if not gb > 0:
        raise UserError(f"${LIMIT_ENV} must be positive, got {raw!r}")
    return int(gb * 2**30)


def fetch(name: str, version: str, tracking_uri: str, *, check) -> Path:
    """The cached folder of ``name`` version ``version``, downloaded first if needed; ``check(folder)`` raises if
    the download does not hold what the caller wants. Marks the version used, then evicts past the limit."""
    cached = folder(tracking_uri, name, version)
    if not cached.is_dir():
        _download(name, version, tracking_uri, cached, check)
    (cached / USED).touch()
    evict(limit_bytes(), keep=cached)
    return cached


def evict(limit: int, *, keep: Path, under: Path | None = None) -> list[Path]:
    """Remove least recently used versions under ``under`` (the cache root) until their total size is at most
    ``limit`` bytes; ``keep`` stays whatever its size. Returns the removed folders, oldest first."""
    base = under or root()
    versions = [v for v in base.glob("*/*/*") if v.is_dir() and not v.name.startswith(".")]
    sizes = {v: _size(v) for v in versions}
    total = sum(sizes.values())
    removed = []
    for version in sorted(versions, key=_last_used):
        if total <= limit:
            break
        if version == keep:
            continue
        # Renamed first: a reader sees the whole version or none of it.
        doomed = version.with_name(f".evict-{version.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            version.rename(doomed)
        except OSError:
            continue  # another process evicted it first
        shutil.rmtree(doomed, ignore_errors=True)
        try:
            version.parent.rmdir()  # the model's folder, once its last cached version is gone
        except OSError:
            pass
        total -= sizes[version]
        removed.append(version)
    return removed


def quiet_progress() -> None:
    """No artifact progress bars: they fill CLI output, training logs and Serve logs with carriage returns."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _last_used(version: Path) -> float:
    try:
        return (version / USED).stat().st_mtime
    except OSError:
        return version.stat().st_mtime


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _download(name: str, version: str, tracking_uri: str, cached: Path, check) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_progress()
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cached.parent))
    try:
        # The version's storage location, asked of this server: a models:/ URI would be resolved against
        # MLflow's process-wide registry URI instead of ``tracking_uri``.
        location = tracking.client(tracking_uri).get_model_version_download_uri(name, version)
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging), tracking_uri=tracking_uri)
        check(staging)  # fail here, not in the caller, if the version holds nothing of the wanted kind
        staging.rename(cached)
    except MlflowException as exc:
        raise UserError(f"models:/{name}/{version}: {(str(exc).strip().splitlines() or ['?'])[0]}") from None
    except OSError:
        if not cached.is_dir():  # losing a race to a concurrent download of the same version is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
